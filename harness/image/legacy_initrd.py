"""Filesystem-image initrds: the classic two-phase boot of initrd(4), made without root.

Before initramfs, the boot loader's initrd was a file system image. The kernel copies it into
the RAM disk ``/dev/ram0`` ("RAMDISK: gzip image found at block 0"), and then either:

- ``root=/dev/ram0``: mounts the RAM disk as the root and runs its ``/sbin/init``; or
- any other root: mounts the RAM disk read-write as a first root and runs ``/linuxrc`` (as a
  usermode helper: uid 0, not PID 1; "using deprecated initrd support" on 6.x), then mounts
  the device whose number ``/linuxrc`` left in ``/proc/sys/kernel/real-root-dev`` (``root=``
  unless it wrote another) and moves the RAM disk to ``/initrd`` when that folder exists.

:func:`build` turns a folder (a :func:`harness.image.rootfs.build` root, say) into such an
image: an ext2 file system made by ``mke2fs -d`` (no mount, loop device or root needed), the
kernel's modules for ``/linuxrc`` to load, and ``/linuxrc`` rendered from ``linuxrc.sh.j2``.
The kernel must have the RAM disk, the initrd and ext2 built in (:data:`REQUIREMENTS`), and
a RAM disk large enough (``ramdisk_size=``, see :meth:`LegacyInitrd.cmdline`).

Linux 7.0 removed the ``/linuxrc`` half (and ``real-root-dev``); ``root=/dev/ram0`` stays,
deprecated. :data:`DEPRECATION` matches what kernels print about it.

:func:`no_init_archive` makes the other thing the classic boot needs: an initramfs with no
``/init``, after which the kernel mounts ``root=`` itself (an NFS root, say) and, if that
fails, runs the archive's ``/sbin/init``, which reports the kernel's messages as a FAIL.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import compression, tools
from harness.image import cpio, templates
from harness.image.cpio import Entry
from harness.image.initramfs import busybox_entries, module_path, resolve_modules
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

LINUXRC_TEMPLATE = "linuxrc.sh.j2"
# What the kernel needs before any module can load: the RAM disk, the initrd and a built-in
# driver for the image's file system.
REQUIREMENTS: Mapping[str, tuple[str, ...]] = {
    "a filesystem-image initrd": (
        "CONFIG_BLK_DEV_INITRD=y",
        "CONFIG_BLK_DEV_RAM=y",
        "CONFIG_EXT2_FS=y|CONFIG_EXT4_USE_FOR_EXT2=y",
    ),
}
DEFAULT_RAMDISK_KIB = 4096  # CONFIG_BLK_DEV_RAM_SIZE's default
# Kernel lines about the legacy initrd going away: 6.x "using deprecated initrd support, will
# be removed in 2021." and, when /dev/initrd (block 1:250) is opened, "block device
# autoloading is deprecated and will be removed."; 7.0 words the root=/dev/ram0 notice anew.
DEPRECATION = re.compile(
    r"^\[[ \d.]+\] ((?=.*(?:deprecated|no longer supported))(?=.*(?:initrd|autoloading)).*?)\r?$",
    re.M,
)
LOADED = "RAMDISK: gzip image found at block 0"
REAL_ROOT_SPECIAL = ("", "ram0", "nfs")
MODULE_LIST = "etc/bootharness-modules"  # the image's modules, one path a line, in load order
_BLOCK = 1024


@dataclass(frozen=True)
class LegacyInitrd:
    """A built filesystem-image initrd and what booting it needs."""

    path: Path  # what QEMU gets as -initrd (compressed)
    image: Path  # the uncompressed file system image (what /dev/ram0 holds)
    size_kib: int  # the file system's size: the RAM disk must be at least this large
    digest: str  # sha256 of ``image``
    linuxrc: str | None  # the rendered /linuxrc, None when the image has none

    def cmdline(self, kernel: Kernel) -> str:
        """``ramdisk_size=N`` when the image is larger than the kernel's RAM disks (which
        otherwise fail with "RAMDISK: incomplete write" and a VFS panic), else ``""``."""
        configured = kernel.config.get("CONFIG_BLK_DEV_RAM_SIZE", str(DEFAULT_RAMDISK_KIB))
        try:
            available = int(configured)
        except ValueError:
            available = DEFAULT_RAMDISK_KIB
        return f"ramdisk_size={self.size_kib}" if self.size_kib > available else ""


def build(
    kernel: Kernel,
    source: Path,
    path: Path,
    *,
    linuxrc: bool = True,
    real_root: str = "",
    commands: Sequence[str] = (),
    modules: Sequence[str] = (),
    files: Mapping[str, Path | bytes] | None = None,
    root_wait: int = 10,
    compression_method: str = "gzip",
    label: str = "initrd",
) -> LegacyInitrd:
    """Make a filesystem-image initrd at ``path`` from folder ``source`` (left unchanged).

    With ``linuxrc``, ``/linuxrc`` loads ``modules`` (and their dependencies, carried in the
    image), runs ``commands`` and then writes ``real_root`` to real-root-dev: ``""`` keeps
    ``root=``, ``"ram0"`` keeps the RAM disk, ``"nfs"`` the kernel's NFS root, a block
    device name (``sdb``, ``sda1``) that device's number once it appears. ``files`` adds
    paths to the image (bytes, a file, or a folder copied whole). The modules' paths are
    also listed in load order in :data:`MODULE_LIST`, for an image whose own init loads them.

    Raises:
        ConfigError: a missing folder, an unknown module, a bad ``real_root`` or file path,
            a compression the kernel cannot unpack, or an image mke2fs cannot make.
        MissingToolError: mke2fs (e2fsprogs) or busybox is not installed.
    """
    if not source.is_dir():
        raise ConfigError(f"initrd source {source} is not a folder")
    if real_root not in REAL_ROOT_SPECIAL and not re.fullmatch(r"[a-z]+[0-9a-z]*", real_root):
        raise ConfigError(
            f"real_root {real_root!r}: use '', 'ram0', 'nfs' or a block device name like sdb"
        )
    if kernel.config:
        compression.check_kernel_supports(
            compression_method, kernel.config, kernel_name=kernel.name
        )
    tree = path.parent / f"{path.name}.tree"
    if tree.exists():
        shutil.rmtree(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tree, symlinks=True)
    module_files = resolve_modules(kernel, modules)
    module_paths = []
    for module in module_files:
        relpath = module_path(kernel.release, module)
        data = module.path.read_bytes()
        if not module.relpath.endswith(".ko"):
            data = compression.decompress(data)
        _write(tree, relpath, data, 0o644)
        module_paths.append("/" + relpath)
    if module_paths:
        # For an init of the image's own (root=/dev/ram0) that loads them: in load order.
        _write(tree, MODULE_LIST, ("\n".join(module_paths) + "\n").encode(), 0o644)
    for relpath, content in (files or {}).items():
        _add(tree, relpath, content)
    script = None
    if linuxrc:
        script = templates.render(
            LINUXRC_TEMPLATE,
            {
                "modules": module_paths,
                "commands": list(commands),
                "real_root": real_root,
                "root_wait": root_wait,
            },
        )
        _write(tree, "linuxrc", script.encode(), 0o755)
    image = path.parent / f"{path.name}.img"
    size_kib = _make_ext2(tree, image, label)
    data = image.read_bytes()
    path.write_bytes(compression.compress(data, compression_method))
    shutil.rmtree(tree)
    digest = hashlib.sha256(data).hexdigest()
    log.info("legacy initrd %s (%d KiB ext2, %d bytes)", path, size_kib, path.stat().st_size)
    return LegacyInitrd(path, image, size_kib, digest, script)


def deprecation(console: str) -> str | None:
    """The kernel's own line about the legacy initrd being deprecated or gone, if it printed
    one (without its time stamp)."""
    match = DEPRECATION.search(console)
    return match.group(1).strip() if match else None


def no_init_archive(path: Path, *, commands: Sequence[str] = ()) -> Path:
    """An initramfs (gzip'd cpio) with busybox and a ``/sbin/init`` but no ``/init``.

    The kernel unpacks it and, finding no ``/init``, mounts ``root=`` itself (the classic
    path: NFS root, a disk, the RAM disk). Only when that fails does it run this archive's
    ``/sbin/init``, which prints the kernel's messages about the root as a FAIL marker.

    Raises:
        MissingToolError: busybox is not installed.
    """
    lines = [
        "#!/bin/sh",
        "# The kernel could not mount root= and fell back to this initramfs (no /init).",
        "export PATH=/sbin:/bin",
        "mount -t proc proc /proc",
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null",
        'for w in $(cat /proc/cmdline); do case "$w" in bootharness.nonce=*) n=${w#*=};; esac;'
        " done",
        'echo "[bootharness:$n] INIT-START pid $$ (fallback)"',
        *commands,
        "why=$(dmesg | grep -iE 'VFS|NFS|Root-NFS|RAMDISK|root' | sed 's/^\\[[ .0-9]*\\] //'"
        " | tail -n 4 | tr '\\n' ' ')",
        'echo "[bootharness:$n] FAIL the kernel did not mount its root: $why"',
        "exec sh",
    ]
    entries = [
        Entry.dir("dev"),
        Entry.chardev("dev/console", 5, 1, mode=0o600),
        *(Entry.dir(name) for name in ("proc", "sys", "sbin", "root", "tmp")),
        *(e for e in busybox_entries() if e.path != "sbin/init"),
        Entry.file("sbin/init", ("\n".join(lines) + "\n").encode(), mode=0o755),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compression.compress(cpio.write_archive(entries), "gzip"))
    return path


def _write(tree: Path, relpath: str, data: bytes, mode: int) -> None:
    target = _inside(tree, relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def _add(tree: Path, relpath: str, content: Path | bytes) -> None:
    if isinstance(content, bytes):
        _write(tree, relpath, content, 0o644)
        return
    target = _inside(tree, relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    if Path(content).is_dir():
        shutil.copytree(content, target, symlinks=True, dirs_exist_ok=True)
    elif Path(content).is_file():
        shutil.copy2(content, target)
    else:
        raise ConfigError(f"initrd file {relpath!r}: {content} does not exist")


def _inside(tree: Path, relpath: str) -> Path:
    target = (tree / relpath.strip("/")).resolve()
    if not relpath.strip("/") or not target.is_relative_to(tree.resolve()):
        raise ConfigError(f"initrd file {relpath!r} points outside the image; fix the path")
    return target


def _make_ext2(tree: Path, image: Path, label: str) -> int:
    """mke2fs -d the tree into an ext2 image just big enough; its size in KiB."""
    used = 0
    count = 0
    for root, folders, names in os.walk(tree):
        count += len(folders) + len(names)
        for name in names:
            info = os.lstat(os.path.join(root, name))
            used += math.ceil(info.st_size / _BLOCK) + 1  # data, plus an indirect block
    inodes = count + 64
    # Block groups, bitmaps, inode tables and the root reserve are small at 1 KiB blocks.
    size_kib = math.ceil((used * 1.1 + inodes * 128 / _BLOCK + 256) / 64) * 64
    image.unlink(missing_ok=True)
    argv = [
        tools.require("mkfs.ext2"),
        "-q",
        "-F",
        "-t",
        "ext2",
        "-b",
        str(_BLOCK),
        "-m",
        "0",
        "-I",
        "128",
        "-N",
        str(inodes),
        "-L",
        label,
        "-E",
        "root_owner=0:0",
        "-d",
        str(tree),
        str(image),
        f"{size_kib}k",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ConfigError(
            f"could not make the initrd's ext2 image: {' '.join(argv)} exited "
            f"{result.returncode}: {(result.stderr or result.stdout).strip()}"
        )
    return size_kib
