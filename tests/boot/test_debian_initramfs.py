"""Debian's own initramfs-tools image, made by `mkinitramfs` for the default kernel, booted
as users ship it: found through the fixture and the CLI, judged by the console alone.

The images come from harness.image.mkinitramfs (a mount namespace, nothing installed on the
host; cached by digest, so the suite builds each once). One is built for the root's
controller (ahci), one for another (virtio-blk): booted on ahci, the latter must be a
TEST_FAIL that names initramfs-tools' own message, long before any deadline. The ahci image
also carries an early (uncompressed) archive, as microcode packages add, so extract and
repack are exercised on the layout distributions ship.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import compression
from harness.cli.main import main
from harness.image import foreign, mkinitramfs, rootfs
from harness.kernel.provision import Kernel
from harness.outcome import TestFailure
from harness.plugin.settings import settings_key
from harness.storage import disks
from harness.storage.controllers import Disk
from harness.storage.disks import DiskImage

LABEL = "bh-debian"
UUID = "5c0ffee0-1234-4abc-8def-0123456789ab"
REACHED = "debian-root: reached /sbin/init as PID 1"
ROOT_INIT = """#!/bin/sh
echo "debian-root: reached /sbin/init as PID $$"
poweroff -f
"""
# What intel-microcode and amd64-microcode do: prepend an uncompressed "early" archive.
EARLY_HOOK = """#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case $1 in prereqs) prereqs; exit 0;; esac
. /usr/share/initramfs-tools/hook-functions
d=$(mktemp -d)
mkdir -p "$d/kernel/x86/microcode"
echo "an early archive" > "$d/kernel/x86/microcode/bootharness-early.txt"
(cd "$d" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$d.cpio"
prepend_earlyinitramfs "$d.cpio"
rm -rf "$d" "$d.cpio"
"""
AHCI = mkinitramfs.InitramfsToolsSpec(
    drivers=("ahci", "sd_mod", "ext4"), hooks={"bootharness-early": EARLY_HOOK}
)
VIRTIO_ONLY = mkinitramfs.InitramfsToolsSpec(drivers=("virtio_pci", "virtio_blk", "ext4"))

pytestmark = [
    pytest.mark.kernel_config("CONFIG_SATA_AHCI"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mkinitramfs for a cached kernel needs root"),
    pytest.mark.skipif(shutil.which("mkinitramfs") is None, reason="needs initramfs-tools-core"),
]


@pytest.fixture(scope="module")
def settings_cache(pytestconfig: pytest.Config) -> Path:
    return pytestconfig.stash[settings_key].cache_dir


@pytest.fixture(scope="module")
def ahci_image(kernel: Kernel, settings_cache: Path) -> Path:
    return mkinitramfs.build(kernel, AHCI, settings_cache)


@pytest.fixture(scope="module")
def virtio_image(kernel: Kernel, settings_cache: Path) -> Path:
    return mkinitramfs.build(kernel, VIRTIO_ONLY, settings_cache)


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    base = tmp_path_factory.mktemp("debian-root")
    tree = rootfs.build(base / "tree", init=ROOT_INIT)
    return disks.filesystem(tree.path, base / "root.raw", label=LABEL, uuid=UUID, size="16M")


@pytest.mark.parametrize(
    "root",
    [f"LABEL={LABEL}", pytest.param(f"UUID={UUID}", marks=pytest.mark.nightly)],
    ids=["label", "uuid"],
)
def test_mkinitramfs_image_boots_the_root(boot, ahci_image, debian_root, root: str) -> None:
    vm = boot(initrd=ahci_image, root=root, disks=[Disk(debian_root, "ahci")], expect=[REACHED])
    vm.expect_pass()
    vm.wait_shutdown()
    marks = {mark.name: mark for mark in vm.marks}
    assert marks["INIT-START"].detail == "/init"
    assert marks["root-mounted"].detail == "sda"
    order = [mark.name for mark in vm.marks]
    assert order.index("initrd-unpacked") < order.index("INIT-START") < order.index("PASS")
    seen = vm.dimensions()  # what every report says this boot was
    assert (seen.initramfs, seen.generator, seen.controller) == (
        "foreign",
        "initramfs-tools",
        "ahci",
    )
    assert seen.initramfs_digest == foreign.image_digest(ahci_image)[:12]


@pytest.mark.parametrize(
    "root",
    [pytest.param(f"LABEL={LABEL}", marks=pytest.mark.nightly), f"UUID={UUID}"],
    ids=["label", "uuid"],
)
def test_mkinitramfs_image_boots_from_the_cli(
    ahci_image, debian_root, settings_cache: Path, tmp_path: Path, capsys, root: str
) -> None:
    argv = [
        "--cache", str(settings_cache), "boot", "--initrd", str(ahci_image), "--root", root,
        "--disk", f"{debian_root.path}:ahci", "--expect", REACHED, "--workdir", str(tmp_path),
    ]  # fmt: skip
    code = main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "outcome:  PASS" in out and "INIT-START  /init" in out


def test_missing_root_driver_is_the_initramfs_tools_failure(
    boot, virtio_image, debian_root
) -> None:
    """Built for virtio-blk, booted with the root on ahci: initramfs-tools waits its own
    rootdelay (30 s), then says so; that line is the verdict, not a timeout."""
    vm = boot(initrd=virtio_image, root=f"LABEL={LABEL}", disks=[Disk(debian_root, "ahci")],
              expect=[REACHED], start=False)  # fmt: skip
    with pytest.raises(TestFailure) as failure:
        vm.start()
        vm.expect_pass()
    message = failure.value.message
    assert message.startswith("initramfs-tools root-device-timeout: Gave up waiting for root")
    marks = {mark.name: mark for mark in vm.marks}
    assert "fail:root-device-timeout" in marks and "PASS" not in marks


def test_extract_then_repack_is_what_cpio_and_the_kernel_see(
    boot, ahci_image, debian_root, tmp_path: Path
) -> None:
    folders = foreign.extract(ahci_image, tmp_path / "x")
    assert folders == ["early", "main"]
    assert (tmp_path / "x" / "early" / "kernel/x86/microcode/bootharness-early.txt").is_file()
    first = foreign.repack(tmp_path / "x", tmp_path / "a.img")
    again = foreign.repack(tmp_path / "x", tmp_path / "b.img")
    assert first.read_bytes() == again.read_bytes(), "repack must be deterministic"
    original, repacked = cpio_listings(ahci_image), cpio_listings(first)
    assert [method for method, _ in original] == ["none", "zstd"]
    assert original == repacked
    vm = boot(initrd=first, root=f"LABEL={LABEL}", disks=[Disk(debian_root, "ahci")],
              expect=[REACHED])  # fmt: skip
    vm.expect_pass()


def test_overlay_adds_an_init_top_hook(boot, ahci_image, debian_root) -> None:
    hook = '#!/bin/sh\necho "bootharness-hook: init-top ran with ROOT=$ROOT"\n'
    files = foreign.initramfs_tools_script(ahci_image, "init-top", "bootharness-hook", hook)
    vm = boot(
        initrd=ahci_image,
        overlay=files,
        root=f"LABEL={LABEL}",
        disks=[Disk(debian_root, "ahci")],
        expect=[rf"bootharness-hook: init-top ran with ROOT=LABEL={LABEL}", REACHED],
    )
    vm.expect_pass()


def cpio_listings(image: Path) -> list[tuple[str, str]]:
    """Each segment's compression and ``cpio -tv`` of its archive, as GNU cpio lists it
    (names, modes, links, owners, sizes, times) from the image's own bytes."""
    data = image.read_bytes()
    listings = []
    for segment in foreign.read_segments(data):
        if segment.compression == "none":
            raw = data[segment.offset :]  # cpio stops at the archive's trailer
        else:
            raw = compression.decompress_stream(data, segment.offset).data
        listed = subprocess.run(
            ["cpio", "-tv", "--quiet"], input=raw, capture_output=True, check=True
        )
        listings.append((segment.compression, listed.stdout.decode()))
    return listings
