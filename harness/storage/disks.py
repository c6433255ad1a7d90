"""Disk images: raw and qcow2, ext2/ext4 from a folder, MBR-partitioned, empty; and overlays.

Every image is made by the host's own tools, without root: ``qemu-img`` for formats and
overlays, ``mkfs.ext4 -d`` to fill a file system from a folder, ``sfdisk`` for the partition
table. A base image is made read-only once created (mode 0444, belt and braces: QEMU opens a
backing file read-only anyway), and a VM only ever boots a copy-on-write qcow2 overlay of
it, made in the VM's private folder, so a test that writes to its disk never changes the
base image another test boots.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import uuid as uuid_module
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import cache, tools
from harness.outcome import ConfigError, HarnessError, InfraError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PARTITION_START_SECTOR = 2048  # 1 MiB, as distro installers align the first partition
SECTOR = 512
FORMATS = ("raw", "qcow2")
FILESYSTEMS = ("ext2", "ext3", "ext4")
_SIZE = re.compile(r"(?i)^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$")
_LABEL_MAX = 16  # ext2/3/4 volume labels are at most 16 bytes
_ISO_LABEL = re.compile(r"^[A-Z0-9_]{1,32}$")


@dataclass(frozen=True)
class DiskImage:
    """A disk image file and what is known about what it holds.

    ``fstype``, ``label`` and ``uuid`` describe the file system the image holds (on the
    whole disk, or in its first partition when ``partitioned``); None when unknown.
    """

    path: Path
    format: str
    size: int  # virtual size in bytes
    fstype: str | None = None
    label: str | None = None
    uuid: str | None = None
    partitioned: bool = False

    @classmethod
    def open(cls, path: Path, *, fstype: str | None = None) -> DiskImage:
        """Describe an existing image file (format and size from ``qemu-img info``).

        Raises:
            ConfigError: the file does not exist or qemu-img cannot read it.
            MissingToolError: qemu-img is not installed.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"disk image {path} does not exist; build it or fix the path")
        info = image_info(path)
        fmt = str(info.get("format", "raw"))
        return cls(path, fmt, int(info["virtual-size"]), fstype=fstype)

    def digest(self) -> str:
        """SHA-256 of the image file: the same before and after any test that boots it."""
        return cache.file_digest(self.path)

    def root(self, by: str = "label") -> str:
        """A ``root=`` value for this image's file system: ``LABEL=x`` or ``UUID=y``.

        Raises:
            ConfigError: the image has no file system with that attribute.
        """
        value = {"label": self.label, "uuid": self.uuid}.get(by)
        if by not in ("label", "uuid"):
            raise ConfigError(f"root(by={by!r}): use 'label' or 'uuid'")
        if not value:
            raise ConfigError(f"disk image {self.path} has no file system {by} to boot by")
        return f"{by.upper()}={value}"


def parse_size(size: int | str) -> int:
    """Bytes from ``16M``, ``1G``, ``512k`` or a number of bytes (binary units).

    Raises:
        ConfigError: the text is not a size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConfigError(f"disk size {size} must be positive")
        return size
    match = _SIZE.match(str(size))
    if not match:
        raise ConfigError(f"disk size {size!r} is not a size; write e.g. 16M, 1G or 65536")
    number, unit = int(match.group(1)), match.group(2).lower()
    value: int = number * (1 << (10 * "_kmgt".index(unit))) if unit else number
    if value <= 0:
        raise ConfigError(f"disk size {size!r} must be positive")
    return value


def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info --output=json`` of ``path``.

    Raises:
        ConfigError: qemu-img cannot read the file.
    """
    out = _run(
        [tools.require("qemu-img"), "info", "--output=json", str(path)],
        what=f"read disk image {path}",
        error=ConfigError,
    )
    info: dict[str, Any] = json.loads(out)
    return info


def empty(path: Path, size: int | str, *, fmt: str = "qcow2", read_only: bool = True) -> DiskImage:
    """An empty disk of ``size`` (all zeroes to the guest).

    Raises:
        ConfigError: unknown format or bad size.
        MissingToolError: qemu-img is not installed.
    """
    _check_format(fmt)
    nbytes = parse_size(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [tools.require("qemu-img"), "create", "-q", "-f", fmt, str(path), str(nbytes)],
        what=f"create {path}",
    )
    return _finish(DiskImage(path, fmt, nbytes), read_only)


def filesystem(
    source: Path,
    path: Path,
    *,
    size: int | str = "32M",
    fstype: str = "ext4",
    label: str | None = None,
    uuid: str | None = None,
    fmt: str = "raw",
    read_only: bool = True,
) -> DiskImage:
    """A disk holding one ext2/ext3/ext4 file system made from folder ``source``.

    ``mkfs -d`` copies the folder in without root, mounting or loop devices; the root
    folder and every file come out owned by root. ``uuid`` defaults to a random one so
    ``UUID=`` roots are always possible.

    Raises:
        ConfigError: unknown file system or format, bad label, size or uuid, or a
            folder that does not exist or does not fit.
        MissingToolError: mkfs.ext4/mkfs.ext2 or qemu-img is not installed.
    """
    if fstype not in FILESYSTEMS:
        raise ConfigError(f"file system {fstype!r} is not supported; use one of {FILESYSTEMS}")
    _check_format(fmt)
    if not source.is_dir():
        raise ConfigError(f"file system source {source} is not a folder")
    if label is not None and (not label or len(label.encode()) > _LABEL_MAX):
        raise ConfigError(f"file system label {label!r} must be 1 to {_LABEL_MAX} bytes")
    if uuid is None:
        uuid = str(uuid_module.uuid4())
    try:
        uuid = str(uuid_module.UUID(uuid))
    except ValueError:
        raise ConfigError(f"file system uuid {uuid!r} is not a UUID") from None
    nbytes = parse_size(size)
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.unlink(missing_ok=True)
    mkfs = tools.require("mkfs.ext2" if fstype == "ext2" else "mkfs.ext4")
    argv = [mkfs, "-q", "-F", "-t", fstype, "-d", str(source), "-U", uuid]
    argv += ["-E", "root_owner=0:0"]
    if label is not None:
        argv += ["-L", label]
    argv += [str(raw), f"{nbytes // 1024}k"]
    # Fixed times and hash seed would make the image reproducible, but mke2fs reads them
    # from E2FSPROGS_FAKE_TIME only; the tests compare a digest before and after, not runs.
    _run(argv, what=f"make {fstype} in {raw} from {source}", error=ConfigError)
    image = DiskImage(raw, "raw", nbytes, fstype=fstype, label=label, uuid=uuid)
    if fmt != "raw":
        image = convert(image, path, fmt, read_only=False)
        raw.unlink()
    return _finish(image, read_only)


def iso9660(
    source: Path,
    path: Path,
    *,
    label: str,
    read_only: bool = True,
) -> DiskImage:
    """An ISO 9660 CD image of folder ``source`` with Rock Ridge (modes, owners, symlinks).

    ``label`` becomes the volume id, which ``findfs LABEL=`` and blkid read in the guest.
    Made with xorriso (``-as mkisofs``), or genisoimage when only that is installed; no root.

    Raises:
        ConfigError: the folder does not exist or the label is not a valid volume id.
        MissingToolError: neither xorriso nor genisoimage is installed.
    """
    if not source.is_dir():
        raise ConfigError(f"ISO source {source} is not a folder")
    if not _ISO_LABEL.match(label):
        raise ConfigError(
            f"ISO volume label {label!r}: use 1 to 32 of A-Z, 0-9 and _ (ISO 9660 d-characters)"
        )
    if shutil.which("xorriso"):
        argv = [tools.require("xorriso"), "-as", "mkisofs"]
    else:
        argv = [tools.require("genisoimage")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    argv += ["-quiet", "-R", "-V", label, "-o", str(path), str(source)]
    _run(argv, what=f"make an ISO image of {source}", error=ConfigError)
    size = path.stat().st_size
    return _finish(DiskImage(path, "raw", size, fstype="iso9660", label=label), read_only)


def partitioned(
    fs_image: DiskImage,
    path: Path,
    *,
    fmt: str = "raw",
    read_only: bool = True,
    partition_type: str = "83",
) -> DiskImage:
    """An MBR disk whose first partition starts at sector 2048 (1 MiB) and holds
    ``fs_image``'s bytes, as a distro installer lays a disk out.

    Raises:
        ConfigError: ``fs_image`` is not raw or is itself partitioned.
        MissingToolError: sfdisk or qemu-img is not installed.
    """
    _check_format(fmt)
    if fs_image.format != "raw" or fs_image.partitioned:
        raise ConfigError(
            f"partitioned(): {fs_image.path} must be a raw image of one file system; "
            "make it with filesystem(..., fmt='raw')"
        )
    start = PARTITION_START_SECTOR * SECTOR
    fs_bytes = fs_image.path.stat().st_size
    fs_sectors = -(-fs_bytes // SECTOR)
    total = start + fs_sectors * SECTOR
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.unlink(missing_ok=True)
    with raw.open("wb") as handle:
        handle.truncate(total)
    # A fixed disk identifier: the same inputs give the same table.
    script = (
        "label: dos\nlabel-id: 0x62686469\nunit: sectors\n\n"
        f"start={PARTITION_START_SECTOR}, size={fs_sectors}, type={partition_type}\n"
    )
    _run(
        [tools.require("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", str(raw)],
        what=f"partition {raw}",
        stdin=script,
    )
    with fs_image.path.open("rb") as src, raw.open("r+b") as dst:
        dst.seek(start)
        shutil.copyfileobj(src, dst, 4 * MIB)
    image = replace(fs_image, path=raw, format="raw", size=total, partitioned=True)
    if fmt != "raw":
        image = convert(image, path, fmt, read_only=False)
        raw.unlink()
    return _finish(image, read_only)


def convert(image: DiskImage, path: Path, fmt: str, *, read_only: bool = True) -> DiskImage:
    """A copy of ``image`` in format ``fmt`` (``qemu-img convert``).

    Raises:
        ConfigError: unknown format.
        MissingToolError: qemu-img is not installed.
    """
    _check_format(fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _run(
        [
            tools.require("qemu-img"),
            "convert",
            "-q",
            "-f",
            image.format,
            "-O",
            fmt,
            str(image.path),
            str(path),
        ],
        what=f"convert {image.path} to {fmt}",
    )
    return _finish(replace(image, path=path, format=fmt), read_only)


def overlay(base: DiskImage | Path, path: Path) -> Path:
    """A copy-on-write qcow2 overlay of ``base`` at ``path``; the VM writes only there.

    The base is referred to by its absolute path, so the overlay works from any folder.

    Raises:
        ConfigError: ``base`` does not exist or qemu-img cannot read it.
        MissingToolError: qemu-img is not installed.
    """
    image = base if isinstance(base, DiskImage) else DiskImage.open(base)
    if not image.path.is_file():
        raise ConfigError(f"disk image {image.path} does not exist; build it or fix the path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            tools.require("qemu-img"),
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            image.format,
            "-b",
            str(image.path.resolve()),
            str(path),
        ],
        what=f"create an overlay of {image.path}",
    )
    return path


def kept_overlay(base: DiskImage | Path, path: Path) -> Path:
    """The overlay of ``base`` at ``path``: made if missing, else checked and reused.

    For tests that boot several times against one disk state: each boot writes to the same
    overlay, the base image stays as it was.

    Raises:
        ConfigError: ``path`` exists but is not an overlay of ``base``, or ``base`` is
            missing or unreadable.
        MissingToolError: qemu-img is not installed.
    """
    image = base if isinstance(base, DiskImage) else DiskImage.open(base)
    if not path.exists():
        return overlay(image, path)
    info = image_info(path)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    if info.get("format") != "qcow2" or backing is None:
        raise ConfigError(f"{path} is not a qcow2 overlay; remove it or choose another path")
    if Path(str(backing)).resolve() != image.path.resolve():
        raise ConfigError(
            f"{path} is an overlay of {backing}, not of {image.path}; "
            "a kept overlay serves one base image"
        )
    return path


def make_read_only(path: Path) -> None:
    """chmod 0444: nobody but root may write the base image by accident."""
    os.chmod(path, 0o444)


def _finish(image: DiskImage, read_only: bool) -> DiskImage:
    if read_only:
        make_read_only(image.path)
    log.info("disk image %s (%s, %d bytes)", image.path, image.format, image.size)
    return image


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"disk image format {fmt!r} is not supported; use one of {FORMATS}")


def _run(
    argv: Sequence[str],
    *,
    what: str,
    stdin: str | None = None,
    error: type[HarnessError] = InfraError,
) -> str:
    log.debug("running %s", argv)
    result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise error(f"could not {what}: {' '.join(argv)} exited {result.returncode}: {detail}")
    return result.stdout
