"""Disk images made with the host's real tools (qemu-img, mkfs.ext4, sfdisk), read back
with other tools (qemu-img info, dumpe2fs, debugfs, sfdisk --dump, qemu-io)."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from harness import tools
from harness.image import rootfs
from harness.outcome import ConfigError
from harness.storage import disks
from harness.storage.disks import DiskImage


def run(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True).stdout


def debugfs(image: Path, request: str, offset: int = 0) -> str:
    target = str(image) if offset == 0 else f"{image}?offset={offset}"
    found = shutil.which("debugfs") or "/usr/sbin/debugfs"
    return subprocess.run(
        [found, "-R", request, target], capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    folder = tmp_path / "tree"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "hello").write_text("hello from the host\n")
    return folder


@pytest.mark.parametrize(
    ("text", "value"),
    [("16M", 16 << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("4MiB", 4 << 20), (4096, 4096)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert disks.parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "-1M", "0", 0, "1.5G"])
def test_parse_size_refuses_nonsense(bad: str | int) -> None:
    with pytest.raises(ConfigError, match="size"):
        disks.parse_size(bad)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_empty_disk_has_its_size_and_is_read_only(tmp_path: Path, fmt: str) -> None:
    made = disks.empty(tmp_path / f"e.{fmt}", "3M", fmt=fmt)
    info = json.loads(run("qemu-img", "info", "--output=json", str(made.path)))
    assert (info["format"], info["virtual-size"]) == (fmt, 3 << 20)
    assert made.path.stat().st_mode & 0o777 == 0o444
    assert DiskImage.open(made.path) == dataclasses_replace_fs(made)


def dataclasses_replace_fs(image: DiskImage) -> DiskImage:
    return DiskImage(image.path, image.format, image.size)


def test_ext4_from_a_folder_has_label_uuid_and_the_files(tmp_path: Path, tree: Path) -> None:
    chosen = str(uuid.uuid4())
    made = disks.filesystem(tree, tmp_path / "fs.raw", size="8M", label="bh-test", uuid=chosen)
    header = run("dumpe2fs", "-h", str(made.path))
    assert "Filesystem volume name:   bh-test" in header
    assert f"Filesystem UUID:          {chosen}" in header
    assert "has_journal" in header  # ext4, not ext2
    assert debugfs(made.path, "cat /etc/hello") == "hello from the host\n"
    assert "User:     0   Group:     0" in debugfs(made.path, "stat /")
    assert (made.label, made.uuid, made.fstype) == ("bh-test", chosen, "ext4")
    assert made.root("label") == "LABEL=bh-test"
    assert made.root("uuid") == f"UUID={chosen}"


def test_ext2_and_qcow2_output(tmp_path: Path, tree: Path) -> None:
    made = disks.filesystem(tree, tmp_path / "fs.qcow2", size="8M", fstype="ext2", fmt="qcow2")
    assert made.format == "qcow2"
    assert not (tmp_path / "fs.qcow2.raw").exists()
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", str(made.path), str(back))
    header = run("dumpe2fs", "-h", str(back))
    assert "has_journal" not in header
    assert made.uuid and f"Filesystem UUID:          {made.uuid}" in header


def test_partitioned_image_starts_its_partition_at_sector_2048(tmp_path: Path, tree: Path) -> None:
    fs = disks.filesystem(tree, tmp_path / "fs.raw", size="8M", label="part")
    made = disks.partitioned(fs, tmp_path / "disk.raw")
    table = json.loads(run(tools.require("sfdisk"), "--json", str(made.path)))["partitiontable"]
    assert table["label"] == "dos"
    [partition] = table["partitions"]
    assert (partition["start"], partition["type"]) == (2048, "83")
    assert partition["size"] * 512 == fs.path.stat().st_size
    with made.path.open("rb") as disk:
        disk.seek(1 << 20)
        assert disk.read(fs.size) == fs.path.read_bytes()
    assert debugfs(made.path, "cat /etc/hello", offset=1 << 20) == "hello from the host\n"
    assert made.partitioned and made.label == "part"
    with pytest.raises(ConfigError, match="must be a raw image of one file system"):
        disks.partitioned(made, tmp_path / "again.raw")


def test_overlay_takes_the_writes_and_the_base_stays(tmp_path: Path, tree: Path) -> None:
    base = disks.filesystem(tree, tmp_path / "base.raw", size="8M")
    before = base.digest()
    overlay = disks.overlay(base, tmp_path / "vm" / "disk0.qcow2")
    info = json.loads(run("qemu-img", "info", "--output=json", str(overlay)))
    assert info["backing-filename"] == str(base.path.resolve())
    assert info["backing-filename-format"] == "raw"
    qemu_io = shutil.which("qemu-io")
    assert qemu_io, "qemu-io comes with qemu-utils"
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0xab 0 64k", str(overlay))
    assert base.digest() == before
    assert run(qemu_io, "-f", "qcow2", "-c", "read -P 0xab 0 64k", str(overlay)).count("read") == 1
    compared = subprocess.run(
        ["qemu-img", "compare", str(overlay), str(base.path)], capture_output=True, check=False
    )
    assert compared.returncode == 1  # the overlay's content differs now


def test_bad_inputs_are_config_errors(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(ConfigError, match="label 'much-too-long-a-label'"):
        disks.filesystem(tree, tmp_path / "x.raw", label="much-too-long-a-label")
    with pytest.raises(ConfigError, match="'btrfs' is not supported"):
        disks.filesystem(tree, tmp_path / "x.raw", fstype="btrfs")
    with pytest.raises(ConfigError, match="is not a folder"):
        disks.filesystem(tmp_path / "nope", tmp_path / "x.raw")
    with pytest.raises(ConfigError, match="'vmdk' is not supported"):
        disks.empty(tmp_path / "x.vmdk", "1M", fmt="vmdk")
    with pytest.raises(ConfigError, match="is not a UUID"):
        disks.filesystem(tree, tmp_path / "x.raw", uuid="not-a-uuid")
    with pytest.raises(ConfigError, match="does not exist"):
        DiskImage.open(tmp_path / "missing.qcow2")
    with pytest.raises(ConfigError, match=r"could not make ext4"):
        disks.filesystem(tree_with_big_file(tmp_path), tmp_path / "small.raw", size="1M")
    unlabelled = disks.empty(tmp_path / "u.raw", "1M")
    with pytest.raises(ConfigError, match="has no file system label"):
        unlabelled.root("label")


def tree_with_big_file(tmp_path: Path) -> Path:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "blob").write_bytes(b"\x01" * (3 << 20))
    return folder


def test_rootfs_folder_is_a_bootable_root(tmp_path: Path) -> None:
    made = rootfs.build(tmp_path / "root", commands=["echo hi"], identity="abc123")
    init = made.path / "sbin" / "init"
    assert init.stat().st_mode & 0o111
    assert (made.path / "etc" / "bootharness-root").read_text() == "abc123\n"
    assert (made.path / "bin" / "busybox").stat().st_size > 100_000
    assert (made.path / "bin" / "sh").is_symlink()
    assert (made.path / "sbin" / "switch_root").is_symlink()
    for folder in ("proc", "sys", "dev"):  # the initramfs moves its mounts onto these
        assert (made.path / folder).is_dir()
    assert "identity=abc123" in made.init_script
    assert "echo hi" in made.init_script


def test_rootfs_refuses_bad_requests(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="is not empty"):
        rootfs.build(tmp_path / "full")
    with pytest.raises(ConfigError, match="after='exit'"):
        rootfs.build(tmp_path / "a", after="exit")
    with pytest.raises(ConfigError, match="points outside the root"):
        rootfs.build(tmp_path / "b", files={"../escape": b"x"})
