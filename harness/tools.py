"""Host programs the harness runs, and the Debian package that provides each.

Everything is checked before a VM is launched, so a missing tool is a clear error that
says what to install instead of a confusing failure halfway through a boot.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from harness import cachefs
from harness.outcome import InfraError, MissingToolError

log = logging.getLogger(__name__)

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
    "grub-mkimage": "grub-common",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "git": "git",
    "setpriv": "util-linux",
    "mkinitramfs": "initramfs-tools-core",
    "unshare": "util-linux",
    "dpkg-query": "dpkg",
    "xorriso": "xorriso",
    "genisoimage": "genisoimage",
    "ganesha.nfsd": "nfs-ganesha",
    "mmdebstrap": "mmdebstrap",
    "chroot": "coreutils",
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


class ToolFailed(InfraError):
    """A host program exited non-zero; ``returncode`` and its ``stderr`` are kept, so a
    caller that knows the program's words can name the cause (see harness.kernel.debian)."""

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def run_tool(
    argv: Sequence[str], *, what: str, writes: Path, cwd: Path | None = None, show: bool = False
) -> str:
    """Run ``argv`` (which writes under ``writes``); its standard output.

    ``show`` lets its standard output through to ours (a download's progress).

    Raises:
        CacheFull, CacheReadOnly, CacheDenied: its error output names a full, read-only or
            forbidden file system under ``writes`` (its line is in the message).
        ToolFailed: it exited non-zero otherwise (its error output is in the message).
    """
    log.debug("running %s", argv)
    result = subprocess.run(
        list(argv),
        cwd=cwd,
        stdout=None if show else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return result.stdout or ""
    stderr = (result.stderr or "").strip()
    named = cachefs.tool_error(stderr, writes, f"running {Path(argv[0]).name} to {what}")
    if named is not None:
        raise named
    raise ToolFailed(
        f"could not {what}: {' '.join(argv)} exited {result.returncode}\n{stderr}",
        result.returncode,
        stderr,
    )
