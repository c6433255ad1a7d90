"""CD-ROM distributions (initrd(4)): an initrd that loads the CD drivers, finds the CD by its
label and mounts its root, on the four kinds of drive a PC has: ATAPI on the pc machine's PIIX
IDE and on AHCI, SCSI on virtio-scsi and on the LSI 53C895A.

The root is an ISO 9660 image (Rock Ridge) made from a folder without root privileges; the
initramfs gets the controller's driver, ``sr_mod`` and ``isofs`` from the boot fixture (from
the drive and the root's file system type), waits for ``LABEL=<volume id>`` and switch_roots
into it. The new root's init proves it runs as PID 1 on ``/dev/sr0`` (iso9660, read-only).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.image import rootfs
from harness.storage import attach, disks
from harness.storage.controllers import Disk
from harness.storage.disks import DiskImage
from harness.vm.boot import Vm

LABEL = "BH_CDROM"
DRIVES = ("ide", "ahci", "virtio-scsi", "lsi")


@pytest.fixture(scope="module")
def cd_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[rootfs.RootFs, DiskImage]:
    """A busybox root on an ISO 9660 image (read-only base, shared by the module's tests)."""
    base = tmp_path_factory.mktemp("cdrom")
    root = rootfs.build(base / "root", commands=["grep -q ' / iso9660 ' /proc/mounts"])
    return root, disks.iso9660(root.path, base / "root.iso", label=LABEL)


def boot_from_cd(boot, image: DiskImage, drive: str) -> Vm:  # type: ignore[no-untyped-def]
    return boot(
        disks=[Disk(image, drive, media="cdrom")],
        variables={"root": f"LABEL={LABEL}", "root_fstype": "iso9660", "root_wait": 20},
    )


@pytest.mark.parametrize("drive", DRIVES)
def test_cdrom_root_found_by_label(
    boot, cd_root: tuple[rootfs.RootFs, DiskImage], drive: str
) -> None:  # type: ignore[no-untyped-def]
    root, image = cd_root
    digest = image.digest()
    vm = boot_from_cd(boot, image, drive)
    _, found = vm.expect_marker("ROOT-FOUND", phase="init")
    assert found == "/dev/sr0", f"the init found {found}, not the CD drive"
    _, mounted = vm.expect_marker("ROOT-MOUNTED", phase="init")
    assert mounted.split() == ["/dev/sr0", "iso9660", "ro"]
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == root.identity
    vm.expect_pass()
    vm.wait_shutdown()
    assert image.digest() == digest, "the CD image changed"


def test_cdrom_drive_arguments(cd_root: tuple[rootfs.RootFs, DiskImage], tmp_path: Path) -> None:
    """What QEMU gets: the image itself, read-only, as a CD (no overlay is made for it)."""
    _, image = cd_root
    plan = attach.plan([Disk(image, "ahci", media="cdrom")], variables={"root": "LABEL=x"})
    args = plan.attach(tmp_path)
    assert f"file={image.path.resolve()},format=raw,media=cdrom,readonly=on" in " ".join(args)
    assert "ide-cd,drive=disk0,bus=ahci0.0" in " ".join(args)
    assert not list(tmp_path.iterdir()), "a CD-ROM gets no overlay"
    assert plan.modules == ("ahci", "sr_mod", "isofs")
