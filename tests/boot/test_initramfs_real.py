"""Initramfs images for the real kernel under test: reproducible, readable by GNU cpio, and
carrying the storage drivers with every dependency in a loadable order. Nothing boots."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from harness import compression, tools
from harness.cli import main as cli
from harness.image import cpio, initramfs
from harness.image.cpio import EntryKind
from harness.image.initramfs import InitramfsSpec
from harness.kernel.modules import modprobe_name
from harness.kernel.provision import Kernel
from harness.plugin.fixtures import BuildInitramfs

STORAGE = ("ata_piix", "sd_mod")


def spec() -> InitramfsSpec:
    return InitramfsSpec(
        variables={"commands": ["cat /proc/partitions"]},
        modules=STORAGE,
        files={"etc/motd": b"bootharness\n"},
        compression="gzip",
    )


def module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return modprobe_name(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base))


def dep_graph(modules_dir: Path) -> dict[str, list[str]]:
    """modules.dep read independently of harness.kernel.modules: name -> names it needs."""
    graph: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        module, _, deps = line.partition(":")
        graph[module_name(module)] = [module_name(dep) for dep in deps.split()]
    return graph


def test_same_initramfs_built_twice_once_in_a_fresh_cache_is_byte_identical(
    kernel: Kernel, build_initramfs: BuildInitramfs, tmp_path: Path
) -> None:
    cached = build_initramfs(
        variables=dict(spec().variables), modules=STORAGE, files=dict(spec().files)
    )
    fresh = initramfs.build(kernel, spec(), tmp_path / "fresh-cache")
    assert fresh.built  # really built again, not found
    assert fresh.path.parent == tmp_path / "fresh-cache" / "initramfs"
    assert fresh.path.name == cached.path.name
    assert fresh.path.read_bytes() == cached.path.read_bytes()
    again = initramfs.build(kernel, spec(), tmp_path / "another-cache")
    assert again.path.read_bytes() == fresh.path.read_bytes()


def test_gnu_cpio_and_bootharness_ls_list_the_same_entries(
    kernel: Kernel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = initramfs.build(kernel, spec(), tmp_path / "cache")
    archive = compression.decompress(image.path.read_bytes())
    gnu = subprocess.run(
        [tools.require("cpio"), "-t", "--quiet"],
        input=archive,
        capture_output=True,
        check=True,
    ).stdout.decode()
    gnu_paths = gnu.splitlines()

    capsys.readouterr()
    assert cli.main(["initramfs", "ls", "--paths", str(image.path)]) == 0
    ours = capsys.readouterr().out.splitlines()

    assert ours == gnu_paths
    assert len(ours) == len(set(ours))
    for expected in ("init", "bin/busybox", "bin/sh", "dev/console", "etc/motd"):
        assert expected in ours
    assert any(path.endswith("/sd_mod.ko") for path in ours)
    assert ours == cpio.list_paths(image.path.read_bytes())


def test_gnu_cpio_reads_the_same_types_and_sizes(kernel: Kernel, tmp_path: Path) -> None:
    image = initramfs.build(kernel, spec(), tmp_path / "cache")
    archive = compression.decompress(image.path.read_bytes())
    listing = subprocess.run(
        [tools.require("cpio"), "-tv", "--quiet"],
        input=archive,
        capture_output=True,
        check=True,
        env={"LC_ALL": "C", "TZ": "UTC"},
    ).stdout.decode()
    lines = listing.splitlines()
    entries = cpio.read_archive(image.path.read_bytes())
    assert len(lines) == len(entries)
    type_letter = {
        EntryKind.FILE: "-",
        EntryKind.DIR: "d",
        EntryKind.SYMLINK: "l",
        EntryKind.CHARDEV: "c",
        EntryKind.BLOCKDEV: "b",
    }
    for line, entry in zip(lines, entries, strict=True):
        # -rwxr-xr-x   1 root     root      1234 Jan  1  1970 bin/busybox
        assert line[0] == type_letter[entry.kind], line
        if entry.kind is EntryKind.SYMLINK:
            assert line.endswith(f"{entry.path} -> {entry.target}"), line
        else:
            assert line.endswith(f" {entry.path}"), line
        if entry.kind is EntryKind.FILE:
            assert f" {len(entry.data)} " in line, line


def test_storage_modules_pull_in_all_dependencies_in_a_valid_order(
    kernel: Kernel, tmp_path: Path
) -> None:
    if kernel.modules_dir is None:
        pytest.skip(f"kernel {kernel.name} has no modules")
    graph = dep_graph(kernel.modules_dir)
    image = initramfs.build(kernel, spec(), tmp_path / "cache")

    names = [module.name for module in image.modules]
    assert len(names) == len(set(names))
    needed = set(STORAGE)
    for name in STORAGE:
        needed.update(graph[name])
    assert {"scsi_mod", "libata", "scsi_common"} <= needed
    assert needed <= set(names), f"missing: {needed - set(names)}"
    for position, name in enumerate(names):
        missing = set(graph.get(name, ())) - set(names[:position])
        assert not missing, f"{name} is loaded before {missing}: {names}"

    entries = {e.path: e for e in cpio.read_archive(image.path.read_bytes())}
    init = entries["init"].data.decode()
    loaded = re.findall(r"^insmod (\S+) \|\|", init, flags=re.MULTILINE)
    assert [module_name(path) for path in loaded] == names
    for path in loaded:
        entry = entries[path.lstrip("/")]
        assert entry.kind is EntryKind.FILE
        assert entry.data[:4] == b"\x7fELF"  # stored decompressed, ready for insmod
        assert path.startswith(f"/lib/modules/{kernel.release}/")
