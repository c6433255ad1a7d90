"""The classic-initrd pieces without a boot: restricted networks, CD-ROM drives, kept overlays,
built-in requirements, filesystem-image initrds and the all-hardware module index."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest

from harness.image import legacy_initrd, rootfs
from harness.kernel import capabilities
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.storage import attach, controllers, disks
from harness.storage.controllers import CONTROLLERS, Disk
from harness.storage.disks import DiskImage
from harness.vm.network import GuestForward, UserNetwork


def kernel_with(tmp_path: Path, config: str) -> Kernel:
    path = tmp_path / "config"
    path.write_text(config)
    return Kernel("k", "6.1.0-k", tmp_path / "vmlinuz", None, path, None)


def test_user_network_is_restricted_with_one_forward_per_service() -> None:
    net = UserNetwork([GuestForward(host_port=40123, guest_port=2049)])
    assert net.args() == [
        "-netdev",
        "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:2049-tcp:127.0.0.1:40123",
        "-device",
        "e1000,netdev=net0,mac=52:54:00:12:34:56",
    ]
    assert net.kernel_ip() == "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        (GuestForward(1, 2049, "192.168.1.1"), "must be in 10.0.2.0/24"),
        (GuestForward(1, 2049, "10.0.2.2"), "slirp's own"),
        (GuestForward(70000, 2049), "out of range"),
    ],
)
def test_user_network_refuses_forwards_outside_its_net(forward: GuestForward, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UserNetwork([forward])


def test_two_forwards_for_one_guest_port_are_refused() -> None:
    with pytest.raises(ConfigError, match="two guest forwards"):
        UserNetwork([GuestForward(1, 2049), GuestForward(2, 2049)])


def cd(name: str = "cd.iso") -> DiskImage:
    return DiskImage(Path("/nonexistent") / name, "raw", 1 << 20, fstype="iso9660")


@pytest.mark.parametrize(
    ("name", "device", "module"),
    [
        ("ide", "ide-cd,drive=disk0,bus=ide.0,unit=0", "ata_piix"),
        ("ahci", "ide-cd,drive=disk0,bus=ahci0.0", "ahci"),
        ("virtio-scsi", "scsi-cd,drive=disk0,bus=virtioscsi0.0", "virtio_scsi"),
        ("lsi", "scsi-cd,drive=disk0,bus=lsi0.0,scsi-id=0", "sym53c8xx"),
    ],
)
def test_cdrom_drives_per_controller(name: str, device: str, module: str) -> None:
    plan = controllers.plan([Disk(cd(), name, media="cdrom")])
    assert plan.device_args()[-1].startswith(device)
    assert module in plan.modules and "sr_mod" in plan.modules and "sd_mod" not in plan.modules
    assert "CONFIG_BLK_DEV_SR" in plan.config[CONTROLLERS[name].name]
    args = plan.drive_args([Path("/x.iso")], formats=["raw"])
    assert args[1].endswith("format=raw,media=cdrom,readonly=on")


@pytest.mark.parametrize("name", ["virtio-blk", "nvme"])
def test_controllers_without_cdrom_drives_say_so(name: str) -> None:
    with pytest.raises(ConfigError, match="has no CD-ROM drive; use one of ide, ahci, lsi"):
        controllers.plan([Disk(cd(), name, media="cdrom")])


def test_bad_media_and_cdrom_overlays_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="media 'floppy'"):
        controllers.plan([Disk(cd(), "ahci", media="floppy")])
    with pytest.raises(ConfigError, match="read-only and has no overlay"):
        controllers.plan([Disk(cd(), "ahci", media="cdrom", overlay=tmp_path / "o.qcow2")])


def test_cdrom_root_adds_isofs() -> None:
    placed = attach.plan([Disk(cd(), "lsi", media="cdrom")], variables={"root": "LABEL=CD"})
    assert placed.modules == ("sym53c8xx", "sr_mod", "isofs")
    assert placed.requirements["file system iso9660"] == ("CONFIG_ISO9660_FS",)


def test_kept_overlay_is_made_once_and_reused(tmp_path: Path) -> None:
    base = disks.empty(tmp_path / "base.qcow2", "8M")
    other = disks.empty(tmp_path / "other.qcow2", "8M")
    kept = tmp_path / "state.qcow2"
    assert disks.kept_overlay(base, kept) == kept
    stamp = kept.stat().st_mtime_ns
    assert disks.kept_overlay(base, kept) == kept
    assert kept.stat().st_mtime_ns == stamp, "the kept overlay was made anew"
    with pytest.raises(ConfigError, match="a kept overlay serves one base image"):
        disks.kept_overlay(other, kept)
    placed = attach.plan([Disk(base, "ahci", overlay=kept)])
    assert f"file={kept}," in " ".join(placed.attach(tmp_path / "vm0"))
    assert placed.overlay(tmp_path / "vm0") == kept


def test_iso9660_image_is_labelled_and_read_only(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "hello").write_text("hi\n")
    image = disks.iso9660(tmp_path / "src", tmp_path / "cd.iso", label="BH_TEST")
    assert image.fstype == "iso9660" and image.label == "BH_TEST"
    assert image.path.stat().st_mode & 0o222 == 0
    blkid = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(image.path)], capture_output=True, text=True
    )
    assert blkid.stdout.strip() == "BH_TEST"
    with pytest.raises(ConfigError, match="ISO volume label"):
        disks.iso9660(tmp_path / "src", tmp_path / "bad.iso", label="lower case")


def test_built_in_requirements_name_what_the_kernel_has(tmp_path: Path) -> None:
    debian = kernel_with(
        tmp_path, "CONFIG_BLK_DEV_INITRD=y\nCONFIG_BLK_DEV_RAM=m\nCONFIG_EXT4_FS=y\n"
    )
    reason = capabilities.lacks_reason(debian, legacy_initrd.REQUIREMENTS)
    assert reason is not None
    assert "CONFIG_BLK_DEV_RAM=y (has m)" in reason
    assert "CONFIG_EXT2_FS=y|CONFIG_EXT4_USE_FOR_EXT2=y" in reason
    built = kernel_with(
        tmp_path, "CONFIG_BLK_DEV_INITRD=y\nCONFIG_BLK_DEV_RAM=y\nCONFIG_EXT2_FS=y\n"
    )
    assert capabilities.lacks_reason(built, legacy_initrd.REQUIREMENTS) is None


def test_legacy_initrd_is_an_ext2_image_with_linuxrc(tmp_path: Path) -> None:
    kernel = kernel_with(tmp_path, "CONFIG_RD_GZIP=y\nCONFIG_BLK_DEV_RAM_SIZE=4096\n")
    source = rootfs.build(tmp_path / "src")
    initrd = legacy_initrd.build(
        kernel, source.path, tmp_path / "initrd.gz", real_root="sdb", files={"etc/x": b"x\n"}
    )
    raw = gzip.decompress(initrd.path.read_bytes())
    assert raw[1080:1082] == b"\x53\xef", "not an ext2 superblock"
    assert raw == initrd.image.read_bytes()
    assert initrd.linuxrc is not None and "real_root=sdb" in initrd.linuxrc
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(initrd.image)], capture_output=True, text=True
    ).stdout
    assert "linuxrc" in listing and "sbin" in listing
    assert initrd.cmdline(kernel) == ""
    small = kernel_with(tmp_path, "CONFIG_RD_GZIP=y\nCONFIG_BLK_DEV_RAM_SIZE=1024\n")
    assert initrd.cmdline(small) == f"ramdisk_size={initrd.size_kib}"
    assert list(tmp_path.glob("*.tree")) == [], "the staging folder was left behind"


def test_legacy_initrd_refuses_bad_real_roots(tmp_path: Path) -> None:
    kernel = kernel_with(tmp_path, "CONFIG_RD_GZIP=y\n")
    with pytest.raises(ConfigError, match="real_root"):
        legacy_initrd.build(kernel, tmp_path, tmp_path / "x.gz", real_root="/dev/sdb")


def test_deprecation_lines_are_found_without_their_time_stamp() -> None:
    console = (
        "[    1.000000] RAMDISK: gzip image found at block 0\n"
        "[    1.200000] using deprecated initrd support, will be removed in 2021.\n"
    )
    said = legacy_initrd.deprecation(console)
    assert said == "using deprecated initrd support, will be removed in 2021."
    assert legacy_initrd.deprecation("[    1.0] Run /init as init process\n") is None
    autoload = "[   11.515448] block device autoloading is deprecated and will be removed.\r\n"
    assert legacy_initrd.deprecation(autoload) == (
        "block device autoloading is deprecated and will be removed."
    )
