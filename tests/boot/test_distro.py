"""Real systems: a Debian 12 root with systemd, booted by initramfs-tools and dracut images made
for the kernel under test, from partitions, LVM, md RAID1 and LUKS2.

Everything is built from Debian's packages and cached (root, initramfs, root image, layout):
the first run on a machine builds for minutes, later runs boot at once. The default run boots
one cell of the matrix; the whole generator x layout x controller matrix and the failure cases
are ``nightly`` (``-m nightly`` or BOOTHARNESS_NIGHTLY=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.image import distro as distro_image
from harness.image.distro import DEFAULT_PACKAGES, GENERATORS, DistroBuildError, RootSpec
from harness.kernel.provision import Kernel
from harness.outcome import Outcome, TestFailure
from harness.plugin.fixtures import DistroBoot
from harness.plugin.settings import settings_key
from harness.storage.layouts import GUEST_LAYOUTS, LAYOUTS
from harness.vm import distro

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="distro roots need root (chroot, mounts)"),
    pytest.mark.kernels("default"),
]

CONTROLLERS = ("ahci", "virtio-scsi")
MATRIX_LAYOUTS = tuple(name for name in LAYOUTS if name != "disk")
DEFAULT_CELL = ("initramfs-tools", "lvm", "ahci")
# Where / comes from in the guest, per layout (findmnt's SOURCE).
ROOT_SOURCE = {
    "mbr": "1",
    "gpt": "1",
    "lvm": "/dev/mapper/vg0-root",
    "raid1": "/dev/md",
    "luks": "/dev/mapper/",
}
MISSING_DEVICE_FSTAB = (
    b"LABEL=root / ext4 defaults 0 1\n"
    # A short device timeout: systemd's default is 90 s, the outcome is the same.
    b"LABEL=missing /mnt/data ext4 defaults,x-systemd.device-timeout=5s 0 2\n"
)


def _controllers(layout: str, controller: str) -> tuple[str, ...]:
    """A RAID1's two members go on two controllers: the cell's, then the other one."""
    if layout != "raid1":
        return (controller,)
    return (controller, next(c for c in CONTROLLERS if c != controller))


def _layout_dimension(layout: str) -> str:
    if layout == "disk":
        return ""
    return f"gpt+{layout}" if layout in GUEST_LAYOUTS else layout


def _cells() -> list[object]:
    cells: list[object] = []
    for generator in GENERATORS:
        for layout in MATRIX_LAYOUTS:
            for controller in CONTROLLERS:
                cell = (generator, layout, controller)
                marks = () if cell == DEFAULT_CELL else (pytest.mark.nightly,)
                cells.append(pytest.param(*cell, marks=marks, id="-".join(cell)))
    return cells


@pytest.mark.parametrize(("generator", "layout", "controller_name"), _cells())
def test_distro_boot(
    distro_boot: DistroBoot, generator: str, layout: str, controller_name: str
) -> None:
    """systemd reaches multi-user and says so through the login shell."""
    vm = distro_boot(generator, layout, controllers=_controllers(layout, controller_name))
    shell = vm.login()
    state = shell.run("systemctl is-system-running --wait")
    assert (state.output.strip(), state.status) == ("running", 0), state.output
    source = shell.check("findmnt -n -o SOURCE /").strip()
    assert ROOT_SOURCE[layout] in source, source
    dimensions = vm.dimensions()
    assert dimensions.generator == generator
    assert dimensions.layout == _layout_dimension(layout)
    assert dimensions.initramfs == "foreign"


@pytest.mark.nightly
@pytest.mark.parametrize("generator", GENERATORS)
def test_missing_fstab_device_is_a_failure_naming_the_unit(
    distro_boot: DistroBoot, generator: str
) -> None:
    vm = distro_boot(generator, "gpt", files={"etc/fstab": MISSING_DEVICE_FSTAB})
    with pytest.raises(TestFailure) as failure:
        vm.login()
    assert failure.value.outcome is Outcome.TEST_FAIL
    message = failure.value.message
    assert message.startswith("systemd "), message
    # The device unit, named in full (PID 1's log line, not its status line cut at 80 columns).
    assert "dev-disk-by\\x2dlabel-missing.device" in message, message


@pytest.mark.nightly
@pytest.mark.parametrize("generator", GENERATORS)
def test_raid1_with_a_member_removed_boots_degraded(
    distro_boot: DistroBoot, generator: str
) -> None:
    # dracut starts a degraded array from an initqueue timeout hook, after 2/3 of rd.retry
    # (default 180 s); initramfs-tools after ~20 tries of its local-block loop.
    extra = "rd.retry=12" if generator == "dracut" else ""
    vm = distro_boot(generator, "raid1", controllers=("ahci",), members=(0,), cmdline=extra)
    shell = vm.login()
    mdstat = shell.check("cat /proc/mdstat")
    assert "[2/1]" in mdstat and "[U_]" in mdstat, mdstat
    detail = shell.check("mdadm --detail $(findmnt -n -o SOURCE /)")
    assert "degraded" in detail, detail
    state = shell.run("systemctl is-system-running --wait")
    assert state.output.strip() in ("running", "degraded"), state.output


@pytest.mark.nightly
@pytest.mark.parametrize(
    ("generator", "said"),
    [
        ("initramfs-tools", "cryptsetup failed, bad password or options"),
        ("dracut", "Failed to start systemd-cryptsetup@luks"),
    ],
    ids=GENERATORS,
)
def test_wrong_luks_passphrase_fails_with_the_generators_message(
    distro_boot: DistroBoot, generator: str, said: str
) -> None:
    vm = distro_boot(generator, "luks")
    with pytest.raises(TestFailure) as failure:
        vm.login(passphrase="not-the-passphrase")
    assert failure.value.outcome is Outcome.TEST_FAIL
    assert said in failure.value.message, failure.value.message
    assert "within" not in failure.value.message  # a verdict, not a deadline


@pytest.mark.nightly
@pytest.mark.parametrize("generator", GENERATORS)
def test_luks_key_file_unlocks_without_a_prompt(distro_boot: DistroBoot, generator: str) -> None:
    vm = distro_boot(generator, "luks", keyfile=True)
    assert vm.passphrase is None  # any passphrase prompt is a TEST_FAIL
    shell = vm.login()
    assert shell.check("findmnt -n -o FSTYPE /").strip() == "ext4"
    assert "/dev/mapper/" in shell.check("findmnt -n -o SOURCE /")


def test_second_prepare_builds_nothing(request: pytest.FixtureRequest, kernel: Kernel) -> None:
    """The default cell's pieces come from the cache the second time (the first may build),
    and building never wrote the cached root (the modules tree is bound, not copied in)."""
    cache_dir = request.config.stash[settings_key].cache_dir
    generator, layout, _ = DEFAULT_CELL
    first = distro.prepare(kernel, cache_dir, generator=generator, layout=layout)
    again = distro.prepare(kernel, cache_dir, generator=generator, layout=layout)
    assert again.built == ()
    assert again.initramfs.path == first.initramfs.path
    assert [d.path for d in again.layout.disks] == [d.path for d in first.layout.disks]
    assert not (again.root.path / "lib" / "modules").exists()
    assert all(d.path.stat().st_mode & 0o222 == 0 for d in again.layout.disks)


@pytest.mark.nightly
def test_a_failed_root_build_names_the_package(tmp_path: Path) -> None:
    spec = RootSpec(packages=(*DEFAULT_PACKAGES, "bootharness-no-such-package"))
    with pytest.raises(DistroBuildError) as failure:
        distro_image.build_root(spec, tmp_path, progress=False)
    assert failure.value.package == "bootharness-no-such-package"
    assert failure.value.step, failure.value.message
    assert "bootharness-no-such-package" in failure.value.message
    assert not distro_image.is_built(spec, tmp_path)
