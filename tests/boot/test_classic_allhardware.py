"""One initramfs for all hardware (initrd(4)): every storage driver in the image, and on each
controller the init loads, by the devices' modaliases alone, the drivers that machine needs.

The image carries the drivers of every controller the harness knows (with modules.dep and
modules.alias for just them); nothing is loaded by name. On each controller the test checks
that the controller's own driver and the disk driver were loaded, that no other controller's
driver was, and that the root on that disk was found and booted.
"""

from __future__ import annotations

import pytest

from harness.image import allhardware, rootfs
from harness.kernel.provision import Kernel
from harness.storage import disks
from harness.storage.controllers import CONTROLLERS, Disk
from harness.storage.disks import DiskImage
from harness.vm.boot import harness_modules

LABEL = "bh-allhw"
# The default run boots two controllers; the nightly run every one.
DEFAULT_SLICE = ("ahci", "virtio-scsi")
# The driver module each controller must have loaded (the pc machine's PIIX IDE is always
# there, so ata_piix loads on every machine; it is only "the" driver on ide).
OWN_DRIVER = {
    "ide": "ata_piix",
    "ahci": "ahci",
    "lsi": "sym53c8xx",
    "megasas": "megaraid_sas",
    "virtio-scsi": "virtio_scsi",
    "virtio-blk": "virtio_blk",
    "nvme": "nvme",
}
DISK_DRIVER = {"virtio-blk": "virtio_blk", "nvme": "nvme"}  # the others: sd_mod


@pytest.fixture(scope="module")
def root_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[rootfs.RootFs, DiskImage]:
    base = tmp_path_factory.mktemp("allhw")
    root = rootfs.build(base / "root")
    return root, disks.filesystem(root.path, base / "root.raw", label=LABEL, size="16M")


def controller_params() -> list[object]:
    return [
        pytest.param(name, marks=() if name in DEFAULT_SLICE else pytest.mark.nightly)
        for name in CONTROLLERS
    ]


@pytest.mark.kernels("default", "classic", widen=True)
@pytest.mark.parametrize("controller_name", controller_params())
def test_all_hardware_image_loads_only_what_the_machine_needs(
    boot, kernel: Kernel, root_image: tuple[rootfs.RootFs, DiskImage], controller_name: str
) -> None:  # type: ignore[no-untyped-def]
    if kernel.modules_dir is None:
        pytest.skip(f"kernel {kernel.name} has no modules: there are no drivers to choose from")
    carried = allhardware.available(kernel)
    if OWN_DRIVER[controller_name] not in carried:
        pytest.skip(f"kernel {kernel.name} has no {OWN_DRIVER[controller_name]} module")
    names = [*harness_modules(kernel), *carried]
    root, image = root_image
    vm = boot(
        modules=names,
        files=allhardware.index_files(kernel, names),
        disks=[Disk(image, controller_name)],
        variables={
            "coldplug": True,
            "root": f"LABEL={LABEL}",
            "root_fstype": "ext4",
            "root_wait": 20,
        },
    )
    _, detail = vm.expect_marker("COLDPLUG", phase="init")
    loaded = allhardware.loaded_modules(detail)
    own = OWN_DRIVER[controller_name]
    assert own in loaded, f"{own} was not loaded on {controller_name}: {detail}"
    assert DISK_DRIVER.get(controller_name, "sd_mod") in loaded, detail
    others = {OWN_DRIVER[c] for c in CONTROLLERS if c != controller_name} - {"ata_piix"}
    if controller_name in ("virtio-scsi", "virtio-blk"):
        others -= {"virtio_scsi", "virtio_blk"} - {own}
    wrong = sorted(m for m in others if m in loaded)
    assert not wrong, f"drivers for hardware this machine lacks were loaded: {wrong} ({detail})"
    _, identity = vm.expect_marker("NEWROOT", phase="init")
    assert identity == root.identity
    vm.expect_pass()
    vm.wait_shutdown()
