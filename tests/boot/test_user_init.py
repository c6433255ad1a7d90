"""A user's own init that prints no harness markers, judged by console patterns.

The seed's classic hand-written init (examples/templates/classic-init.sh.j2) loads the disk
drivers, mounts /dev/sda and switch_roots into the root's /sbin/init. Its template declares
``{# bootharness: markers=off #}``, so the harness waits for the kernel's own "Run /init as
init process", then for the test's expect patterns, and takes the shipped table of root
failures (harness.vm.patterns) as TEST_FAIL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.image import cpio, rootfs
from harness.outcome import BootTimeout, KernelFault, TestFailure
from harness.storage import disks
from harness.storage.controllers import Disk
from harness.storage.disks import DiskImage
from harness.vm.deadlines import Deadlines

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "templates"
CLASSIC = "classic-init.sh.j2"
REACHED = "classic-root: reached /sbin/init as PID 1"
ROOT_INIT = """#!/bin/sh
echo "classic-root: reached /sbin/init as PID $$"
poweroff -f
"""


@pytest.fixture(scope="module")
def classic_root(tmp_path_factory: pytest.TempPathFactory) -> DiskImage:
    """An ext4 root whose /sbin/init prints one line and powers off (no markers)."""
    base = tmp_path_factory.mktemp("classic-root")
    tree = rootfs.build(base / "tree", init=ROOT_INIT)
    return disks.filesystem(tree.path, base / "root.raw", label="classic", size="16M")


@pytest.mark.parametrize(
    "bus",
    [
        "ide",
        "ahci",
        pytest.param("lsi", marks=pytest.mark.nightly),
        pytest.param("virtio-scsi", marks=pytest.mark.nightly),
    ],
)
def test_classic_init_reaches_the_roots_init(boot, classic_root: DiskImage, bus: str) -> None:
    vm = boot(
        CLASSIC,
        template_dirs=[EXAMPLES],
        root="/dev/sda",
        disks=[Disk(classic_root, bus)],
        expect=[REACHED],
    )
    assert not vm.markers
    vm.expect_pass()
    vm.wait_shutdown()
    names = [mark.name for mark in vm.marks]
    assert (
        "INIT-START" in names
        and "expect:1" in names
        and names.index("PASS") > names.index("INIT-START")
    )
    assert next(m for m in vm.marks if m.name == "INIT-START").detail == "/init"


def test_classic_init_without_the_disk_driver_fails_naming_the_line(
    boot, build_initramfs, classic_root: DiskImage
) -> None:
    """Built for ide (ata_piix), booted with the disk on ahci: the mount fails, and the
    verdict is TEST_FAIL with busybox's own line, not a timeout."""
    image = build_initramfs(
        CLASSIC,
        variables={"root": "/dev/sda"},
        modules=["ata_piix", "sd_mod", "ext4"],
        template_dirs=[EXAMPLES],
    )
    with pytest.raises(TestFailure) as failure:
        vm = boot(initrd=image.path, disks=[Disk(classic_root, "ahci")], expect=[REACHED])
        vm.expect_pass()
    assert "busybox root-mount-failed: mount: mounting /dev/sda on /mnt failed" in str(
        failure.value.message
    )


def test_a_kernel_fault_wins_over_the_failure_line_before_it(boot, tmp_path: Path) -> None:
    """An /init the kernel cannot execute: "No working init found" is a row of the table
    and a kernel panic at once; the panic decides (KERNEL_FAULT), the line is its reason."""
    image = tmp_path / "broken.img"
    image.write_bytes(cpio.write_archive([cpio.Entry.file("init", b"not a program\n", mode=0o755)]))
    with pytest.raises(KernelFault, match="No working init found"):
        vm = boot(initrd=image, expect=["never printed"])
        vm.expect_pass()


def test_no_expected_line_before_the_deadline_is_a_timeout(boot, tmp_path: Path) -> None:
    (tmp_path / "quiet.sh.j2").write_text(
        "#!/bin/sh\n{# bootharness: markers=off #}\necho quiet init\nexec sleep 600\n"
    )
    vm = boot(
        "quiet.sh.j2",
        template_dirs=[tmp_path],
        expect=["quiet init", "never printed"],
        deadlines=Deadlines(init=3.0),
    )
    with pytest.raises(BootTimeout, match="'never printed'"):
        vm.expect_pass()
    assert [m.name for m in vm.marks if m.name.startswith("expect:")] == ["expect:1"]
