"""Host programs the harness runs, and the Debian package that provides each.

Everything is checked before a VM is launched, so a missing tool is a clear error that
says what to install instead of a confusing failure halfway through a boot.
"""

from __future__ import annotations

import shutil

from harness.outcome import MissingToolError

DEBIAN_PACKAGE: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "modinfo": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.ext2": "e2fsprogs",
    "cpio": "cpio",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "zstd": "zstd",
    "lz4": "lz4",
    "xz": "xz-utils",
    "gzip": "gzip",
    "sh": "dash",
    "sfdisk": "fdisk",
    "git": "git",
    "setpriv": "util-linux",
}


def require(tool: str) -> str:
    """Return the absolute path of ``tool``.

    Raises:
        MissingToolError: naming the Debian package to install.
    """
    path = shutil.which(tool)
    if path is None:
        raise MissingToolError(tool, DEBIAN_PACKAGE.get(tool, tool))
    return path
