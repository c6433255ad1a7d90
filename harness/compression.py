"""Compress and decompress initramfs images in the formats the kernel can unpack.

Output is deterministic: the same bytes, method and level give the same image, so cached
images keep their content hash. Each format is produced the way the kernel's own decoder
wants it:

* gzip: no file name and mtime 0 (so the output does not depend on when it was built).
* xz: CRC32 integrity check, because the kernel's xz decoder does not verify CRC64.
* zstd: the ``zstd`` program, level 19 by default (as the kernel's ``usr/Makefile``).
* lz4: the ``lz4`` program in the *legacy* format (``lz4 -l``): the only one the kernel's
  ``unlz4`` reads.

An initramfs is a sequence of segments (uncompressed cpio, compressed cpio, zero padding),
and the kernel continues after each compressed stream at the byte where that stream ended.
:func:`decompress_stream` does the same and reports how many bytes a stream used:

* gzip, xz, bzip2 and lzma streams carry their own end, so anything may follow them.
* A zstd frame is measured by walking its block headers, as the kernel does with
  ``zstd_find_frame_compressed_size``, so anything may follow it too.
* A legacy lz4 stream has no end marker: it is a run of ``[u32 size][block]`` records, and
  it ends here where no record can follow (see :func:`_lz4_legacy_end`). The kernel's
  initramfs unpacker is stricter: it stops only at the end of the data or at four zero
  bytes, and reads any other four bytes as one more block. So in an initramfs an lz4
  stream must be last or followed by zero padding; :func:`lz4_end_is_kernel_safe` checks
  that, and :func:`harness.image.cpio.read_archive` enforces it.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import re
import shlex
import subprocess
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from harness.outcome import ConfigError, InfraError
from harness.tools import require

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("gzip", "xz", "zstd", "lz4", "none")

KERNEL_CONFIG_OPTION: dict[str, str | None] = {
    "gzip": "CONFIG_RD_GZIP",
    "xz": "CONFIG_RD_XZ",
    "zstd": "CONFIG_RD_ZSTD",
    "lz4": "CONFIG_RD_LZ4",
    "none": None,
}

# (lowest, highest, default) compression level per method. zstd stops at 19: higher levels
# need --ultra and windows larger than a small guest should have to allocate at boot.
LEVELS: dict[str, tuple[int, int, int]] = {
    "gzip": (1, 9, 9),
    "xz": (0, 9, 6),
    "zstd": (1, 19, 19),
    "lz4": (1, 12, 9),
}

# When a kernel lacks the requested method, suggest the one it unpacks fastest
# (measured under TCG): lz4, then gzip and zstd, then xz.
_PREFERENCE = ("lz4", "gzip", "zstd", "xz")

# Longer than the kernel's two-byte magics (lib/decompress.c) so that random data is less
# likely to be taken for a compressed stream; every one of these also matches the kernel's.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
    (b"070701", "none"),
    (b"070702", "none"),
)
_LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"
_CPIO_ODC_MAGIC = b"070707"

_LZ4_LEGACY_MAGIC = 0x184C2102
# The legacy format compresses 8 MiB per block; LZ4_COMPRESSBOUND of that is the largest
# size a block record can honestly claim.
_LZ4_LEGACY_BLOCK = 8 << 20
_LZ4_MAX_RECORD = _LZ4_LEGACY_BLOCK + _LZ4_LEGACY_BLOCK // 255 + 16

_NON_ZERO = re.compile(rb"[^\x00]")


@dataclass(frozen=True)
class Stream:
    """One decompressed stream: its method, its output, and how many input bytes it used."""

    method: str
    data: bytes
    consumed: int


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(
            f"unknown initramfs compression {method!r}; choose one of: {', '.join(METHODS)}"
        )


def _level(method: str, level: int | None) -> int:
    low, high, default = LEVELS[method]
    if level is None:
        return default
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ConfigError(
            f"compression level {level!r} is out of range for {method}: "
            f"use an integer from {low} to {high} (default {default})"
        )
    return level


def _run(argv: list[str], data: bytes, *, what: str, on_failure: type[Exception]) -> bytes:
    """Run a filter program on ``data`` and return its output.

    Raises ``on_failure`` with the command line, exit status and stderr when the program
    fails, and InfraError when it cannot be started at all.
    """
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, check=True)
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace").strip() or "(no stderr)"
        raise on_failure(
            f"{what} failed: `{shlex.join(argv)}` exited with status {exc.returncode}: {stderr}"
        ) from exc
    except OSError as exc:
        raise InfraError(f"{what} failed: could not run `{shlex.join(argv)}`: {exc}") from exc
    return proc.stdout


def compress(data: bytes, method: str, *, level: int | None = None) -> bytes:
    """Compress ``data`` (normally a cpio archive) for the kernel; deterministic.

    ``method`` is one of :data:`METHODS`; ``"none"`` returns ``data`` unchanged. ``level``
    defaults per method (see :data:`LEVELS`) and is ignored for ``"none"``.

    Raises:
        ConfigError: unknown method or level out of range.
        MissingToolError: the ``zstd`` or ``lz4`` program is not installed.
        InfraError: the compressor program failed.
    """
    _check_method(method)
    if method == "none":
        return bytes(data)
    lvl = _level(method, level)
    if method == "gzip":
        return gzip.compress(data, compresslevel=lvl, mtime=0)
    if method == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, preset=lvl)
    if method == "zstd":
        argv = [require("zstd"), "-q", f"-{lvl}", "-c"]
    else:
        argv = [require("lz4"), "-q", "-l", f"-{lvl}", "-c"]
    return _run(argv, data, what=f"{method} compression", on_failure=InfraError)


def detect(data: bytes, offset: int = 0) -> str:
    """Name the format of the data at ``offset`` from its magic bytes.

    Returns one of ``"gzip" "xz" "zstd" "lz4" "bzip2" "lzma" "lzo"``, or ``"none"`` for an
    uncompressed newc cpio archive.

    Raises:
        ValueError: saying the offset and the bytes found, when no format matches, or when
            the format is one the kernel cannot unpack (lz4 frame format, odc cpio).
    """
    head = bytes(data[offset : offset + 8])
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    if head.startswith(_LZ4_FRAME_MAGIC):
        raise ValueError(
            f"lz4 frame format at offset {offset}: the kernel only unpacks the legacy lz4 "
            "format; recompress with `lz4 -l`"
        )
    if head.startswith(_CPIO_ODC_MAGIC):
        raise ValueError(
            f"old portable (odc, 070707) cpio archive at offset {offset}: the kernel only "
            "reads newc; recreate it with `cpio -o -H newc`"
        )
    if not head:
        raise ValueError(f"no data at offset {offset}: expected a cpio archive or compressed data")
    raise ValueError(
        f"unknown data at offset {offset}: found {head!r}, which is neither a newc cpio "
        "archive (070701) nor a compressed stream the kernel knows "
        "(gzip, xz, zstd, lz4 legacy, bzip2, lzma, lzo)"
    )


def decompress(data: bytes) -> bytes:
    """Decompress the one stream at the start of ``data``; bytes after it are ignored.

    Uncompressed cpio data (``"none"``) is returned unchanged.

    Raises:
        ValueError: unknown format, corrupt or truncated stream.
        MissingToolError: the ``zstd`` or ``lz4`` program is not installed.
    """
    if detect(data) == "none":
        return bytes(data)
    return decompress_stream(data).data


def decompress_stream(data: bytes, offset: int = 0) -> Stream:
    """Decompress the one compressed stream that starts at ``offset`` of ``data``.

    The result says how many bytes the stream used, so a caller can go on with whatever
    follows it, as the kernel does (see the module docstring for the limits of lz4).

    Raises:
        ValueError: not a compressed stream (including uncompressed cpio), corrupt or
            truncated data, unsupported format (lzo); the message names the offset.
        MissingToolError: the ``zstd`` or ``lz4`` program is not installed.
    """
    method = detect(data, offset)
    view = memoryview(data)[offset:]
    if method == "none":
        raise ValueError(f"uncompressed cpio data at offset {offset}, not a compressed stream")
    if method == "lzo":
        raise ValueError(
            f"lzo-compressed data at offset {offset}: reading lzo is not supported; "
            "recompress the image with gzip, xz, zstd or lz4"
        )
    if method == "zstd":
        end = _zstd_frame_end(view, offset)
        out = _run(
            [require("zstd"), "-q", "-d", "-c"],
            bytes(view[:end]),
            what=f"zstd decompression of the frame at offset {offset}",
            on_failure=ValueError,
        )
        return Stream(method, out, end)
    if method == "lz4":
        end = _lz4_legacy_end(view, offset)
        out = _run(
            [require("lz4"), "-q", "-d", "-c"],
            bytes(view[:end]),
            what=f"lz4 decompression of the stream at offset {offset}",
            on_failure=ValueError,
        )
        return Stream(method, out, end)
    return _decompress_stdlib(method, view, offset)


def _decompress_stdlib(method: str, view: memoryview, offset: int) -> Stream:
    decoder: zlib._Decompress | lzma.LZMADecompressor | bz2.BZ2Decompressor
    if method == "gzip":
        decoder = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer, one member
    elif method == "xz":
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif method == "lzma":
        decoder = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    else:
        decoder = bz2.BZ2Decompressor()
    try:
        out = decoder.decompress(view)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise ValueError(f"corrupt {method} stream at offset {offset}: {exc}") from exc
    if not decoder.eof:
        raise ValueError(
            f"truncated {method} stream at offset {offset}: the data ended "
            f"after {len(view)} bytes before the stream did"
        )
    return Stream(method, out, len(view) - len(decoder.unused_data))


def decompress_concatenated(data: bytes) -> bytes:
    """Decompress back-to-back compressed streams, with zero padding allowed between them.

    This is ``gzip -dc`` for several members, generalised to every method: the outputs are
    joined in order. Uncompressed cpio data is not a stream, and is refused (a reader of
    mixed images walks the segments itself, see :func:`harness.image.cpio.read_archive`).

    Raises:
        ValueError: unknown or uncompressed data between streams, corrupt or truncated data.
        MissingToolError: the ``zstd`` or ``lz4`` program is not installed.
    """
    parts: list[bytes] = []
    pos = 0
    while True:
        found = _NON_ZERO.search(data, pos)
        if found is None:
            break
        stream = decompress_stream(data, found.start())
        parts.append(stream.data)
        pos = found.start() + stream.consumed
    return b"".join(parts)


def _zstd_frame_end(view: memoryview, offset: int) -> int:
    """The length of the zstd frame at the start of ``view`` (RFC 8878, section 3.1.1)."""

    def need(end: int) -> None:
        if end > len(view):
            raise ValueError(
                f"truncated zstd frame at offset {offset}: it needs at least {end} bytes "
                f"but only {len(view)} remain"
            )

    need(5)
    descriptor = view[4]
    content_size_flag = descriptor >> 6
    single_segment = (descriptor >> 5) & 1
    if descriptor & 0x08:
        raise ValueError(f"corrupt zstd frame at offset {offset}: reserved header bit is set")
    has_checksum = (descriptor >> 2) & 1
    pos = 5
    pos += 0 if single_segment else 1  # window descriptor
    pos += (0, 1, 2, 4)[descriptor & 3]  # dictionary id
    pos += (single_segment, 2, 4, 8)[content_size_flag]
    while True:
        need(pos + 3)
        header = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
        pos += 3
        block_type = (header >> 1) & 3
        if block_type == 3:
            raise ValueError(
                f"corrupt zstd frame at offset {offset}: reserved block type "
                f"at offset {offset + pos - 3}"
            )
        pos += 1 if block_type == 1 else header >> 3  # an RLE block stores one byte
        if header & 1:
            break
    if has_checksum:
        pos += 4
    need(pos)
    return pos


def _lz4_legacy_end(view: memoryview, offset: int) -> int:
    """The length of the legacy lz4 stream at the start of ``view``.

    The stream is a run of ``[u32 size][block]`` records; a repeated magic starts a
    concatenated stream and is skipped, as the kernel's ``unlz4`` does. It ends where a
    record cannot follow: the end of the data, fewer than four bytes, a zero size (padding),
    a size larger than any block, or a lone size field at the very end (the kernel build
    appends the uncompressed size to a bzImage payload that way).
    """
    pos = 4
    while len(view) - pos > 4:
        size = int.from_bytes(view[pos : pos + 4], "little")
        if size == _LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        if size == 0 or size > _LZ4_MAX_RECORD:
            break
        if pos + 4 + size > len(view):
            raise ValueError(
                f"truncated lz4 stream at offset {offset}: the record at offset "
                f"{offset + pos} claims {size} bytes but only {len(view) - pos - 4} remain"
            )
        pos += 4 + size
    return pos


def lz4_end_is_kernel_safe(data: bytes, end: int) -> bool:
    """Whether the kernel's initramfs unpacker stops where a legacy lz4 stream ends at
    offset ``end`` of ``data``: only if fewer than four bytes or four zero bytes follow;
    any other four bytes it reads as the size of one more block, and fails."""
    following = bytes(data[end : end + 4])
    return len(following) < 4 or following == b"\0\0\0\0"


def check_kernel_supports(method: str, config: Mapping[str, str], *, kernel_name: str) -> None:
    """Refuse an initramfs compression the kernel was built without.

    ``config`` maps option names (``"CONFIG_RD_ZSTD"``) to their values (``"y"``), as read
    from the kernel's ``config-*`` file; an option that is absent counts as not set.
    ``"none"`` is always accepted.

    Raises:
        ConfigError: unknown method, or the kernel's config lacks the method's option; the
            message names the option and suggests a method this kernel does support.
    """
    _check_method(method)
    option = KERNEL_CONFIG_OPTION[method]
    if option is None or config.get(option) == "y":
        return
    supported = [m for m in _PREFERENCE if config.get(KERNEL_CONFIG_OPTION[m] or "") == "y"]
    choices = [*supported, "none"]
    raise ConfigError(
        f"kernel {kernel_name!r} cannot unpack a {method}-compressed initramfs: "
        f"{option} is not set in its config. Use compression = {choices[0]!r} for this "
        f"kernel (it supports: {', '.join(choices)})"
    )
