"""Real boots from real disks: every controller, partitioned images, LABEL=/UUID= roots,
several disks, QEMU's view against the guest's, failures that say why, untouched bases.

Each boot's initramfs finds the root disk through the controller's own driver (added to
the initramfs by the boot fixture, never listed here), mounts it and switch_roots into a
minimal root (harness.image.rootfs) whose /sbin/init proves it runs as PID 1 on that disk.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from harness import tools
from harness.image import rootfs
from harness.outcome import TestFailure
from harness.storage import disks
from harness.storage.controllers import CONTROLLERS, Disk
from harness.storage.disks import DiskImage
from harness.vm import blockview

ROOT_LABEL = "bh-root"
DATA_LABEL = "bh-data"
FAST_ROOT_WAIT = 2  # seconds the init waits for a root that will never come


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Base images shared by this module's tests (read-only, booted through overlays)."""
    base = tmp_path_factory.mktemp("storage-images")
    plain = rootfs.build(base / "root")
    writer = rootfs.build(
        base / "writer",
        commands=[
            "echo written-by-the-guest > /written && sync",
            "grep -q written-by-the-guest /written",
        ],
    )
    two_disks = rootfs.build(
        base / "two-disks",
        commands=[
            f"mount -t ext4 -o ro LABEL={DATA_LABEL} /mnt",
            "grep -q data-disk /mnt/hello",
            "umount /mnt",
        ],
    )
    data = base / "data"
    data.mkdir()
    (data / "hello").write_text("data-disk\n")
    fs_raw = disks.filesystem(plain.path, base / "fs.raw", label=ROOT_LABEL, size="16M")
    return {
        "rootfs": plain,
        # The root most tests boot: qcow2, so base images of both formats are exercised.
        "root": disks.convert(fs_raw, base / "root.qcow2", "qcow2"),
        "partitioned": disks.partitioned(fs_raw, base / "partitioned.raw"),
        "writer_rootfs": writer,
        "writer": disks.filesystem(writer.path, base / "writer.raw", size="16M", fstype="ext4"),
        "two_rootfs": two_disks,
        "two": disks.filesystem(two_disks.path, base / "two.raw", label=ROOT_LABEL, size="16M"),
        "data": disks.filesystem(
            data, base / "data.qcow2", label=DATA_LABEL, size="8M", fmt="qcow2"
        ),
        "ext2": disks.filesystem(plain.path, base / "ext2.raw", fstype="ext2", size="16M"),
    }


def expect_new_root(vm, identity: str) -> tuple[str, str, str]:
    """Wait for the new root's markers; (device, file system type, ro|rw) of /."""
    _, detail = vm.expect_marker("ROOT-MOUNTED", phase="init")
    device, fstype, mode = detail.split()
    _, seen = vm.expect_marker("NEWROOT", phase="init")
    assert seen == identity, "the init ran on another root than the one built for this test"
    vm.expect_pass()
    vm.wait_shutdown()
    return device, fstype, mode


# -- the matrix: every nightly kernel x every controller ------------------------------------


@pytest.mark.kernels("nightly", widen=True)
@pytest.mark.parametrize("controller_name", list(CONTROLLERS))
def test_switch_root_on_every_controller(boot, images, controller_name: str) -> None:
    controller = CONTROLLERS[controller_name]
    device = controller.guest_disk(0)
    vm = boot(disks=[Disk(images["root"], controller)], variables={"root": device})
    assert expect_new_root(vm, images["rootfs"].identity) == (device, "ext4", "ro")
    # The initramfs found the disk through this controller's driver, which the fixture added.
    assert vm.marks[-1].name == "shutdown"
    _, found = next((m.name, m.detail) for m in vm.marks if m.name == "ROOT-FOUND")
    assert found == device


# -- roots: partitions, LABEL=, UUID=, ext2 ---------------------------------------------------


def test_partitioned_image_boots_from_its_first_partition(boot, images) -> None:
    image: DiskImage = images["partitioned"]
    controller = CONTROLLERS["virtio-blk"]
    root = controller.guest_partition(0, 1)
    vm = boot(disks=[Disk(image, controller)], variables={"root": root})
    assert expect_new_root(vm, images["rootfs"].identity) == ("/dev/vda1", "ext4", "ro")


@pytest.mark.parametrize("by", ["label", "uuid"])
def test_label_and_uuid_roots(boot, images, by: str) -> None:
    image: DiskImage = images["root"]
    vm = boot(disks=[Disk(image, "ahci")], variables={"root": image.root(by)})
    _, found = vm.expect_marker("ROOT-FOUND", phase="init")
    assert found == "/dev/sda"
    assert expect_new_root(vm, images["rootfs"].identity) == ("/dev/sda", "ext4", "ro")


def test_ext2_root_mounts_read_write(boot, images) -> None:
    image: DiskImage = images["ext2"]
    vm = boot(
        disks=[Disk(image, "virtio-scsi")],
        variables={"root": image.root("uuid"), "root_mode": "rw"},
    )
    # Debian serves ext2 with the ext4 driver (CONFIG_EXT4_USE_FOR_EXT2); the type says ext2.
    assert expect_new_root(vm, images["rootfs"].identity) == ("/dev/sda", "ext2", "rw")


# -- several disks and controllers; QEMU's view against the guest's -------------------------


def test_two_disks_on_two_controllers_both_appear(boot, images) -> None:
    vm = boot(
        disks=[Disk(images["two"], "ahci"), Disk(images["data"], "nvme")],
        variables={"root": f"LABEL={ROOT_LABEL}"},
    )
    # The new root's init mounts the second disk by its label and reads its file.
    assert expect_new_root(vm, images["two_rootfs"].identity) == ("/dev/sda", "ext4", "ro")
    assert any(m.name == "RUN" and m.detail == "3" for m in vm.marks)


def test_qemu_and_guest_agree_on_attached_disks(boot, tmp_path: Path) -> None:
    # Distinct sizes, one disk per controller model that exists on every nightly kernel,
    # plus a second disk on the same virtio-scsi controller.
    names = ["ide", "virtio-blk", "nvme", "virtio-scsi", "virtio-scsi"]
    attached = [
        Disk(disks.empty(tmp_path / f"disk{i}.qcow2", f"{8 + i}M"), name)
        for i, name in enumerate(names)
    ]
    vm = boot(disks=attached, variables={"commands": blockview.guest_commands(len(attached))})
    vm.expect_pass()
    qemu = blockview.query_qemu(vm.qmp)
    text = blockview.between_markers(vm.machine.console.recorder.text, vm.nonce)
    guest = blockview.parse_guest(text)
    vm.wait_shutdown()

    assert blockview.compare(qemu, guest) == []
    assert len(qemu.drives) == len(attached)
    # Each disk carries the serial the plan gave it, under the name its driver gives.
    plan = vm.storage.plan
    seen = {a.controller.name: blockview.disk_of(guest, a.serial) for a in plan.attachments}
    assert seen["virtio-blk"] == "vda"
    assert seen["nvme"] == "nvme0n1"
    assert {blockview.disk_of(guest, a.serial)[:2] for a in plan.attachments} == {"sd", "vd", "nv"}
    # The guest's /proc/partitions lists every disk at the size QEMU gave it.
    for drive in qemu.drives:
        name = blockview.disk_of(guest, drive.serial)
        assert guest.partitions[name] == drive.size


# -- failures end as TEST_FAIL carrying the init's reason, within seconds -------------------


def assert_gave_up_quickly(vm) -> None:
    """The init said FAIL after looking for the root (no BOOT_TIMEOUT: a wrong root is never
    left to the phase deadline). How soon is a figure for the benches, not a test."""
    marks = {m.name: m.at for m in vm.marks}
    assert marks["FAIL"] >= marks["PARTITIONS-LISTED"] >= marks["INIT-START"], marks


def test_missing_driver_is_test_fail_with_reason(boot, images) -> None:
    # AHCI disk, but a controller entry that forgets its driver: no /dev/sda ever comes.
    no_driver = dataclasses.replace(CONTROLLERS["ahci"], modules=("sd_mod",))
    vm = boot(
        disks=[Disk(images["root"], no_driver)],
        variables={"root": "/dev/sda", "root_wait": FAST_ROOT_WAIT},
    )
    with pytest.raises(TestFailure, match=r"root device /dev/sda did not appear within 2s"):
        vm.expect_pass()
    assert_gave_up_quickly(vm)


@pytest.mark.parametrize(
    ("root", "reason"),
    [
        ("LABEL=no-such-label", r"root device LABEL=no-such-label did not appear within 2s"),
        ("/dev/sdb", r"root device /dev/sdb did not appear within 2s"),
        ("/dev/sda", r"cannot mount /dev/sda"),  # a disk without a file system
    ],
    ids=["unknown-label", "no-such-disk", "no-file-system"],
)
def test_wrong_root_is_test_fail_with_reason(boot, tmp_path: Path, root: str, reason: str) -> None:
    blank = disks.empty(tmp_path / "blank.qcow2", "8M")
    vm = boot(
        disks=[Disk(blank, "virtio-scsi")],
        variables={"root": root, "root_wait": FAST_ROOT_WAIT, "root_fstype": "ext4"},
    )
    with pytest.raises(TestFailure, match=reason) as caught:
        vm.expect_pass()
    assert "the init failed" in caught.value.message
    assert_gave_up_quickly(vm)


# -- base images are never written ----------------------------------------------------------


def test_base_image_unchanged_after_the_guest_writes(boot, images) -> None:
    base: DiskImage = images["writer"]
    before = base.digest()
    assert base.path.stat().st_mode & 0o777 == 0o444
    vm = boot(disks=[Disk(base, "virtio-blk")], variables={"root": "/dev/vda", "root_mode": "rw"})
    assert expect_new_root(vm, images["writer_rootfs"].identity) == ("/dev/vda", "ext4", "rw")
    assert base.digest() == before
    # The guest's writes went to the overlay: its content now differs from the base.
    overlay = vm.storage.overlay(vm.machine.workdir)
    compared = subprocess.run(
        [
            tools.require("qemu-img"),
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            str(overlay),
            str(base.path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compared.returncode == 1, compared.stdout + compared.stderr  # 1: content differs


def test_controller_a_kernel_lacks_is_skipped_with_the_reason(kernel, boot, images) -> None:
    lacking = dataclasses.replace(
        CONTROLLERS["ahci"], name="ahci-needs-more", config=("CONFIG_BOOTHARNESS_NO_SUCH",)
    )
    if not kernel.config:
        pytest.skip(f"kernel {kernel.name} has no known config")
    with pytest.raises(
        pytest.skip.Exception,
        match=r"lacks CONFIG_BOOTHARNESS_NO_SUCH, needed by "
        r"controller ahci-needs-more",
    ) as caught:
        boot(disks=[Disk(images["root"], lacking)], variables={"root": "/dev/sda"})
    assert kernel.name in str(caught.value)
