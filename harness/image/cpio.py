"""Write and read cpio "newc" archives, the format of a Linux initramfs.

The writer is pure and deterministic: the same entries and mtime give the same bytes, so
an image's content hash only changes when its content does. It writes what GNU
``cpio -o -H newc`` writes (upper-case hex fields, 4-byte alignment, a ``TRAILER!!!``
entry, the whole archive padded to 512 bytes), with owner root, sorted paths and inode
numbers that depend only on the sorted order.

The reader reads what the kernel's ``init/initramfs.c`` reads: one or more segments, each an
uncompressed cpio archive or a compressed stream of cpio archives, with zero padding
allowed between segments. Distribution images look like this (an uncompressed "early"
archive with CPU microcode, then the compressed main archive).
"""

from __future__ import annotations

import enum
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from harness import compression
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
BLOCK_SIZE = 512
_U32_MAX = 0xFFFFFFFF

_S_IFMT = 0o170000
_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)
_HEADER_RE = re.compile(rb"07070[12][0-9A-Fa-f]{104}")
_HEX8 = re.compile(rb"[0-9A-Fa-f]{8}")
_NON_ZERO = re.compile(rb"[^\x00]")


class EntryKind(enum.Enum):
    """The file types an initramfs may hold, with their ``S_IFMT`` bits."""

    FILE = 0o100000
    DIR = 0o040000
    SYMLINK = 0o120000
    CHARDEV = 0o020000
    BLOCKDEV = 0o060000


_KIND_BY_BITS = {kind.value: kind for kind in EntryKind}
_DEVICES = (EntryKind.CHARDEV, EntryKind.BLOCKDEV)


def _encode(path: str) -> bytes:
    # surrogateescape: names read from an archive that are not UTF-8 survive a round trip.
    return path.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Entry:
    """One archive member.

    ``path`` is relative and normalised ("bin/busybox", never "/bin", "./bin" or "."),
    ``mode`` holds permission bits only (the type comes from ``kind``), ``data`` is the file
    content or, for a symlink, its target, and ``rdev`` is (major, minor) of a device node.

    Raises:
        ValueError: on construction, for a path, mode, data or rdev that cannot be archived.
    """

    path: str
    kind: EntryKind
    mode: int = 0o644
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        _check_path(self.path)
        if not isinstance(self.kind, EntryKind):
            raise ValueError(f"{self.path!r}: kind must be an EntryKind, not {self.kind!r}")
        if isinstance(self.mode, bool) or not isinstance(self.mode, int):
            raise ValueError(f"{self.path!r}: mode must be an int, not {self.mode!r}")
        if not 0 <= self.mode <= 0o7777:
            raise ValueError(
                f"{self.path!r}: mode {self.mode:#o} has bits outside 0o7777; give permission "
                "bits only (the file type comes from kind)"
            )
        if not isinstance(self.data, bytes):
            raise ValueError(f"{self.path!r}: data must be bytes, not {type(self.data).__name__}")
        if len(self.data) > _U32_MAX:
            raise ValueError(f"{self.path!r}: {len(self.data)} bytes is too large for newc cpio")
        if self.kind in (EntryKind.DIR, *_DEVICES) and self.data:
            raise ValueError(f"{self.path!r}: a {self.kind.name.lower()} entry cannot hold data")
        if self.kind is EntryKind.SYMLINK and not self.data:
            raise ValueError(f"{self.path!r}: a symlink needs a non-empty target")
        major, minor = self.rdev
        if self.kind not in _DEVICES and self.rdev != (0, 0):
            raise ValueError(f"{self.path!r}: only device nodes have an rdev, not {self.rdev}")
        if not (0 <= major <= _U32_MAX and 0 <= minor <= _U32_MAX):
            raise ValueError(f"{self.path!r}: device numbers {self.rdev} are out of range")

    def __repr__(self) -> str:
        # Never dump file contents into a test report or log.
        extra = f", target={self.target!r}" if self.kind is EntryKind.SYMLINK else ""
        if self.kind is EntryKind.FILE:
            extra = f", size={len(self.data)}"
        elif self.kind in _DEVICES:
            extra = f", rdev={self.rdev}"
        return f"Entry({self.path!r}, {self.kind.name}, mode={self.mode:#o}{extra})"

    @property
    def target(self) -> str:
        """A symlink's target. Raises ValueError for other kinds."""
        if self.kind is not EntryKind.SYMLINK:
            raise ValueError(f"{self.path!r} is a {self.kind.name.lower()}, not a symlink")
        return self.data.decode("utf-8", "surrogateescape")

    @classmethod
    def file(cls, path: str, data: bytes, mode: int = 0o644) -> Entry:
        """A regular file."""
        return cls(path, EntryKind.FILE, mode, data)

    @classmethod
    def dir(cls, path: str, mode: int = 0o755) -> Entry:
        """A directory."""
        return cls(path, EntryKind.DIR, mode)

    @classmethod
    def symlink(cls, path: str, target: str) -> Entry:
        """A symbolic link to ``target`` (relative or absolute, stored as given)."""
        return cls(path, EntryKind.SYMLINK, 0o777, _encode(target))

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
        """A character device node, such as ``dev/console`` (5, 1)."""
        return cls(path, EntryKind.CHARDEV, mode, rdev=(major, minor))

    @classmethod
    def blockdev(cls, path: str, major: int, minor: int, mode: int = 0o600) -> Entry:
        """A block device node, such as ``dev/vda`` (254, 0)."""
        return cls(path, EntryKind.BLOCKDEV, mode, rdev=(major, minor))


def _check_path(path: object) -> None:
    if not isinstance(path, str) or not path:
        raise ValueError(f"cpio entry path must be a non-empty string, not {path!r}")
    if path.startswith("/") or path == "." or path.startswith("./"):
        raise ValueError(
            f"cpio entry path {path!r} must be relative without a leading '/' or './' "
            "(write 'bin/busybox', not '/bin/busybox' or './bin/busybox')"
        )
    if "\0" in path:
        raise ValueError(f"cpio entry path {path!r} contains a NUL byte")
    bad = [part for part in path.split("/") if part in ("", ".", "..")]
    if bad:
        raise ValueError(
            f"cpio entry path {path!r} is not normalised: it has an empty, '.' or '..' "
            "component or a trailing '/'"
        )


def source_date_epoch() -> int:
    """The archive timestamp: ``$SOURCE_DATE_EPOCH`` if set, else 0.

    Raises:
        ConfigError: the variable is set to something other than seconds since 1970 that
            fit a cpio mtime field (0 to 4294967295).
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return 0
    if not re.fullmatch(r"[0-9]+", raw) or int(raw) > _U32_MAX:
        raise ConfigError(
            f"environment variable SOURCE_DATE_EPOCH={raw!r} is not a number of seconds "
            f"since 1970 between 0 and {_U32_MAX}; set it to e.g. `git log -1 --format=%ct` "
            "or unset it"
        )
    return int(raw)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _header(
    *,
    ino: int,
    mode: int,
    nlink: int,
    mtime: int,
    filesize: int,
    rdev: tuple[int, int],
    namesize: int,
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, rdev[0], rdev[1], namesize, 0)
    return MAGIC_NEWC + b"".join(b"%08X" % value for value in fields)


def _append_member(out: bytearray, header: bytes, name: bytes, data: bytes) -> None:
    out += header
    out += name
    out += b"\0" * (_align4(len(out)) - len(out))
    out += data
    out += b"\0" * (_align4(len(out)) - len(out))


def write_archive(entries: Iterable[Entry], *, mtime: int | None = None) -> bytes:
    """Build a newc cpio archive; the same inputs always give the same bytes.

    Entries are sorted by path (bytewise), missing parent directories are added with mode
    0o755, every member is owned by root, and the mtime of all members is ``mtime`` or,
    when it is None, :func:`source_date_epoch`.

    Raises:
        ValueError: a path given twice, a path below something that is not a directory,
            or an mtime outside 0 to 4294967295.
        ConfigError: ``$SOURCE_DATE_EPOCH`` is invalid (only when ``mtime`` is None).
    """
    stamp = source_date_epoch() if mtime is None else mtime
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp <= _U32_MAX:
        raise ValueError(f"cpio mtime {stamp!r} must be an int from 0 to {_U32_MAX}")

    by_path: dict[str, Entry] = {}
    for entry in entries:
        if entry.path in by_path:
            raise ValueError(f"duplicate path {entry.path!r} in cpio archive: give each path once")
        by_path[entry.path] = entry
    for path in list(by_path):
        parent = posixpath.dirname(path)
        while parent:
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = Entry.dir(parent)
            elif existing.kind is not EntryKind.DIR:
                raise ValueError(
                    f"cpio entry {path!r} needs {parent!r} to be a directory, but it is "
                    f"a {existing.kind.name.lower()}"
                )
            parent = posixpath.dirname(parent)

    out = bytearray()
    ordered = sorted(by_path.values(), key=lambda e: _encode(e.path))
    for ino, entry in enumerate(ordered, start=1):
        name = _encode(entry.path) + b"\0"
        header = _header(
            ino=ino,
            mode=entry.kind.value | entry.mode,
            nlink=2 if entry.kind is EntryKind.DIR else 1,
            mtime=stamp,
            filesize=len(entry.data),
            rdev=entry.rdev,
            namesize=len(name),
        )
        _append_member(out, header, name, entry.data)
    trailer = TRAILER.encode() + b"\0"
    _append_member(
        out,
        _header(ino=0, mode=0, nlink=1, mtime=0, filesize=0, rdev=(0, 0), namesize=len(trailer)),
        trailer,
        b"",
    )
    # GNU cpio writes whole 512-byte blocks; doing the same keeps images byte-comparable.
    out += b"\0" * (-len(out) % BLOCK_SIZE)
    return bytes(out)


def read_archive(data: bytes) -> list[Entry]:
    """Read every entry of an initramfs image, in archive order.

    ``data`` may hold several segments, as the kernel accepts them: uncompressed newc
    (070701) or crc (070702) archives, compressed streams of such archives (method found by
    magic, see :mod:`harness.compression`), and zero padding between them. Paths are
    normalised ("./bin" becomes "bin", "." is skipped); a path stored in two segments is
    listed twice. Hard links (GNU cpio stores the data with the last link only) all get
    the data.

    Raises:
        ValueError: garbage, truncation, a bad checksum, or a file type that is not a file,
            directory, symlink or device node; the message says where (the offset, and for
            compressed data, the offset within the decompressed segment) and what it found.
        MissingToolError: a zstd or lz4 segment and the program is not installed.
    """
    entries: list[Entry] = []
    pos = 0
    after_archive = False
    while True:
        found = _NON_ZERO.search(data, pos)
        if found is None:
            return entries
        pos = found.start()
        if after_archive:
            _check_aligned(pos, _plain_where, "the segment after a cpio archive")
        method = compression.detect(data, pos)
        if method == "none":
            # The kernel only takes "0" for the start of an archive at a 4-byte boundary of
            # the image; elsewhere it tries to decompress it and fails.
            _check_aligned(pos, _plain_where, "an uncompressed cpio archive")
            members, pos = _read_one_archive(data, pos, _plain_where)
            entries += members
            after_archive = True
            continue
        stream = compression.decompress_stream(data, pos)
        log.debug("%s segment at offset %d: %d bytes", method, pos, stream.consumed)
        end = pos + stream.consumed
        if method == "lz4" and not compression.lz4_end_is_kernel_safe(data, end):
            raise ValueError(
                f"the lz4 segment at offset {pos} is followed at offset {end} by "
                f"{bytes(data[end : end + 8])!r}: a legacy lz4 stream has no end marker, and "
                "the kernel would read those bytes as one more lz4 block and fail; put at "
                "least four zero bytes after it"
            )
        entries += _read_decompressed(stream.data, _segment_where(method, pos))
        pos += stream.consumed
        after_archive = False


def list_paths(data: bytes) -> list[str]:
    """The paths of :func:`read_archive`, in archive order. Raises as it does."""
    return [entry.path for entry in read_archive(data)]


_Where = Callable[[int], str]


def _plain_where(offset: int) -> str:
    return f"offset {offset}"


def _segment_where(method: str, segment: int) -> _Where:
    def where(offset: int) -> str:
        return f"offset {offset} of the {method} segment that starts at offset {segment}"

    return where


def _check_aligned(pos: int, where: _Where, what: str) -> None:
    # The kernel's cpio parser resumes after zero padding only at a 4-byte boundary
    # ("broken padding" otherwise), counted from the start of the image or, inside a
    # compressed segment, from the start of the decompressed data.
    if pos % 4:
        raise ValueError(
            f"broken padding: {what} starts at {where(pos)}, which is not a multiple "
            "of 4; the kernel refuses this, so pad with zeros to a 4-byte boundary"
        )


def _read_decompressed(buf: bytes, where: _Where) -> list[Entry]:
    # Decompressed output goes straight to the kernel's cpio parser: archives and zero
    # padding only, never another compressed stream.
    entries: list[Entry] = []
    pos = 0
    while True:
        found = _NON_ZERO.search(buf, pos)
        if found is None:
            return entries
        pos = found.start()
        _check_aligned(pos, where, "a cpio archive")
        magic = buf[pos : pos + 6]
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise ValueError(
                f"bad cpio magic at {where(pos)}: found {bytes(buf[pos : pos + 8])!r}, "
                "expected b'070701' or b'070702'"
            )
        members, pos = _read_one_archive(buf, pos, where)
        entries += members


def _read_one_archive(buf: bytes, pos: int, where: _Where) -> tuple[list[Entry], int]:
    """Parse members from ``pos`` up to and including the trailer; return them as entries
    (hard links filled in) and the offset just after the trailer."""
    members, end = read_members(buf, pos, where)
    entries: list[Entry] = []
    hard_links: dict[tuple[int, int, int], list[int]] = {}
    for member in members:
        entry = _make_entry(member, where(member.offset))
        if entry is None:
            continue
        if entry.kind is EntryKind.FILE and member.nlink > 1:
            key = (*member.dev, member.ino)
            hard_links.setdefault(key, []).append(len(entries))
        entries.append(entry)
    _fill_hard_links(entries, hard_links)
    return entries, end


@dataclass(frozen=True)
class Member:
    """One archive member exactly as stored: the name as written and every header field.

    :class:`Entry` is what an image *means* (normalised paths, hard links filled in);
    a Member is what the archive *holds*, so an archive read with :func:`read_members` and
    written with :func:`write_members` keeps its names, order, owners, times, inode numbers
    and hard links (GNU cpio stores a hard-linked file's data once, with its last link; the
    other links have no data). ``mode`` includes the file type bits; ``data`` is the file
    content or a symlink's target. ``offset`` is where the header was read (0 for new ones).
    """

    name: str
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    ino: int = 0
    dev: tuple[int, int] = (0, 0)
    rdev: tuple[int, int] = (0, 0)
    data: bytes = b""
    offset: int = 0

    @property
    def path(self) -> str:
        """The normalised path ("" for the archive's root, ``.``)."""
        path = _normalise(self.name)
        return "" if path == "." else path

    @property
    def kind(self) -> EntryKind | None:
        """The file type, or None for one an initramfs cannot hold (fifo, socket)."""
        return _KIND_BY_BITS.get(self.mode & _S_IFMT)

    def __repr__(self) -> str:
        return (
            f"Member({self.name!r}, mode={self.mode:#o}, nlink={self.nlink}, size={len(self.data)})"
        )


def read_members(
    buf: bytes, pos: int = 0, where: _Where = _plain_where
) -> tuple[list[Member], int]:
    """Read one archive that starts at ``pos`` of ``buf`` up to its ``TRAILER!!!``, member
    by member, exactly as stored; returns the members and the offset just after the trailer.

    Raises:
        ValueError: bad magic, header, name, checksum or truncation; the message says where.
    """
    start = pos
    members: list[Member] = []
    while True:
        if pos >= len(buf):
            raise ValueError(
                f"truncated cpio archive: the archive that starts at {where(start)} ends at "
                f"{where(pos)} without a {TRAILER} entry"
            )
        header = buf[pos : pos + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            raise ValueError(
                f"truncated cpio header at {where(pos)}: need {HEADER_SIZE} bytes, "
                f"found {len(header)}"
            )
        fields = _parse_header(header, where(pos))
        namesize = fields["namesize"]
        name_end = pos + HEADER_SIZE + namesize
        if namesize == 0 or name_end > len(buf):
            raise ValueError(
                f"truncated or bad cpio entry name at {where(pos)}: namesize {namesize}, "
                f"{len(buf) - pos - HEADER_SIZE} bytes left"
            )
        raw_name = buf[pos + HEADER_SIZE : name_end]
        if raw_name[-1:] != b"\0":
            raise ValueError(
                f"cpio entry name at {where(pos)} is not NUL-terminated: {bytes(raw_name)!r}"
            )
        name = bytes(raw_name[:-1]).decode("utf-8", "surrogateescape")
        data_start = _align4(name_end)
        data_end = data_start + fields["filesize"]
        if name == TRAILER:
            return members, min(_align4(data_end), len(buf))
        if data_end > len(buf):
            raise ValueError(
                f"truncated cpio data of {name!r} at {where(pos)}: it claims "
                f"{fields['filesize']} bytes, {max(0, len(buf) - data_start)} are left"
            )
        payload = bytes(buf[data_start:data_end])
        if header.startswith(MAGIC_CRC) and fields["mode"] & _S_IFMT == EntryKind.FILE.value:
            total = sum(payload) & _U32_MAX
            if total != fields["check"]:
                raise ValueError(
                    f"bad checksum of {name!r} at {where(pos)}: the header says "
                    f"{fields['check']:#x}, the data sums to {total:#x}"
                )
        members.append(
            Member(
                name=name,
                mode=fields["mode"],
                uid=fields["uid"],
                gid=fields["gid"],
                nlink=fields["nlink"],
                mtime=fields["mtime"],
                ino=fields["ino"],
                dev=(fields["devmajor"], fields["devminor"]),
                rdev=(fields["rdevmajor"], fields["rdevminor"]),
                data=payload,
                offset=pos,
            )
        )
        pos = _align4(data_end)
        if pos > len(buf):
            raise ValueError(f"truncated cpio padding after {name!r} at {where(pos)}")


def write_members(members: Iterable[Member], *, block: int = BLOCK_SIZE) -> bytes:
    """One newc archive holding ``members`` exactly as given (order, names, every field),
    then the trailer, padded to a multiple of ``block`` bytes (512, as GNU cpio pads).

    Nothing is added or sorted: the caller decides the layout (see :func:`write_archive`
    for the normalising writer).

    Raises:
        ValueError: a name that is empty or holds a NUL byte, or a field out of range.
    """
    out = bytearray()
    for member in members:
        if not member.name or "\0" in member.name:
            raise ValueError(f"cpio member name {member.name!r} is empty or holds a NUL byte")
        name = _encode(member.name) + b"\0"
        fields = (
            member.ino,
            member.mode,
            member.uid,
            member.gid,
            member.nlink,
            member.mtime,
            len(member.data),
            *member.dev,
            *member.rdev,
            len(name),
            0,
        )
        if any(not 0 <= value <= _U32_MAX for value in fields):
            raise ValueError(f"cpio member {member.name!r}: a header field is out of range")
        header = MAGIC_NEWC + b"".join(b"%08X" % value for value in fields)
        _append_member(out, header, name, member.data)
    trailer = TRAILER.encode() + b"\0"
    _append_member(
        out,
        _header(ino=0, mode=0, nlink=1, mtime=0, filesize=0, rdev=(0, 0), namesize=len(trailer)),
        trailer,
        b"",
    )
    if block > 1:
        out += b"\0" * (-len(out) % block)
    return bytes(out)


def _parse_header(header: bytes, where: str) -> dict[str, int]:
    if not _HEADER_RE.fullmatch(header):
        magic = bytes(header[:6])
        if magic not in (MAGIC_NEWC, MAGIC_CRC):
            raise ValueError(
                f"bad cpio magic at {where}: found {bytes(header[:8])!r}, "
                "expected b'070701' or b'070702'"
            )
        for index, field in enumerate(_FIELDS):
            raw = bytes(header[6 + 8 * index : 14 + 8 * index])
            if not _HEX8.fullmatch(raw):
                raise ValueError(
                    f"bad cpio header at {where}: field {field} is {raw!r}, not 8 hex digits"
                )
    return {
        field: int(header[6 + 8 * index : 14 + 8 * index], 16)
        for index, field in enumerate(_FIELDS)
    }


def _normalise(name: str) -> str:
    while True:
        if name.startswith("./"):
            name = name[2:]
        elif name.startswith("/"):
            name = name[1:]
        else:
            return name


def _make_entry(member: Member, where: str) -> Entry | None:
    path = member.path
    if not path:
        return None
    kind = member.kind
    if kind is None:
        raise ValueError(
            f"cpio entry {member.name!r} at {where} has mode {member.mode:#o} with file type "
            f"{member.mode & _S_IFMT:#o}, which is not a file, directory, symlink or device node"
        )
    rdev = member.rdev if kind in _DEVICES else (0, 0)
    try:
        return Entry(path, kind, member.mode & 0o7777, member.data, rdev)
    except ValueError as exc:
        raise ValueError(f"cpio entry {member.name!r} at {where}: {exc}") from exc


def _fill_hard_links(entries: list[Entry], groups: dict[tuple[int, int, int], list[int]]) -> None:
    for indices in groups.values():
        stored = [entries[i].data for i in indices if entries[i].data]
        if stored:
            for i in indices:
                if not entries[i].data:
                    entries[i] = replace(entries[i], data=stored[-1])
