"""harness.image.cpio: newc writer and reader, checked against GNU cpio."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import compression
from harness.image.cpio import (
    Entry,
    EntryKind,
    list_paths,
    read_archive,
    source_date_epoch,
    write_archive,
)
from harness.outcome import ConfigError

FIELDS = [
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
]


def walk_headers(archive: bytes) -> list[tuple[str, dict[str, int]]]:
    """An independent, minimal newc walker: every member's name, header fields and offsets."""
    headers: list[tuple[str, dict[str, int]]] = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701", f"no header at {pos}"
        fields = {
            f: int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, f in enumerate(FIELDS)
        }
        name_start = pos + 110
        name = archive[name_start : name_start + fields["namesize"] - 1].decode()
        data_start = (name_start + fields["namesize"] + 3) & ~3
        data_end = data_start + fields["filesize"]
        headers.append(
            (name, {"offset": pos, "data_offset": data_start, "end": data_end, **fields})
        )
        pos = (data_end + 3) & ~3
        if name == "TRAILER!!!":
            return headers


# Name lengths and data sizes cover every remainder mod 4, so every padding case occurs.
SAMPLE = [
    Entry.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, mode=0o755),
    Entry.symlink("bin/sh", "busybox"),
    Entry.symlink("sbin/init", "/bin/busybox"),
    Entry.dir("etc", mode=0o700),
    Entry.file("etc/a", b""),
    Entry.file("etc/ab", b"1"),
    Entry.file("etc/abc", b"12"),
    Entry.file("etc/abcd", b"123", mode=0o600),
    Entry.file("etc/abcde", b"1234"),
    Entry.chardev("dev/console", 5, 1),
    Entry.chardev("dev/null", 1, 3, mode=0o666),
    Entry.blockdev("dev/vda", 254, 0, mode=0o660),
    Entry.file("usr/lib/modules/x/kernel/drivers/block/virtio_blk.ko", b"module" * 7),
]


def by_path(entries: list[Entry]) -> dict[str, Entry]:
    return {e.path: e for e in entries}


def test_round_trip_every_kind() -> None:
    back = by_path(read_archive(write_archive(SAMPLE)))
    for entry in SAMPLE:
        assert back[entry.path] == entry
    assert back["dev/console"].kind is EntryKind.CHARDEV
    assert back["dev/console"].rdev == (5, 1)
    assert back["dev/vda"].kind is EntryKind.BLOCKDEV
    assert back["dev/vda"].rdev == (254, 0)
    assert back["bin/sh"].target == "busybox"


def test_missing_parents_are_added_and_explicit_dirs_kept() -> None:
    back = by_path(read_archive(write_archive(SAMPLE)))
    added = set(back) - {e.path for e in SAMPLE}
    assert added == {
        "bin",
        "sbin",
        "dev",
        "usr",
        "usr/lib",
        "usr/lib/modules",
        "usr/lib/modules/x",
        "usr/lib/modules/x/kernel",
        "usr/lib/modules/x/kernel/drivers",
        "usr/lib/modules/x/kernel/drivers/block",
    }
    for path in added:
        assert back[path] == Entry.dir(path, mode=0o755)
    assert back["etc"].mode == 0o700


def test_sorted_bytewise_with_sequential_inodes() -> None:
    entries = [Entry.file("a/b", b"x"), Entry.file("a-b", b"y"), Entry.file("B", b"z")]
    archive = write_archive(reversed(entries))
    assert list_paths(archive) == ["B", "a", "a-b", "a/b"]
    headers = walk_headers(archive)[:-1]
    assert [h["ino"] for _, h in headers] == [1, 2, 3, 4]


def test_header_fields() -> None:
    headers = dict(walk_headers(write_archive(SAMPLE, mtime=1234)))
    trailer = headers.pop("TRAILER!!!")
    assert trailer["nlink"] == 1 and trailer["filesize"] == 0
    for name, h in headers.items():
        assert h["uid"] == h["gid"] == 0, name
        assert h["devmajor"] == h["devminor"] == 0, name
        assert h["mtime"] == 1234, name
        is_dir = h["mode"] & 0o170000 == 0o040000
        assert h["nlink"] == (2 if is_dir else 1), name
    assert headers["dev/console"]["mode"] == 0o020600
    assert (headers["dev/console"]["rdevmajor"], headers["dev/console"]["rdevminor"]) == (5, 1)
    assert headers["bin/busybox"]["mode"] == 0o100755
    assert headers["bin/sh"]["mode"] == 0o120777


def test_padding_and_alignment() -> None:
    archive = write_archive(SAMPLE)
    assert len(archive) % 512 == 0
    headers = walk_headers(archive)
    assert headers[-1][0] == "TRAILER!!!"
    for name, h in headers:
        assert h["offset"] % 4 == 0, name
        assert h["data_offset"] % 4 == 0, name
    # Only zero padding after the trailer.
    assert not archive[headers[-1][1]["end"] :].strip(b"\0")


def test_same_bytes_twice() -> None:
    assert write_archive(SAMPLE, mtime=7) == write_archive(list(reversed(SAMPLE)), mtime=7)


def test_source_date_epoch_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert source_date_epoch() == 0
    unset = write_archive(SAMPLE)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert source_date_epoch() == 1700000000
    archive = write_archive(SAMPLE)
    assert archive != unset
    assert archive == write_archive(SAMPLE)
    assert {h["mtime"] for _, h in walk_headers(archive)[:-1]} == {1700000000}
    assert write_archive(SAMPLE, mtime=0) == unset  # the argument wins over the variable


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5", "99999999999"])
def test_bad_source_date_epoch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        write_archive(SAMPLE)


def test_duplicate_path_is_refused() -> None:
    with pytest.raises(ValueError, match="'etc/a'"):
        write_archive([Entry.file("etc/a", b"1"), Entry.file("etc/a", b"2")])


def test_child_of_a_file_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'init'.*file"):
        write_archive([Entry.file("init", b""), Entry.file("init/x", b"")])


@pytest.mark.parametrize(
    "path", ["/bin/sh", "./bin/sh", ".", "", "bin//sh", "bin/", "bin/../sh", "a/./b", "a\0b"]
)
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        Entry.file(path, b"")


def test_bad_entries_are_refused() -> None:
    with pytest.raises(ValueError, match="0o7777"):
        Entry.file("x", b"", mode=0o100644)
    with pytest.raises(ValueError, match="cannot hold data"):
        Entry("d", EntryKind.DIR, data=b"x")
    with pytest.raises(ValueError, match="target"):
        Entry("l", EntryKind.SYMLINK)
    with pytest.raises(ValueError, match="rdev"):
        Entry("f", EntryKind.FILE, rdev=(1, 1))
    with pytest.raises(ValueError, match="mtime"):
        write_archive([], mtime=-1)


# --- GNU cpio interoperability -------------------------------------------------------------


@pytest.fixture
def gnu_cpio() -> str:
    path = shutil.which("cpio")
    if path is None:
        pytest.skip("GNU cpio is not installed (apt-get install cpio)")
    return path


def test_gnu_cpio_lists_exactly_our_paths(gnu_cpio: str) -> None:
    archive = write_archive(SAMPLE)
    out = subprocess.run(
        [gnu_cpio, "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout
    assert out.decode().splitlines() == list_paths(archive)


def test_gnu_cpio_shows_device_numbers(gnu_cpio: str) -> None:
    archive = write_archive(SAMPLE)
    out = subprocess.run(
        [gnu_cpio, "-tv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    devices = {
        m["path"]: (m["type"], int(m["major"]), int(m["minor"]))
        for m in re.finditer(
            r"^(?P<type>[cb])\S+\s.*?(?P<major>\d+),\s+(?P<minor>\d+) .* (?P<path>dev/\S+)$",
            out,
            re.MULTILINE,
        )
    }
    assert devices == {
        "dev/console": ("c", 5, 1),
        "dev/null": ("c", 1, 3),
        "dev/vda": ("b", 254, 0),
    }


def test_gnu_cpio_extracts_files_and_symlinks(gnu_cpio: str, tmp_path: Path) -> None:
    archive = write_archive(SAMPLE)
    # Patterns keep device nodes out of the host's file system.
    subprocess.run(
        [gnu_cpio, "-i", "--quiet", "--no-absolute-filenames", "-d", "bin/*", "etc/*", "sbin/*"],
        input=archive,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    busybox = tmp_path / "bin/busybox"
    assert busybox.read_bytes() == by_path(SAMPLE)["bin/busybox"].data
    assert busybox.stat().st_mode & 0o7777 == 0o755
    assert (tmp_path / "etc/abcd").read_bytes() == b"123"
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    assert os.readlink(tmp_path / "sbin/init") == "/bin/busybox"
    assert not (tmp_path / "dev").exists()


def _gnu_archive(gnu_cpio: str, root: Path, fmt: str) -> bytes:
    names = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, check=True
    ).stdout.splitlines()
    return subprocess.run(
        [gnu_cpio, "-o", "--quiet", "-H", fmt],
        input=b"\n".join(sorted(names)) + b"\n",
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout


@pytest.mark.parametrize("fmt", ["newc", "crc"])
def test_reads_gnu_cpio_archives_with_hard_links(gnu_cpio: str, tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"busybox binary")
    os.link(root / "bin/busybox", root / "bin/sh")
    (root / "bin/ls").symlink_to("busybox")
    archive = _gnu_archive(gnu_cpio, root, fmt)
    assert archive.startswith(b"070702" if fmt == "crc" else b"070701")
    back = by_path(read_archive(archive))
    # "./bin" is stored by GNU cpio; "." itself is dropped.
    assert set(back) == {"bin", "bin/busybox", "bin/sh", "bin/ls"}
    assert back["bin/sh"].data == back["bin/busybox"].data == b"busybox binary"
    assert back["bin/ls"].target == "busybox"


def test_crc_checksum_is_verified(gnu_cpio: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "file").write_bytes(b"payload")
    archive = _gnu_archive(gnu_cpio, root, "crc")
    corrupt = archive.replace(b"payload", b"paylobd")
    with pytest.raises(ValueError, match="checksum of 'file'"):
        read_archive(corrupt)


# --- concatenated images -------------------------------------------------------------------

EARLY = [Entry.file("kernel/x86/microcode/GenuineIntel.bin", b"\x01\x00\x00\x00" * 100)]


@pytest.mark.parametrize("method", compression.METHODS)
def test_early_uncompressed_then_compressed_main(method: str) -> None:
    early, main = write_archive(EARLY), write_archive(SAMPLE)
    # Distro images pad between segments; the kernel skips zero bytes there.
    image = early + b"\0" * 512 + compression.compress(main, method) + b"\0" * 100
    assert read_archive(image) == read_archive(early) + read_archive(main)


@pytest.mark.parametrize("method", compression.METHODS)
def test_three_segments(method: str) -> None:
    first, second, third = write_archive(EARLY), write_archive(SAMPLE), write_archive(EARLY)
    image = first + compression.compress(second, method)
    image += b"\0" * (8 + -len(image) % 4)  # the next archive must start 4-byte aligned
    image += third
    paths = list_paths(image)
    assert paths == list_paths(first) + list_paths(second) + list_paths(third)


def test_compressed_stream_of_two_archives() -> None:
    # The kernel's cpio parser restarts after a trailer inside one decompressed stream.
    inner = write_archive(EARLY) + write_archive(SAMPLE)
    image = compression.compress(inner, "gzip")
    assert list_paths(image) == list_paths(write_archive(EARLY)) + list_paths(write_archive(SAMPLE))


# --- errors ------------------------------------------------------------------------------


def test_truncated_archives_are_refused() -> None:
    archive = write_archive(SAMPLE)
    trailer_offset = walk_headers(archive)[-1][1]["offset"]
    for cut in (50, 110, 115, 300, trailer_offset, trailer_offset + 20):
        with pytest.raises(ValueError, match="offset"):
            read_archive(archive[:cut])


def test_truncated_compressed_archive_is_refused() -> None:
    image = compression.compress(write_archive(SAMPLE), "gzip")
    with pytest.raises(ValueError, match="truncated gzip"):
        read_archive(image[: len(image) // 2])


def test_garbage_names_offset_and_bytes() -> None:
    archive = write_archive(EARLY)
    with pytest.raises(ValueError, match=rf"offset {len(archive)}: found b'GARBAGE!'"):
        read_archive(archive + b"GARBAGE!")


def test_garbage_inside_compressed_segment() -> None:
    early = write_archive(EARLY)
    image = write_archive(EARLY) + compression.compress(early + b"junkjunk", "xz")
    where = f"offset {len(early)} of the xz segment that starts at offset {len(early)}"
    with pytest.raises(ValueError, match=f"bad cpio magic at {where}: found b'junkjunk'"):
        read_archive(image)


def test_bad_hex_field_is_named() -> None:
    archive = bytearray(write_archive(EARLY))
    archive[6 + 8 * 6 : 6 + 8 * 7] = b"0000XYZ0"  # the filesize field of the first header
    with pytest.raises(ValueError, match="field filesize"):
        read_archive(bytes(archive))


@pytest.mark.parametrize("type_bits", ["1", "C"])  # FIFO, socket
def test_unknown_file_type_is_refused(type_bits: str) -> None:
    archive = write_archive([Entry.file("f", b"x")])
    mode_field = f"{0o100644:08X}".encode()
    patched = archive.replace(mode_field, f"{(int(type_bits, 16) << 12) | 0o644:08X}".encode(), 1)
    assert patched != archive
    with pytest.raises(ValueError, match=r"'f'.*file type"):
        read_archive(patched)


def test_misaligned_archive_is_refused() -> None:
    early = write_archive(EARLY)
    segment = compression.compress(early, "gzip")
    image = segment + b"\0" * (4 + (1 - len(segment)) % 4)  # the archive starts at 4n + 1
    start = len(image)
    image += early
    assert start % 4 == 1
    assert list_paths(image[:start]) == list_paths(early)
    with pytest.raises(ValueError, match=rf"broken padding.*offset {start}, .*multiple of 4"):
        read_archive(image)


def test_misaligned_segment_after_an_archive_is_refused() -> None:
    early = write_archive(EARLY)
    for padding in (1, 2, 3):
        image = early + b"\0" * padding + compression.compress(early, "gzip")
        with pytest.raises(ValueError, match=f"broken padding.*offset {len(early) + padding}"):
            read_archive(image)
    assert list_paths(early + b"\0" * 4 + compression.compress(early, "gzip")) == 2 * list_paths(
        early
    )


def test_misaligned_archive_inside_compressed_segment_is_refused() -> None:
    early = write_archive(EARLY)
    image = compression.compress(early + b"\0" * 3 + early, "zstd")
    with pytest.raises(ValueError, match=f"broken padding.*offset {len(early) + 3} of the zstd"):
        read_archive(image)


def test_lz4_segment_followed_by_an_archive_is_refused() -> None:
    # The kernel cannot tell where a legacy lz4 stream ends unless zeros follow it.
    early = write_archive(EARLY)
    segment = compression.compress(early, "lz4")
    pad = b"\0" * (-len(segment) % 4)
    with pytest.raises(ValueError, match=rf"lz4 segment at offset 0 .* offset {len(segment)}"):
        read_archive(segment + pad + early)
    assert list_paths(segment + pad + b"\0" * 4 + early) == 2 * list_paths(early)
