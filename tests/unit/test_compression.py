"""harness.compression: kernel-compatible initramfs compression."""

from __future__ import annotations

import bz2
import gzip
import lzma
import random

import pytest

from harness import compression
from harness.compression import (
    KERNEL_CONFIG_OPTION,
    METHODS,
    check_kernel_supports,
    compress,
    decompress,
    decompress_concatenated,
    decompress_stream,
    detect,
)
from harness.image.cpio import Entry, write_archive
from harness.outcome import ConfigError, MissingToolError

COMPRESSED = [m for m in METHODS if m != "none"]


def payload(seed: int, size: int = 50_000) -> bytes:
    """Half text (compressible), half random bytes (not), so every block type occurs."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(["init", "busybox", "modprobe", "virtio"]) for _ in range(size))
    return text.encode()[: size // 2] + rng.randbytes(size // 2)


ARCHIVE = write_archive([Entry.file("init", payload(1), mode=0o755)], mtime=0)


@pytest.mark.parametrize("method", COMPRESSED)
def test_round_trip(method: str) -> None:
    data = payload(2)
    packed = compress(data, method)
    assert packed != data
    assert detect(packed) == method
    assert decompress(packed) == data


def test_none_is_identity() -> None:
    assert compress(ARCHIVE, "none") == ARCHIVE
    assert detect(ARCHIVE) == "none"
    assert decompress(ARCHIVE) == ARCHIVE


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method: str) -> None:
    assert compress(ARCHIVE, method) == compress(bytes(ARCHIVE), method)


@pytest.mark.parametrize("method", COMPRESSED)
def test_empty_input(method: str) -> None:
    assert decompress(compress(b"", method)) == b""


@pytest.mark.parametrize("method", COMPRESSED)
def test_levels(method: str) -> None:
    low, high, _default = compression.LEVELS[method]
    data = payload(3)
    for level in (low, high):
        assert decompress(compress(data, method, level=level)) == data
    for bad in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"{bad}.*{method}"):
            compress(data, method, level=bad)


def test_unknown_method() -> None:
    with pytest.raises(ConfigError, match=r"'brotli'.*gzip, xz, zstd, lz4, none"):
        compress(b"", "brotli")


def test_gzip_header_has_no_name_or_time() -> None:
    packed = compress(ARCHIVE, "gzip")
    assert packed[3] & 0x08 == 0  # FNAME flag
    assert packed[4:8] == b"\0\0\0\0"  # MTIME


def test_xz_uses_crc32() -> None:
    packed = compress(ARCHIVE, "xz")
    assert packed[6:8] == b"\x00\x01"  # stream flags: check type 1 is CRC32


def test_lz4_is_legacy_format() -> None:
    assert compress(ARCHIVE, "lz4")[:4] == b"\x02\x21\x4c\x18"


def test_lz4_multiple_blocks() -> None:
    # Legacy lz4 cuts the input in 8 MiB blocks; 9 MiB makes two block records.
    data = payload(4, 1 << 16) * 144
    packed = compress(data, "lz4", level=1)
    stream = decompress_stream(packed + b"\0" * 4)
    assert stream.data == data
    assert stream.consumed == len(packed)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bz2.compress(b"x"), "bzip2"),
        (lzma.compress(b"x", format=lzma.FORMAT_ALONE), "lzma"),
        (b"\x89LZO\x00\r\n\x1a\n", "lzo"),
        (b"070701" + b"0" * 104, "none"),
        (b"070702" + b"0" * 104, "none"),
    ],
)
def test_detect_other_formats(data: bytes, expected: str) -> None:
    assert detect(data) == expected


@pytest.mark.parametrize("method", ["bzip2", "lzma"])
def test_reads_bzip2_and_lzma(method: str) -> None:
    if method == "bzip2":
        packed = bz2.compress(ARCHIVE)
    else:
        packed = lzma.compress(ARCHIVE, format=lzma.FORMAT_ALONE)
    stream = decompress_stream(packed + b"trailing")
    assert (stream.method, stream.data, stream.consumed) == (method, ARCHIVE, len(packed))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello world", r"offset 0: found b'hello wo'"),
        (b"", "no data at offset 0"),
        (b"\x04\x22\x4d\x18rest", "legacy"),
        (b"070707" + b"0" * 104, "newc"),
    ],
)
def test_detect_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detect(data)


def test_detect_at_offset() -> None:
    assert detect(b"\0" * 8 + compress(b"x", "gzip"), 8) == "gzip"
    with pytest.raises(ValueError, match="offset 3"):
        detect(b"\0" * 8, 3)


def test_lzo_is_detected_but_not_read() -> None:
    with pytest.raises(ValueError, match=r"lzo.*not supported"):
        decompress(b"\x89LZO\x00\r\n\x1a\n" + b"\0" * 32)


@pytest.mark.parametrize("method", ["gzip", "xz", "zstd"])
def test_stream_followed_by_anything(method: str) -> None:
    packed = compress(ARCHIVE, method)
    stream = decompress_stream(b"\0" * 12 + packed + ARCHIVE, 12)
    assert (stream.method, stream.data, stream.consumed) == (method, ARCHIVE, len(packed))


@pytest.mark.parametrize("trailer", [b"", b"\0\0\0", b"\0" * 4, b"\0" * 4 + b"070701"])
def test_lz4_stream_followed_by_zero_padding(trailer: bytes) -> None:
    packed = compress(ARCHIVE, "lz4")
    stream = decompress_stream(packed + trailer)
    assert (stream.data, stream.consumed) == (ARCHIVE, len(packed))


def test_lz4_stream_ends_where_no_block_can_follow() -> None:
    packed = compress(ARCHIVE, "lz4")
    # "0707" read as a size is larger than any legacy block.
    assert decompress_stream(packed + ARCHIVE).consumed == len(packed)
    # A lone size at the very end: what the kernel build appends to a bzImage payload.
    tail = (60 << 20).to_bytes(4, "little")
    assert decompress_stream(packed + tail).consumed == len(packed)
    small_tail = (1 << 20).to_bytes(4, "little")
    assert decompress_stream(packed + small_tail).data == ARCHIVE


def test_lz4_record_running_past_the_end_is_refused() -> None:
    packed = compress(ARCHIVE, "lz4")
    record = (100).to_bytes(4, "little") + b"x" * 10
    with pytest.raises(ValueError, match=f"record at offset {len(packed)} claims 100 bytes"):
        decompress_stream(packed + record)


@pytest.mark.parametrize(
    ("following", "safe"),
    [(b"", True), (b"\x01\x02\x03", True), (b"\0" * 4 + b"junk", True), (b"0707", False)],
)
def test_lz4_end_is_kernel_safe(following: bytes, safe: bool) -> None:
    packed = compress(ARCHIVE, "lz4")
    assert compression.lz4_end_is_kernel_safe(packed + following, len(packed)) is safe


def test_concatenated_lz4_streams_are_one_stream() -> None:
    # The kernel's unlz4 skips a repeated magic and goes on, so two streams read as one.
    first, second = compress(b"first", "lz4"), compress(b"second", "lz4")
    stream = decompress_stream(first + second)
    assert (stream.data, stream.consumed) == (b"firstsecond", len(first) + len(second))


def test_decompress_concatenated() -> None:
    parts = [payload(i, 3000) for i in range(4)]
    data = (
        compress(parts[0], "gzip")
        + compress(parts[1], "zstd")
        + b"\0" * 5
        + compress(parts[2], "xz")
        + compress(parts[3], "lz4")
        + b"\0" * 8
    )
    assert decompress_concatenated(data) == b"".join(parts)
    assert decompress_concatenated(b"\0" * 16) == b""


def test_decompress_concatenated_refuses_uncompressed_data() -> None:
    with pytest.raises(ValueError, match="uncompressed cpio data at offset 3"):
        decompress_concatenated(b"\0\0\0" + ARCHIVE)


def test_gzip_members_are_separate_streams() -> None:
    data = gzip.compress(b"one", mtime=0) + gzip.compress(b"two", mtime=0)
    assert decompress(data) == b"one"
    assert decompress_concatenated(data) == b"onetwo"


@pytest.mark.parametrize("method", COMPRESSED)
def test_truncated_stream_is_refused(method: str) -> None:
    packed = compress(ARCHIVE, method)
    for cut in (len(packed) // 2, len(packed) - 1):
        with pytest.raises(ValueError, match=method):
            decompress(packed[:cut])


def test_corrupt_zstd_reports_tool_stderr() -> None:
    packed = bytearray(compress(ARCHIVE, "zstd"))
    # Flip bytes in the middle (the frame checksum catches it) but keep the block headers
    # intact, so the frame is still measured and handed to the zstd program.
    middle = len(packed) // 2
    packed[middle : middle + 16] = bytes(b ^ 0xFF for b in packed[middle : middle + 16])
    with pytest.raises(ValueError, match=r"zstd decompression .* exited with status \d+: \S"):
        decompress(bytes(packed))


def test_corrupt_lz4_reports_tool_stderr() -> None:
    # Legacy lz4 has no checksum; a block cut short (with its size record to match) is
    # what makes the decoder fail.
    packed = compress(ARCHIVE, "lz4")
    size = int.from_bytes(packed[4:8], "little")
    short = packed[:4] + (size // 2).to_bytes(4, "little") + packed[8 : 8 + size // 2]
    with pytest.raises(ValueError, match=r"lz4 decompression .* exited with status \d+: \S"):
        decompress(short)


@pytest.mark.parametrize("method", ["zstd", "lz4"])
def test_missing_tool(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingToolError, match=f"apt-get install {method}"):
        compress(b"data", method)


# --- kernel config ----------------------------------------------------------------------

ALL_ON = {option: "y" for option in KERNEL_CONFIG_OPTION.values() if option}


@pytest.mark.parametrize("method", METHODS)
def test_kernel_with_every_method_accepts_all(method: str) -> None:
    check_kernel_supports(method, ALL_ON, kernel_name="debian")


@pytest.mark.parametrize("method", COMPRESSED)
def test_kernel_without_the_option_is_refused(method: str) -> None:
    option = KERNEL_CONFIG_OPTION[method]
    assert option is not None
    for config in ({k: v for k, v in ALL_ON.items() if k != option}, {**ALL_ON, option: "n"}):
        with pytest.raises(ConfigError) as info:
            check_kernel_supports(method, config, kernel_name="tiny")
        message = str(info.value)
        assert option in message
        assert "'tiny'" in message
        # The suggestion is a method this kernel has.
        suggested = message.split("Use compression = ")[1].split("'")[1]
        assert suggested != method
        suggested_option = KERNEL_CONFIG_OPTION[suggested]
        assert suggested_option is None or config.get(suggested_option) == "y"


def test_refusal_suggests_the_only_supported_method() -> None:
    with pytest.raises(ConfigError, match=r"CONFIG_RD_ZSTD.*compression = 'gzip'"):
        check_kernel_supports("zstd", {"CONFIG_RD_GZIP": "y"}, kernel_name="k")


def test_refusal_suggests_none_when_nothing_is_supported() -> None:
    with pytest.raises(ConfigError, match=r"CONFIG_RD_XZ.*compression = 'none'"):
        check_kernel_supports("xz", {}, kernel_name="k")
    check_kernel_supports("none", {}, kernel_name="k")


def test_unknown_method_in_kernel_check() -> None:
    with pytest.raises(ConfigError, match="'lzo'"):
        check_kernel_supports("lzo", ALL_ON, kernel_name="k")
