"""Controllers as data, disk placement, and what a VM needs for its disks (no boots)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from harness.kernel import capabilities
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.storage import attach as storage
from harness.storage import controllers
from harness.storage.controllers import CONTROLLERS, Disk
from harness.storage.disks import DiskImage


def image(name: str = "d.raw", fstype: str | None = "ext4") -> DiskImage:
    return DiskImage(Path("/nonexistent") / name, "raw", 1 << 20, fstype=fstype)


def kernel_with(tmp_path: Path, config: str) -> Kernel:
    path = tmp_path / "config"
    path.write_text(config)
    return Kernel("k", "6.1.0-k", tmp_path / "vmlinuz", None, path, None)


def test_issue_controllers_are_all_there_with_their_drivers() -> None:
    expected = {
        "ide": "ata_piix",
        "ahci": "ahci",
        "lsi": "sym53c8xx",
        "megasas": "megaraid_sas",
        "virtio-scsi": "virtio_scsi",
        "virtio-blk": "virtio_blk",
        "nvme": "nvme",
    }
    for name, driver in expected.items():
        assert driver in CONTROLLERS[name].modules, name
    for c in CONTROLLERS.values():
        assert c.config and all(o.startswith("CONFIG_") for o in c.config), c.name
        # SCSI-attached disks need the sd driver; virtio ones the PCI transport.
        assert ("sd_mod" in c.modules) == (c.naming == "sd"), c.name
        assert ("virtio_pci" in c.modules) == c.name.startswith("virtio"), c.name


def test_guest_names_follow_the_kernels_scheme() -> None:
    sd, vd, nvme = CONTROLLERS["ahci"], CONTROLLERS["virtio-blk"], CONTROLLERS["nvme"]
    assert [sd.guest_disk(i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "/dev/sda",
        "/dev/sdb",
        "/dev/sdz",
        "/dev/sdaa",
        "/dev/sdab",
        "/dev/sdzz",
        "/dev/sdaaa",
    ]
    assert vd.guest_partition(0, 1) == "/dev/vda1"
    assert nvme.guest_disk(1) == "/dev/nvme1n1"
    assert nvme.guest_partition(0, 2) == "/dev/nvme0n1p2"


def test_plan_shares_one_controller_and_gives_units_in_order() -> None:
    placed = controllers.plan(
        [Disk(image(), "ahci"), Disk(image(), "virtio-blk"), Disk(image(), "ahci")]
    )
    assert placed.controller_devices == ["ich9-ahci,id=ahci0"]
    assert placed.device_args() == [
        "ich9-ahci,id=ahci0",
        "ide-hd,drive=disk0,bus=ahci0.0,serial=bh-disk0",
        "virtio-blk-pci,drive=disk1,serial=bh-disk1",
        "ide-hd,drive=disk2,bus=ahci0.1,serial=bh-disk2",
    ]
    assert placed.modules == ("ahci", "sd_mod", "virtio_pci", "virtio_blk")
    overlays = [Path(f"/vm/disk{i}.qcow2") for i in range(3)]
    assert placed.drive_args(overlays)[:2] == [
        "-drive",
        "if=none,id=disk0,file=/vm/disk0.qcow2,format=qcow2,file.auto-read-only=off",
    ]


def test_ide_units_map_to_two_buses_of_two() -> None:
    placed = controllers.plan([Disk(image(), "ide", unit=u) for u in (3, 0)])
    assert placed.device_args() == [
        "ide-hd,drive=disk0,bus=ide.1,unit=1,serial=bh-disk0",
        "ide-hd,drive=disk1,bus=ide.0,unit=0,serial=bh-disk1",
    ]


def test_second_instance_is_a_second_controller() -> None:
    placed = controllers.plan(
        [Disk(image(), "virtio-scsi"), Disk(image(), "virtio-scsi", instance=1, serial="x")]
    )
    assert placed.controller_devices == [
        "virtio-scsi-pci,id=virtioscsi0",
        "virtio-scsi-pci,id=virtioscsi1",
    ]
    assert placed.device_args()[-1].startswith("scsi-hd,drive=disk1,bus=virtioscsi1.0,")
    assert placed.device_args()[-1].endswith("scsi-id=0,lun=0,serial=x")


@pytest.mark.parametrize(
    ("disks", "machine", "message"),
    [
        ([Disk(image(), "floppy")], "pc", "unknown disk controller 'floppy'; use one of ide"),
        ([Disk(image(), "ahci", unit=6)], "pc", "unit 6 does not exist; use 0 to 5"),
        (
            [Disk(image(), "lsi", unit=1), Disk(image(), "lsi", unit=1)],
            "pc",
            "disk 1: unit 1 of controller 'lsi' (lsi0) is already taken",
        ),
        ([Disk(image(), "ide")], "q35", "exists only on the pc machine, not 'q35'"),
        ([Disk(image(), "nvme", instance=1)], "pc", "has no second instance"),
        ([Disk(image(), "ide") for _ in range(5)], "pc", "disk 4: controller 'ide' (ide0) is full"),
    ],
    ids=["unknown", "unit-range", "unit-twice", "wrong-machine", "no-instance", "full"],
)
def test_bad_placements_are_config_errors(disks: list[Disk], machine: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        controllers.plan(disks, machine=machine)


def test_pc_machine_versions_count_as_pc() -> None:
    # The pc machine's built-in IDE is accepted on a versioned pc machine, as on "pc" itself...
    versioned = controllers.plan([Disk(image(), "ide")], machine="pc-i440fx-7.2,accel=tcg")
    plain = controllers.plan([Disk(image(), "ide")], machine="pc")
    assert versioned.device_args() == plain.device_args()
    assert versioned.modules == plain.modules == ("ata_piix", "sd_mod")
    # ... and refused on a q35 machine (versioned or not), which has no PIIX IDE.
    for machine in ("q35", "pc-q35-7.2"):
        with pytest.raises(ConfigError, match="ide"):
            controllers.plan([Disk(image(), "ide")], machine=machine)


def test_storage_adds_the_root_file_system_driver_only_for_a_root() -> None:
    attached = [Disk(image(fstype="ext2"), "nvme"), Disk(image(fstype=None), "megasas")]
    without_root = storage.plan(attached, variables={"commands": ["true"]})
    assert without_root.modules == ("nvme", "megaraid_sas", "sd_mod")
    assert "file system ext2" not in without_root.requirements
    with_root = storage.plan(attached, variables={"root": "/dev/nvme0n1"})
    assert with_root.modules == ("nvme", "megaraid_sas", "sd_mod", "ext4")
    assert with_root.requirements == {
        "controller nvme": ("CONFIG_BLK_DEV_NVME",),
        "controller megasas": ("CONFIG_MEGARAID_SAS", "CONFIG_BLK_DEV_SD"),
        "file system ext2": ("CONFIG_EXT2_FS|CONFIG_EXT4_USE_FOR_EXT2",),
    }
    chosen = storage.plan(attached, variables={"root": "/dev/sda", "root_fstype": "ext4"})
    assert chosen.fstypes == ("ext4",)


def test_storage_refuses_what_is_not_a_disk() -> None:
    with pytest.raises(ConfigError, match=r"disks\[0\] is a str"):
        storage.plan(["disk.img"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="does not exist"):
        storage.plan([Disk(Path("/no/such/disk.img"), "ahci")])


def test_capabilities_name_what_is_missing_and_for_what(tmp_path: Path) -> None:
    cloud = kernel_with(
        tmp_path, "CONFIG_BLK_DEV_SD=m\n# CONFIG_SATA_AHCI is not set\nCONFIG_EXT4_USE_FOR_EXT2=y\n"
    )
    assert capabilities.missing(cloud, ["CONFIG_SATA_AHCI", "CONFIG_BLK_DEV_SD"]) == [
        "CONFIG_SATA_AHCI"
    ]
    assert capabilities.missing(cloud, ["CONFIG_EXT2_FS|CONFIG_EXT4_USE_FOR_EXT2"]) == []
    plan = storage.plan([Disk(image(), "ahci")])
    assert capabilities.lacks_reason(cloud, plan.requirements) == (
        "kernel k (6.1.0-k) lacks CONFIG_SATA_AHCI, needed by controller ahci"
    )
    virtio = storage.plan([Disk(image(), "virtio-blk")])
    assert capabilities.lacks_reason(cloud, virtio.requirements) == (
        "kernel k (6.1.0-k) lacks CONFIG_VIRTIO_PCI, CONFIG_VIRTIO_BLK, needed by controller "
        "virtio-blk"
    )
    with pytest.raises(pytest.skip.Exception, match="lacks CONFIG_SATA_AHCI, needed by this test"):
        capabilities.require_config(cloud, "CONFIG_SATA_AHCI")
    capabilities.require_config(cloud, "CONFIG_BLK_DEV_SD")  # present: no skip


def test_a_kernel_without_known_config_is_never_skipped(tmp_path: Path) -> None:
    unknown = dataclasses.replace(kernel_with(tmp_path, ""), config_path=None)
    assert capabilities.missing(unknown, ["CONFIG_SATA_AHCI"]) == []
    capabilities.require_config(unknown, "CONFIG_SATA_AHCI")


def test_kernel_config_marker_skips_with_the_reason(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kernel_config("CONFIG_BOOTHARNESS_NO_SUCH_OPTION")
        def test_needs_it(kernel):
            pass

        @pytest.mark.kernel_config("CONFIG_PCI")
        def test_has_it(kernel):
            pass
        """
    )
    toml = Path(__file__).resolve().parents[2] / "kernels.toml"
    result = pytester.runpytest("-p", "no:cacheprovider", "--kernels", str(toml), "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*lacks CONFIG_BOOTHARNESS_NO_SUCH_OPTION, needed by this test*"])


def test_kernels_marker_widens_only_when_no_kernel_is_chosen(pytester: pytest.Pytester) -> None:
    for name in ("one", "two", "three"):
        pytester.path.joinpath(f"{name}.bzImage").write_bytes(b"")
    pytester.makefile(
        ".toml",
        kernels="""
        default = "one"
        [kernels."one"]
        vmlinuz = "one.bzImage"
        tags = ["default", "nightly"]
        [kernels."two"]
        vmlinuz = "two.bzImage"
        [kernels."three"]
        vmlinuz = "three.bzImage"
        tags = ["nightly"]
        """,
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kernels("nightly", widen=True)
        def test_matrix(kernel):
            pass

        @pytest.mark.kernels("nightly")
        def test_filtered(kernel):
            pass
        """
    )

    def collected(*args: str) -> list[str]:
        result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q", *args)
        return sorted(line.split("::")[1] for line in result.outlines if "::" in line)

    assert collected() == ["test_filtered[one]", "test_matrix[one]", "test_matrix[three]"]
    assert collected("--kernel", "three") == ["test_filtered[three]", "test_matrix[three]"]
    assert collected("--kernel", "two") == ["test_filtered[no-kernel]", "test_matrix[no-kernel]"]
