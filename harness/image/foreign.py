"""Edit initramfs images someone else built: read their segments, extract, repack, overlay.

Distribution images are a sequence of *segments*: an uncompressed "early" cpio archive (CPU
microcode), then the compressed main archive, sometimes more after it; the kernel unpacks
them in order into one tree, a later entry replacing an earlier one of the same path
(``init/initramfs.c``). This module keeps that structure visible:

* :func:`read_segments` reads every segment losslessly (:class:`~harness.image.cpio.Member`:
  names as written, order, owners, times, hard links, device nodes).
* :func:`extract` writes each archive into a folder of its own (``early``, ``main``, ...)
  plus a manifest, refusing any path that would land outside the target folder.
* :func:`repack` turns such a folder back into an image with the same segments and
  compression (unless told otherwise); the same folder always gives the same bytes.
* :func:`overlay` appends one archive to an image, the way the kernel merges archives, so a
  test adds a hook or replaces ``/init`` without unpacking anything.

Hard links matter more than they seem: Debian's initramfs-tools images hold the busybox
applets as some 270 hard links of one file, stored once. Anything that copied the data into
each link would write busybox 270 times.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import cache, compression
from harness.image import cpio
from harness.image.cpio import Entry, EntryKind, Member
from harness.outcome import ConfigError, HarnessError

log = logging.getLogger(__name__)

MANIFEST = "bootharness-initramfs.json"
_MANIFEST_FORMAT = 1
# Compression methods the kernel knows beyond those this harness writes (harness.compression).
_EXTRA_CONFIG = {"bzip2": "CONFIG_RD_BZIP2", "lzma": "CONFIG_RD_LZMA", "lzo": "CONFIG_RD_LZO"}
# Repacking a 20 MB distribution image with zstd's top level takes tens of seconds; the
# generators themselves use fast levels (mkinitramfs: zstd -1). Level 3 is zstd's default.
REPACK_LEVELS: dict[str, int] = {"zstd": 3}
_SYMLINK_HOPS = 40  # as the kernel's MAXSYMLINKS
_TYPE_BITS = 0o170000
_NON_ZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True)
class Segment:
    """One archive of an image: where it starts, how it is compressed, what it holds.

    ``stream`` numbers the compressed streams: archives that share one (several archives
    inside one compressed stream) share the number; every uncompressed archive has its own.
    """

    offset: int
    compression: str
    members: tuple[Member, ...]
    stream: int

    @property
    def paths(self) -> list[str]:
        return [m.path for m in self.members if m.path]


def read_segments(data: bytes) -> list[Segment]:
    """Every archive of an initramfs image, in the order the kernel unpacks them.

    Raises:
        ValueError: data the kernel would not accept as an initramfs (garbage, truncation,
            broken padding, a compressed stream that does not hold cpio archives); the
            message says where.
        MissingToolError: a zstd or lz4 segment and the program is not installed.
    """
    segments: list[Segment] = []
    pos = 0
    stream = 0
    while (found := _next_non_zero(data, pos)) is not None:
        pos = found
        method = compression.detect(data, pos)
        if method == "none":
            if pos % 4:
                raise ValueError(
                    f"broken padding: an uncompressed cpio archive starts at offset {pos}, "
                    "which is not a multiple of 4; the kernel refuses this"
                )
            members, end = cpio.read_members(data, pos)
            segments.append(Segment(pos, "none", tuple(members), stream))
            stream += 1
            pos = end
            continue
        decoded = compression.decompress_stream(data, pos)
        inner = 0
        while (start := _next_non_zero(decoded.data, inner)) is not None:
            if decoded.data[start : start + 6] not in (cpio.MAGIC_NEWC, cpio.MAGIC_CRC):
                raise ValueError(
                    f"the {method} stream at offset {pos} does not hold a cpio archive at "
                    f"offset {start} of its data (found {decoded.data[start : start + 8]!r}); "
                    "is it a file system image for the initrd(4) RAM disk instead?"
                )
            members, inner = cpio.read_members(decoded.data, start, _where_in(method, pos))
            segments.append(Segment(pos, method, tuple(members), stream))
        stream += 1
        pos += decoded.consumed
    return segments


def _next_non_zero(data: bytes, pos: int) -> int | None:
    found = _NON_ZERO.search(data, pos)
    return None if found is None else found.start()


def _where_in(method: str, segment: int) -> Callable[[int], str]:
    def where(offset: int) -> str:
        return f"offset {offset} of the {method} segment at offset {segment}"

    return where


def image_digest(path: Path) -> str:
    """The content digest of an image file: what keys verdicts and derived images."""
    return cache.file_digest(path)


# Files only one generator puts into its images.
GENERATOR_MARKS: tuple[tuple[str, str], ...] = (
    ("initramfs-tools", "scripts/functions"),
    ("initramfs-tools", "conf/initramfs.conf"),
    ("dracut", "usr/lib/dracut-lib.sh"),  # dracut 059 (merged /usr)
    ("dracut", "lib/dracut-lib.sh"),
    ("dracut", "usr/bin/dracut-getarg"),
)


def generator_of(path: Path) -> str:
    """``initramfs-tools`` or ``dracut`` when the image's files say so, else ``""`` (a hand-made
    image, or one that cannot be read). Remembered per content digest: reading a compressed
    image costs a decompression."""
    return _generator_by_digest(image_digest(path), path)


@functools.lru_cache(maxsize=64)
def _generator_by_digest(digest: str, path: Path) -> str:
    try:
        segments = read_segments(path.read_bytes())
    except (OSError, ValueError, HarnessError):
        return ""
    paths = {m.path for s in segments for m in s.members}
    return next((name for name, mark in GENERATOR_MARKS if mark in paths), "")


def check_kernel_can_unpack(path: Path, config: Mapping[str, str], *, kernel_name: str) -> None:
    """Refuse an image whose compression the kernel's configuration cannot unpack.

    Every compressed stream is named by its magic; a stream that does not hold cpio
    archives (a file system image for the initrd(4) RAM disk) ends the walk, as it ends the
    kernel's. An empty ``config`` (unknown) accepts everything.

    Raises:
        ConfigError: the file cannot be read, the kernel lacks ``CONFIG_BLK_DEV_INITRD``, or a
            segment uses a method whose ``CONFIG_RD_*`` option is not set (naming the segment,
            the option and the methods this kernel can unpack).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"initrd {path}: cannot read it: {error.strerror}") from None
    if not config:
        return
    if config.get("CONFIG_BLK_DEV_INITRD") != "y":
        raise ConfigError(
            f"kernel {kernel_name!r} cannot boot initrd {path}: CONFIG_BLK_DEV_INITRD is not set"
        )
    for offset, method in _stream_methods(data):
        option = {**compression.KERNEL_CONFIG_OPTION, **_EXTRA_CONFIG}.get(method)
        if option is None or config.get(option) == "y":
            continue
        can = [
            m
            for m, o in {**compression.KERNEL_CONFIG_OPTION, **_EXTRA_CONFIG}.items()
            if o is None or config.get(o) == "y"
        ]
        raise ConfigError(
            f"kernel {kernel_name!r} cannot unpack initrd {path}: the segment at offset "
            f"{offset} is {method}-compressed and {option} is not set in its config; "
            f"recompress it (`bootharness initramfs repack -c METHOD`) with one of: "
            f"{', '.join(can)}"
        )


def _stream_methods(data: bytes) -> Iterator[tuple[int, str]]:
    pos = 0
    while (found := _next_non_zero(data, pos)) is not None:
        pos = found
        try:
            method = compression.detect(data, pos)
        except ValueError:
            return  # not an initramfs segment: a RAM disk image, the kernel's business
        yield pos, method
        if method == "none":
            try:
                _, pos = cpio.read_members(data, pos)
            except ValueError:
                return
            continue
        if method in ("bzip2", "lzma", "lzo"):
            return  # the harness cannot measure these streams; the method was checked
        try:
            decoded = compression.decompress_stream(data, pos)
        except ValueError:
            return
        if decoded.data.lstrip(b"\0")[:6] not in (cpio.MAGIC_NEWC, cpio.MAGIC_CRC):
            return
        pos += decoded.consumed


# ---------------------------------------------------------------------------- extract


def segment_names(segments: Sequence[Segment]) -> list[str]:
    """The folder of each archive: uncompressed archives before the first compressed one are
    ``early``, ``early.2``...; the first compressed archive (or the first archive when none is
    compressed) is ``main``; later archives of the same stream ``main.2``...; any archive
    after that ``extra.1``, ``extra.2``..."""
    if not segments:
        return []
    main_stream = next((s.stream for s in segments if s.compression != "none"), None)
    if main_stream is None:
        main_stream = segments[0].stream
    names: list[str] = []
    early = main = extra = 0
    seen_main = False
    for segment in segments:
        if segment.stream == main_stream:
            seen_main = True
            main += 1
            names.append("main" if main == 1 else f"main.{main}")
        elif not seen_main:
            early += 1
            names.append("early" if early == 1 else f"early.{early}")
        else:
            extra += 1
            names.append(f"extra.{extra}")
    return names


def extract(image: Path, folder: Path) -> list[str]:
    """Unpack every archive of ``image`` into its own folder under ``folder`` (which must be
    empty or absent) and write the manifest :func:`repack` reads; returns the folder names.

    Modes, times, symlinks and hard links are kept; owners and device nodes too when run as
    root (otherwise the manifest keeps them and a device becomes an empty placeholder file).

    Raises:
        ConfigError: unreadable or invalid image, a non-empty target, or a member whose path
            would leave its folder (``..``, or through a symlink the archive made).
    """
    data = _read_image(image)
    try:
        segments = read_segments(data)
    except ValueError as error:
        raise ConfigError(f"{image}: not an initramfs the kernel would unpack: {error}") from None
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"extract: {folder} is not empty; give a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    names = segment_names(segments)
    manifest: dict[str, object] = {"format": _MANIFEST_FORMAT, "source": image.name}
    records = []
    for name, segment in zip(names, segments, strict=True):
        extras = _extract_archive(segment.members, folder / name, where=f"{image} ({name})")
        records.append(
            {
                "folder": name,
                "compression": segment.compression,
                "stream": segment.stream,
                "offset": segment.offset,
                "names": [m.name for m in segment.members],
                "kept": extras,
            }
        )
    manifest["segments"] = records
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("extracted %s into %s: %s", image, folder, ", ".join(names))
    return names


def _read_image(image: Path) -> bytes:
    try:
        return image.read_bytes()
    except OSError as error:
        raise ConfigError(f"{image}: cannot read it: {error.strerror}") from None


def _extract_archive(members: Sequence[Member], root: Path, *, where: str) -> dict[str, object]:
    """Write one archive's members under ``root``; what the folder could not hold (owners
    when not root, device nodes as placeholders) comes back for the manifest."""
    root.mkdir()
    as_root = os.geteuid() == 0
    owners: dict[str, list[int]] = {}
    devices: dict[str, list[int]] = {}
    links: dict[tuple[int, int, int], list[tuple[Path, Member]]] = {}
    dirs: list[tuple[Path, Member]] = []
    for member in members:
        kind = member.kind
        if kind is None:
            raise ConfigError(
                f"{where}: member {member.name!r} has file type {member.mode & _TYPE_BITS:#o} "
                "(fifo or socket), which extract cannot write"
            )
        target = _safe_target(root, member.path, where=where, name=member.name)
        if kind is EntryKind.DIR:
            if target != root:
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    target.unlink()  # the kernel too replaces a path of another type
                target.mkdir(exist_ok=True)
            dirs.append((target, member))  # mode and time at the end: children come first
            continue
        if kind is EntryKind.SYMLINK:
            _replace(target)
            os.symlink(member.data, target)
        elif kind is EntryKind.FILE:
            _replace(target)
            if member.nlink > 1:
                links.setdefault((*member.dev, member.ino), []).append((target, member))
                continue
            target.write_bytes(member.data)
        else:
            _replace(target)
            major, minor = member.rdev
            device = stat.S_IFCHR if kind is EntryKind.CHARDEV else stat.S_IFBLK
            try:
                os.mknod(target, device | 0o600, os.makedev(major, minor))
            except PermissionError:
                target.write_bytes(b"")  # a placeholder; the manifest knows what it is
                devices[member.path] = [member.mode, major, minor]
        if not as_root and (member.uid or member.gid):
            owners[member.path] = [member.uid, member.gid]
        _set_metadata(target, member, as_root)
    for group in links.values():
        # The data is stored with one link (GNU cpio: the last one); every link gets it.
        data = next((m.data for _, m in reversed(group) if m.data), b"")
        first, member = group[0]
        first.write_bytes(data)
        _set_metadata(first, member, as_root)
        for other, _ in group[1:]:
            os.link(first, other)
    for target, member in reversed(dirs):  # children first: their creation touched the dir
        _set_metadata(target, member, as_root)
    return {"owners": owners, "devices": devices}


def _safe_target(root: Path, path: str, *, where: str, name: str) -> Path:
    """``root/path``, refused when it would leave ``root``: an absolute or ``..`` component
    after normalising, or a parent that is a symlink (written by an earlier member)."""
    if not path:
        return root
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(
            f"{where}: member {name!r} would be written outside the target folder "
            "(empty, '.' or '..' component); refusing to extract it"
        )
    current = root
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise ConfigError(
                f"{where}: member {name!r} goes through {current.relative_to(root)}, which is "
                "not a folder (a symlink could point outside the target); refusing to extract it"
            )
        current.mkdir(exist_ok=True)
    return current / parts[-1]


def _replace(target: Path) -> None:
    """A later member of the same path replaces the earlier one, as in the kernel."""
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise ConfigError(f"extract: {target} is a folder and a later member is not")
        target.unlink()


def _set_metadata(target: Path, member: Member, as_root: bool) -> None:
    if as_root:
        os.lchown(target, member.uid, member.gid)
    if not stat.S_ISLNK(member.mode):
        os.chmod(target, member.mode & 0o7777)
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


# ---------------------------------------------------------------------------- repack


def repack(
    folder: Path,
    output: Path,
    *,
    compression_method: str | None = None,
    single: bool = False,
    level: int | None = None,
) -> Path:
    """Build an image from a folder :func:`extract` made (and a person edited).

    Each archive folder becomes an archive again, in the manifest's order and compression
    (``compression_method`` recompresses the compressed ones; ``single`` writes everything
    as one archive in one segment). Members keep their manifest order; new files follow,
    sorted; removed ones are gone. Kind, mode, time, data, symlink target and hard links
    come from the folder, owners and device nodes from the folder when it can hold them
    (else from the manifest). The same folder gives the same bytes.

    Raises:
        ConfigError: no manifest, a missing archive folder, a compression this harness cannot
            write (bzip2, lzma, lzo: give ``compression_method``), or unreadable files.
    """
    records = load_manifest(folder)
    if compression_method is not None and compression_method not in compression.METHODS:
        raise ConfigError(
            f"unknown initramfs compression {compression_method!r}; choose one of: "
            f"{', '.join(compression.METHODS)}"
        )
    pieces: list[tuple[int, str, bytes]] = []  # (stream, method, archive)
    for record in records:
        members = _folder_members(folder / record.folder, record)
        method = record.compression
        if method != "none" and compression_method is not None:
            method = compression_method
        pieces.append((record.stream, method, cpio.write_members(members)))
    if single:
        merged = b"".join(p[2] for p in pieces)
        method = compression_method or next((p[1] for p in pieces if p[1] != "none"), "none")
        pieces = [(0, method, merged)]
    image = _join_segments(pieces, level)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(image)
    log.info("repacked %s into %s (%d bytes)", folder, output, len(image))
    return output


@dataclass(frozen=True)
class ArchiveRecord:
    """One archive as the manifest of an extracted folder describes it."""

    folder: str
    compression: str
    stream: int
    names: tuple[str, ...]  # member names as the archive wrote them, in its order
    owners: Mapping[str, tuple[int, int]]  # owners extract could not give the files
    devices: Mapping[str, tuple[int, int, int]]  # placeholders: path -> (mode, major, minor)


def load_manifest(folder: Path) -> list[ArchiveRecord]:
    """The archives of a folder :func:`extract` made, in image order.

    Raises:
        ConfigError: no manifest, or one this version cannot read.
    """
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"repack: {folder} has no {MANIFEST}; give a folder made by "
            "`bootharness initramfs extract`"
        ) from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"repack: cannot read {path}: {error}") from None
    try:
        if manifest["format"] != _MANIFEST_FORMAT:
            raise ValueError(f"format {manifest['format']!r}")
        return [
            ArchiveRecord(
                folder=str(record["folder"]),
                compression=str(record["compression"]),
                stream=int(record["stream"]),
                names=tuple(str(name) for name in record["names"]),
                owners={
                    str(p): (int(o[0]), int(o[1])) for p, o in record["kept"]["owners"].items()
                },
                devices={
                    str(p): (int(d[0]), int(d[1]), int(d[2]))
                    for p, d in record["kept"]["devices"].items()
                },
            )
            for record in manifest["segments"]
        ]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise ConfigError(f"repack: {path} is not a manifest this version reads: {error}") from None


def _join_segments(pieces: Sequence[tuple[int, str, bytes]], level: int | None) -> bytes:
    """Compress each stream and lay the segments out as the kernel reads them: every segment
    at a 4-byte boundary (uncompressed archives are 512-byte padded already)."""
    out = bytearray()
    index = 0
    while index < len(pieces):
        stream, method, archive = pieces[index]
        parts = [archive]
        index += 1
        while index < len(pieces) and pieces[index][0] == stream and method != "none":
            parts.append(pieces[index][2])
            index += 1
        payload = b"".join(parts)
        out += b"\0" * (-len(out) % 4)
        if method == "none":
            out += payload
            continue
        if method not in compression.METHODS:
            raise ConfigError(
                f"repack: this harness cannot write {method} streams; give a compression "
                f"(-c) among {', '.join(compression.METHODS)}"
            )
        chosen = level if level is not None else REPACK_LEVELS.get(method)
        out += compression.compress(payload, method, level=chosen)
        if method == "lz4" and index < len(pieces):
            out += b"\0" * 4  # a legacy lz4 stream has no end: zeros tell the kernel
    return bytes(out)


def _folder_members(root: Path, record: ArchiveRecord) -> list[Member]:
    if not root.is_dir():
        raise ConfigError(f"repack: archive folder {root} is missing")
    names, owners, devices = record.names, record.owners, record.devices
    where = str(root)
    on_disk = sorted(_walk(root))
    existing = set(on_disk)
    order = [n for n in names if _path_of(n) in existing or _path_of(n) == ""]
    order_paths = {_path_of(n) for n in order}
    order += [p for p in on_disk if p not in order_paths]
    infos: dict[str, os.stat_result] = {}
    for name in order:
        path = _path_of(name)
        infos[name] = os.lstat(root / path) if path else os.lstat(root)
    # Hard links: the folder's inode groups; data goes with the last link, as GNU cpio does.
    groups: dict[tuple[int, int], list[str]] = {}
    for name, info in infos.items():
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            groups.setdefault((info.st_dev, info.st_ino), []).append(name)
    last_link = {names_[-1] for names_ in groups.values()}
    link_count = {name: len(g) for g in groups.values() for name in g}
    subdirs: dict[str, int] = {}
    for name, info in infos.items():
        if stat.S_ISDIR(info.st_mode):
            parent = posixpath.dirname(_path_of(name)) if _path_of(name) else None
            if parent is not None:
                subdirs[parent] = subdirs.get(parent, 0) + 1
    members: list[Member] = []
    inode_of: dict[tuple[int, int], int] = {}
    for number, name in enumerate(order, start=1):
        path = _path_of(name)
        info = infos[name]
        mode = info.st_mode
        data = b""
        rdev = (0, 0)
        nlink = 1
        if stat.S_ISDIR(mode):
            nlink = 2 + subdirs.get(path, 0)
        elif stat.S_ISLNK(mode):
            data = os.fsencode(os.readlink(root / path))
        elif stat.S_ISREG(mode):
            device = devices.get(path)
            if device is not None and info.st_size == 0:
                mode, rdev = device[0], (device[1], device[2])
            else:
                nlink = link_count.get(name, 1)
                if nlink == 1 or name in last_link:
                    data = (root / path).read_bytes()
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
        else:
            raise ConfigError(f"{where}: {path} is a fifo or socket; an initramfs cannot hold it")
        ino = number
        if nlink > 1 and stat.S_ISREG(mode):
            ino = inode_of.setdefault((info.st_dev, info.st_ino), number)
        uid, gid = info.st_uid, info.st_gid
        if path in owners:
            uid, gid = owners[path]
        elif os.geteuid() != 0:
            uid = gid = 0  # files of a non-root user's folder belong to root in the image
        members.append(
            Member(
                name=name,
                mode=mode,
                uid=uid,
                gid=gid,
                nlink=nlink,
                mtime=_mtime(info),
                ino=ino,
                rdev=rdev,
                data=data,
            )
        )
    return members


def _path_of(name: str) -> str:
    return Member(name, 0).path


def _walk(root: Path) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath).relative_to(root)
        for name in [*dirnames, *filenames]:
            yield (base / name).as_posix() if str(base) != "." else name


def _mtime(info: os.stat_result) -> int:
    """The file's time, clamped to $SOURCE_DATE_EPOCH when set (reproducible builds)."""
    stamp = int(info.st_mtime)
    if os.environ.get("SOURCE_DATE_EPOCH", "").strip():
        stamp = min(stamp, cpio.source_date_epoch())
    return max(0, min(stamp, 0xFFFFFFFF))


# ---------------------------------------------------------------------------- overlay

OverlayFiles = Mapping[str, "Path | bytes | Entry"]


def overlay(image: Path, files: OverlayFiles, output: Path, *, method: str = "none") -> Path:
    """Write ``image`` plus one more archive holding ``files`` to ``output``.

    ``files`` maps paths inside the image to host paths (files, folders, symlinks), bytes
    (mode 0644) or :class:`~harness.image.cpio.Entry` objects (any kind and mode). Paths go
    through the image's own symlinks (``lib/modules/...`` lands in ``usr/lib/modules/...``
    when ``lib`` is a link), parents the image lacks are added (0755), and folders it has are
    left alone. The archive starts at a 4-byte boundary after the image, uncompressed unless
    ``method`` says otherwise.

    Raises:
        ConfigError: unreadable image, a bad path, or a missing host file.
    """
    archive = overlay_archive(image, files, method=method)
    data = _read_image(image)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data + b"\0" * (-len(data) % 4) + archive)
    return output


def overlay_archive(image: Path, files: OverlayFiles, *, method: str = "none") -> bytes:
    """The archive :func:`overlay` appends to ``image`` (deterministic: $SOURCE_DATE_EPOCH
    or 0 as every member's time).

    Raises:
        ConfigError: unreadable image, a bad path, or a missing host file.
    """
    data = _read_image(image)
    try:
        segments = read_segments(data)
    except ValueError as error:
        raise ConfigError(f"{image}: not an initramfs the kernel would unpack: {error}") from None
    base: dict[str, Member] = {}
    for segment in segments:
        for member in segment.members:
            if member.path:
                base[member.path] = member
    archive = cpio.write_members(overlay_members(base, files))
    if method != "none":
        archive = compression.compress(archive, method, level=REPACK_LEVELS.get(method))
    return archive


def overlay_members(base: Mapping[str, Member], files: OverlayFiles) -> list[Member]:
    """The members of an overlay archive for an image whose paths are ``base``."""
    entries: list[Entry] = []
    for archive_path, source in sorted(files.items()):
        path = archive_path.strip("/")
        try:
            if isinstance(source, Entry):
                entries.append(Entry(path, source.kind, source.mode, source.data, source.rdev))
            elif isinstance(source, bytes):
                entries.append(Entry.file(path, source))
            else:
                entries += _host_entries(path, source)
        except ValueError as error:
            raise ConfigError(f"overlay file {archive_path!r}: {error}") from None
    mtime = cpio.source_date_epoch()
    out: list[Member] = []
    added: set[str] = set()
    for entry in entries:
        path = _resolve(base, entry.path)
        parent = posixpath.dirname(path)
        missing: list[str] = []
        while parent and parent not in added:
            known = base.get(parent)
            if known is not None and known.kind is EntryKind.DIR:
                break
            if known is not None:
                raise ConfigError(
                    f"overlay file {entry.path!r}: {parent!r} is a "
                    f"{(known.kind or EntryKind.FILE).name.lower()} in the image, not a folder"
                )
            missing.append(parent)
            parent = posixpath.dirname(parent)
        for folder in reversed(missing):
            out.append(Member(folder, stat.S_IFDIR | 0o755, nlink=2, mtime=mtime))
            added.add(folder)
        out.append(
            Member(
                path,
                entry.kind.value | entry.mode,
                nlink=2 if entry.kind is EntryKind.DIR else 1,
                mtime=mtime,
                rdev=entry.rdev,
                data=entry.data,
            )
        )
        added.add(path)
    return [
        Member(m.name, m.mode, m.uid, m.gid, m.nlink, m.mtime, i, m.dev, m.rdev, m.data)
        for i, m in enumerate(out, start=1)
    ]


def _resolve(base: Mapping[str, Member], path: str) -> str:
    """``path`` with every parent that is a symlink in the image replaced by its target."""
    parts = path.split("/")
    resolved: list[str] = []
    hops = 0
    while parts:
        resolved.append(parts.pop(0))
        if not parts:
            break
        current = "/".join(resolved)
        member = base.get(current)
        if member is None or member.kind is not EntryKind.SYMLINK:
            continue
        hops += 1
        if hops > _SYMLINK_HOPS:
            raise ConfigError(f"overlay file {path!r}: too many symlinks in the image")
        target = member.data.decode("utf-8", "surrogateescape")
        joined = (
            target.lstrip("/")
            if target.startswith("/")
            else posixpath.join(posixpath.dirname(current), target)
        )
        normal = posixpath.normpath(joined)
        if normal.startswith(".."):
            raise ConfigError(f"overlay file {path!r}: {current} points outside the image")
        parts = ([] if normal == "." else normal.split("/")) + parts
        resolved = []
    return "/".join(resolved)


def _host_entries(path: str, source: Path) -> list[Entry]:
    if not source.exists() and not source.is_symlink():
        raise ConfigError(f"overlay file {path!r}: source {source} does not exist; fix the path")
    info = source.lstat()
    if stat.S_ISLNK(info.st_mode):
        return [Entry.symlink(path, os.readlink(source))]
    if stat.S_ISDIR(info.st_mode):
        entries = [Entry.dir(path)]
        for child in sorted(source.iterdir()):
            entries += _host_entries(f"{path}/{child.name}", child)
        return entries
    mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
    return [Entry.file(path, source.read_bytes(), mode=mode)]


def initramfs_tools_script(
    image: Path, phase: str, name: str, script: str
) -> dict[str, Path | bytes | Entry]:
    """Overlay files that add an initramfs-tools boot script to ``scripts/<phase>/``.

    initramfs-tools runs a phase's scripts only through the ``ORDER`` file generated when the
    image was built, so the script alone would never run: the overlay also replaces ORDER
    with the image's own plus the new script's two lines.

    Raises:
        ConfigError: the image has no ``scripts/<phase>/ORDER`` (not an initramfs-tools image,
            or a phase it does not have), or a bad name.
    """
    if not name or "/" in name or name in (".", "..", "ORDER"):
        raise ConfigError(f"initramfs-tools script name {name!r}: give a plain file name")
    order_path = f"scripts/{phase}/ORDER"
    order = b""
    for segment in read_segments(_read_image(image)):
        for member in segment.members:
            if member.path == order_path and member.kind is EntryKind.FILE:
                order = member.data  # the last archive's wins, as in the kernel
    if not order:
        raise ConfigError(
            f"{image} has no {order_path}: not an initramfs-tools image, or no {phase!r} phase"
        )
    line = f'/scripts/{phase}/{name} "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
    return {
        f"scripts/{phase}/{name}": Entry.file(f"scripts/{phase}/{name}", script.encode(), 0o755),
        order_path: Entry.file(order_path, order + line.encode(), 0o644),
    }
