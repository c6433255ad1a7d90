"""Editing images someone else built (harness.image.foreign): segments read losslessly,
extract -> repack keeps every segment, name, mode, owner, time, hard link and device node,
the same folder gives the same bytes, nothing is written outside the target folder, and an
overlay lands where the kernel puts it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from harness import compression
from harness.cli.main import main
from harness.image import cpio, foreign
from harness.image.cpio import Entry, EntryKind, Member
from harness.outcome import ConfigError

DIR, FILE, LINK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK


def member(name: str, mode: int, data: bytes = b"", **fields: object) -> Member:
    return Member(name, mode, data=data, mtime=1_700_000_000, **fields)  # type: ignore[arg-type]


EARLY = [
    member(".", DIR | 0o700, nlink=3),
    member("kernel", DIR | 0o755, nlink=3),
    member("kernel/x86", DIR | 0o755, nlink=2),
    member("kernel/x86/GenuineIntel.bin", FILE | 0o644, b"microcode"),
]
BUSYBOX = b"\x7fELF pretend busybox"
MAIN = [
    member(".", DIR | 0o755, nlink=4),
    member("bin", LINK | 0o777, b"usr/bin"),
    member("dev", DIR | 0o755, nlink=2),
    member("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    member("dev/sda", stat.S_IFBLK | 0o660, gid=6, rdev=(8, 0)),
    member("init", FILE | 0o755, b"#!/bin/sh\necho hi\n"),
    member("usr", DIR | 0o755, nlink=3),
    member("usr/bin", DIR | 0o755, nlink=2),
    # GNU cpio's hard links: the data goes with the last link only.
    member("usr/bin/busybox", FILE | 0o755, ino=77, nlink=3),
    member("usr/bin/sh", FILE | 0o755, ino=77, nlink=3),
    member("usr/bin/mount", FILE | 0o755, BUSYBOX, ino=77, nlink=3),
    member("usr/bin/su", FILE | 0o4755, b"setuid", uid=0),
    member("usr/bin/secret", FILE | 0o600, b"x", uid=1000, gid=1000),
]


def distro_image(path: Path) -> Path:
    """An early uncompressed archive, then a gzip main archive: a distribution's layout."""
    early = cpio.write_members(EARLY)
    main_archive = compression.compress(cpio.write_members(MAIN), "gzip")
    path.write_bytes(early + main_archive)
    return path


def fields(m: Member) -> tuple[object, ...]:
    return (m.name, m.mode, m.uid, m.gid, m.nlink, m.mtime, m.rdev, m.data)


def test_segments_are_read_as_stored(tmp_path: Path) -> None:
    segments = foreign.read_segments(distro_image(tmp_path / "i.img").read_bytes())
    assert [(s.offset, s.compression) for s in segments] == [(0, "none"), (1024, "gzip")]
    assert [fields(m) for m in segments[1].members] == [fields(m) for m in MAIN]
    assert foreign.segment_names(segments) == ["early", "main"]


def test_extract_then_repack_keeps_everything(tmp_path: Path) -> None:
    image = distro_image(tmp_path / "i.img")
    assert foreign.extract(image, tmp_path / "x") == ["early", "main"]
    main_dir = tmp_path / "x" / "main"
    assert (main_dir / "bin").readlink() == Path("usr/bin")
    assert os.stat(main_dir / "usr/bin/sh").st_ino == os.stat(main_dir / "usr/bin/mount").st_ino
    assert (main_dir / "usr/bin/busybox").read_bytes() == BUSYBOX
    assert stat.S_IMODE(os.stat(main_dir / "usr/bin/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(tmp_path / "x" / "early").st_mode) == 0o700
    repacked = foreign.repack(tmp_path / "x", tmp_path / "r.img")
    before = foreign.read_segments(image.read_bytes())
    after = foreign.read_segments(repacked.read_bytes())
    assert [(s.offset, s.compression) for s in after] == [(0, "none"), (1024, "gzip")]
    for old, new in zip(before, after, strict=True):
        assert [fields(m) for m in new.members] == [fields(m) for m in old.members]
    assert cpio_t(image) == cpio_t(repacked)
    again = foreign.repack(tmp_path / "x", tmp_path / "r2.img")
    assert again.read_bytes() == repacked.read_bytes()


def test_an_edited_folder_repacks_with_the_edit(tmp_path: Path) -> None:
    foreign.extract(distro_image(tmp_path / "i.img"), tmp_path / "x")
    main_dir = tmp_path / "x" / "main"
    (main_dir / "init").write_text("#!/bin/sh\necho edited\n")
    (main_dir / "usr/bin/secret").unlink()
    (main_dir / "etc").mkdir()
    (main_dir / "etc/added").write_text("new\n")
    repacked = foreign.repack(tmp_path / "x", tmp_path / "r.img")
    entries = {e.path: e for e in cpio.read_archive(repacked.read_bytes())}
    assert entries["init"].data == b"#!/bin/sh\necho edited\n"
    assert "usr/bin/secret" not in entries
    assert entries["etc/added"].data == b"new\n"
    names = [m.name for m in foreign.read_segments(repacked.read_bytes())[1].members]
    assert names[-2:] == ["etc", "etc/added"]  # new paths follow the archive's own order


def test_repack_into_one_segment_or_another_compression(tmp_path: Path) -> None:
    foreign.extract(distro_image(tmp_path / "i.img"), tmp_path / "x")
    xz = foreign.repack(tmp_path / "x", tmp_path / "xz.img", compression_method="xz")
    assert [s.compression for s in foreign.read_segments(xz.read_bytes())] == ["none", "xz"]
    single = foreign.repack(tmp_path / "x", tmp_path / "one.img", single=True)
    segments = foreign.read_segments(single.read_bytes())
    assert [s.compression for s in segments] == ["gzip", "gzip"]  # two archives, one stream
    assert len({s.stream for s in segments}) == 1


def test_without_root_owners_and_devices_live_in_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = distro_image(tmp_path / "i.img")

    def no_mknod(*args: object, **kwargs: object) -> None:
        raise PermissionError("not root")

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "mknod", no_mknod)
    foreign.extract(image, tmp_path / "x")
    placeholder = tmp_path / "x" / "main" / "dev" / "sda"
    assert placeholder.is_file() and placeholder.stat().st_size == 0
    repacked = foreign.repack(tmp_path / "x", tmp_path / "r.img")
    new = {m.name: m for m in foreign.read_segments(repacked.read_bytes())[1].members}
    assert fields(new["dev/sda"]) == fields(MAIN[4])
    assert (new["usr/bin/secret"].uid, new["usr/bin/secret"].gid) == (1000, 1000)


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([member("../escaped", FILE | 0o644, b"x")], "outside the target folder"),
        ([member("a/../../escaped", FILE | 0o644, b"x")], "outside the target folder"),
        (
            [member("link", LINK | 0o777, b"/tmp"), member("link/escaped", FILE | 0o644, b"x")],
            "goes through link",
        ),
    ],
)
def test_paths_that_escape_the_folder_are_refused(
    tmp_path: Path, members: list[Member], why: str
) -> None:
    image = tmp_path / "evil.img"
    image.write_bytes(cpio.write_members(members))
    with pytest.raises(ConfigError, match=why):
        foreign.extract(image, tmp_path / "x" / "y")
    assert not (tmp_path / "x" / "escaped").exists() and not Path("/tmp/escaped").exists()


def test_overlay_follows_the_images_symlinks_and_adds_only_missing_folders(
    tmp_path: Path,
) -> None:
    image = distro_image(tmp_path / "i.img")
    host = tmp_path / "hook.sh"
    host.write_text("#!/bin/sh\n")
    host.chmod(0o755)
    out = foreign.overlay(
        image,
        {
            "bin/new-tool": host,
            "etc/motd": b"hello\n",
            "dev/null": Entry.chardev("dev/null", 1, 3, 0o666),
        },
        tmp_path / "o.img",
    )
    data = out.read_bytes()
    segments = foreign.read_segments(data)
    assert len(segments) == 3 and segments[2].offset % 4 == 0
    assert data.startswith(image.read_bytes())
    added = {m.name: m for m in segments[2].members}
    assert set(added) == {"usr/bin/new-tool", "etc", "etc/motd", "dev/null"}
    assert added["usr/bin/new-tool"].mode == FILE | 0o755
    assert added["etc"].mode == DIR | 0o755 and added["dev/null"].rdev == (1, 3)
    merged = {e.path: e for e in cpio.read_archive(data)}  # later archives win, as in the kernel
    assert merged["etc/motd"].data == b"hello\n"


def test_an_initramfs_tools_hook_overlay_extends_order(tmp_path: Path) -> None:
    order = b'/scripts/init-top/udev "$@"\n[ -e /conf/param.conf ] && . /conf/param.conf\n'
    image = tmp_path / "it.img"
    image.write_bytes(cpio.write_archive([Entry.file("scripts/init-top/ORDER", order)]))
    files = foreign.initramfs_tools_script(image, "init-top", "hello", "#!/bin/sh\necho hi\n")
    hook = files["scripts/init-top/hello"]
    assert isinstance(hook, Entry) and hook.mode == 0o755
    new_order = files["scripts/init-top/ORDER"]
    assert isinstance(new_order, Entry)
    assert new_order.data.startswith(order)
    assert new_order.data.endswith(b'/scripts/init-top/hello "$@"\n[ -e /conf/param.conf ] '
                                   b"&& . /conf/param.conf\n")  # fmt: skip
    with pytest.raises(ConfigError, match="no scripts/local-top/ORDER"):
        foreign.initramfs_tools_script(image, "local-top", "x", "")


def test_the_kernel_must_be_able_to_unpack_every_segment(tmp_path: Path) -> None:
    image = distro_image(tmp_path / "i.img")
    config = {"CONFIG_BLK_DEV_INITRD": "y", "CONFIG_RD_GZIP": "y"}
    foreign.check_kernel_can_unpack(image, config, kernel_name="k")
    with pytest.raises(ConfigError, match="offset 1024 is gzip-compressed and CONFIG_RD_GZIP"):
        foreign.check_kernel_can_unpack(
            image, {"CONFIG_BLK_DEV_INITRD": "y", "CONFIG_RD_XZ": "y"}, kernel_name="k"
        )
    ramdisk = tmp_path / "ext2.gz"  # an initrd(4) file system image: the kernel's business
    ramdisk.write_bytes(compression.compress(b"\0" * 1024 + b"\x53\xef" * 512, "gzip"))
    foreign.check_kernel_can_unpack(ramdisk, config, kernel_name="k")


def test_cli_extract_repack_overlay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = distro_image(tmp_path / "i.img")
    assert main(["initramfs", "extract", str(image), str(tmp_path / "x")]) == 0
    assert main(["initramfs", "repack", str(tmp_path / "x"), "-o", str(tmp_path / "r.img")]) == 0
    assert "none@0 (4), gzip@1024 (13)" in capsys.readouterr().out
    extra = tmp_path / "extra"
    extra.write_text("x")
    overlay = ["--overlay", f"etc/extra={extra}", "-o", str(tmp_path / "o.img")]
    assert main(["initramfs", "overlay", str(image), *overlay]) == 0
    assert main(["initramfs", "extract", str(image), str(tmp_path / "x")]) == 5  # not empty
    assert "is not empty" in capsys.readouterr().err


def cpio_t(image: Path) -> list[str]:
    """What GNU ``cpio -t`` lists for each segment of ``image``."""
    data = image.read_bytes()
    listings = []
    for segment in foreign.read_segments(data):
        raw = (
            data[segment.offset :]
            if segment.compression == "none"
            else compression.decompress_stream(data, segment.offset).data
        )
        result = subprocess.run(["cpio", "-tv", "--quiet"], input=raw, capture_output=True)
        listings.append(result.stdout.decode())
    return listings


def test_entry_kinds_of_members() -> None:
    assert member("dev/console", stat.S_IFCHR | 0o600).kind is EntryKind.CHARDEV
    assert member(".", DIR).path == "" and member("./bin", DIR).path == "bin"


def test_the_generator_is_named_by_the_files_only_it_writes(tmp_path: Path) -> None:
    made = {
        "initramfs-tools": [Entry.file("scripts/functions", b"x"), Entry.file("init", b"x")],
        "dracut": [Entry.file("usr/lib/dracut-lib.sh", b"x"), Entry.file("init", b"x")],
        "": [Entry.file("init", b"x")],
    }
    for generator, entries in made.items():
        image = tmp_path / f"{generator or 'hand-made'}.img"
        image.write_bytes(compression.compress(cpio.write_archive(entries), "gzip"))
        assert foreign.generator_of(image) == generator
