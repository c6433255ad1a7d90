"""Real boots through every boot path: QEMU -kernel (PVH, bzImage), SeaBIOS + GRUB from an MBR
disk, OVMF + GRUB EFI and OVMF + the kernel's EFI stub from an EFI system partition.

The same kernel and the same initramfs (the disk's controller driver in it) reach PASS on
every path; the guest sees the data disk on the controller under test and, through a disk,
the disk it booted from. The default run boots the five paths on AHCI; IDE is nightly.
GRUB menus: an entry chosen by default or by keys at the menu; a broken entry is GRUB's own
error as TEST_FAIL; a bisection over entries finds the first broken one. Base images and
firmware files are never written (the suite's conftest also checks the firmware at the end).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.bisect.search import Observation, Status, bisect
from harness.cache import build_once, cache_root
from harness.image.bootdisk import Menu, MenuEntry
from harness.kernel import bzimage
from harness.outcome import HarnessError, Outcome, TestFailure
from harness.storage import disks, firmware
from harness.storage.controllers import Disk

DATA_LABEL = "bh-bootpath"
BOOT_DISK_LABEL = {"bios-grub": "boot", "uefi-grub": "ESP", "uefi-stub": "ESP"}
MISSING_INITRD = "/boot/initrd-missing.img"
GRUB_MISSING = f"error: file `{MISSING_INITRD}' not found."
TWO_ENTRIES = Menu((MenuEntry("good"), MenuEntry("bad initrd", initrd=MISSING_INITRD)))

CONTROLLERS = [
    pytest.param("ahci", id="ahci"),
    pytest.param("ide", id="ide", marks=pytest.mark.nightly),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data_disk(tmp_path_factory: pytest.TempPathFactory) -> disks.DiskImage:
    """A small labelled ext4 disk the guest must find on the controller under test."""
    base = tmp_path_factory.mktemp("bootpath-data")
    (base / "data").mkdir()
    (base / "data" / "hello").write_text("boot paths\n")
    return disks.filesystem(base / "data", base / "data.raw", label=DATA_LABEL, size="8M")


@pytest.mark.parametrize("disk_controller", CONTROLLERS)
@pytest.mark.boot_paths("all", widen=True)
def test_every_boot_path_reaches_pass(
    boot, kernel, boot_path, disk_controller: str, data_disk: disks.DiskImage
) -> None:
    checks = [f"findfs LABEL={DATA_LABEL}"]
    if not boot_path.direct:  # the guest sees the disk it booted from
        checks.append(f"findfs LABEL={BOOT_DISK_LABEL[boot_path.name]}")
    before = data_disk.digest()
    vm = boot(
        variables={"commands": checks},
        disks=[Disk(data_disk, disk_controller)],
        boot_controller=disk_controller,
    )
    vm.expect_pass()
    vm.wait_shutdown()
    marks = {m.name: m for m in vm.marks}
    assert vm.machine.console_log.read_text().count("Linux version") == 1
    assert vm.boot.path is boot_path
    if boot_path.direct:
        assert vm.spec.kernel is not None
        assert vm.spec.kernel.name.startswith("vmlinux" if boot_path.name == "pvh" else "vmlinuz")
        assert not any(m.startswith("loader-") for m in marks)
    else:
        assert vm.spec.kernel is None  # no -kernel: the firmware booted the disk
        argv = " ".join(vm.machine.argv)
        assert "bootindex=0" in argv and "-kernel" not in vm.machine.argv
    if boot_path.loader == "grub":
        assert vm.boot_entry == kernel.name  # the one-entry menu's entry booted
    if boot_path.firmware == "ovmf":
        # Through the firmware's own hand-over, OVMF's code read-only, a per-VM store.
        assert "firmware-done" in marks
        ovmf = firmware.ovmf()
        assert f"file={ovmf.code},readonly=on" in " ".join(vm.machine.argv)
        assert (vm.machine.workdir / "ovmf-vars.fd").is_file()
    if boot_path.name == "uefi-stub":
        assert "EFI stub: Loaded initrd from command line option" in (
            vm.machine.console_log.read_text()
        )
    assert data_disk.digest() == before


def test_two_entry_menu_by_default_and_by_keys(boot) -> None:
    """The good entry boots as the default; the broken one, chosen by keys at the menu, is
    GRUB's error as TEST_FAIL (not a timeout), and the report says which entry ran."""
    good = boot(boot_path="bios-grub", menu=TWO_ENTRIES, entry="good")
    good.expect_pass()
    assert good.boot_entry == "good"
    bad = boot(
        boot_path="bios-grub", menu=TWO_ENTRIES, entry="bad initrd", select="keys", start=False
    )
    with pytest.raises(TestFailure) as caught:
        bad.start()
    assert caught.value.outcome is Outcome.TEST_FAIL
    assert caught.value.message == f"GRUB failed booting entry 'bad initrd': {GRUB_MISSING}"
    assert caught.value.evidence.phase == "loader"
    assert bad.boot_entry == "bad initrd"
    assert "kernel-banner" not in {m.name for m in bad.marks}


@pytest.mark.nightly
def test_two_entry_menu_by_keys_on_uefi(boot) -> None:
    """GRUB EFI reads keys through the firmware's console; the same menu, the same verdicts."""
    bad = boot(boot_path="uefi-grub", menu=TWO_ENTRIES, entry=1, select="keys", start=False)
    with pytest.raises(TestFailure, match="GRUB failed booting entry 'bad initrd'"):
        bad.start()
    good = boot(boot_path="uefi-grub", menu=TWO_ENTRIES, entry=0, select="keys")
    good.expect_pass()
    assert good.boot_entry == "good"


@pytest.mark.nightly
def test_bisect_over_menu_entries(boot) -> None:
    """Entries in the order of a history, the first broken one found like a broken kernel."""
    titles = ["2024-01", "2024-02", "2024-03", "2024-04"]
    menu = Menu(
        tuple(
            MenuEntry(t, initrd=MISSING_INITRD if t >= "2024-03" else "/boot/initrd.img")
            for t in titles
        )
    )

    def oracle(title: str) -> Observation:
        vm = boot(boot_path="bios-grub", menu=menu, entry=title, start=False)
        try:
            vm.start()
            vm.expect_pass()
        except HarnessError as error:
            return Observation(error.outcome, vm.machine.console_log, error.message)
        finally:
            vm.stop()
        return Observation(Outcome.PASS, vm.machine.console_log)

    result = bisect(titles, oracle)
    assert result.status is Status.FOUND, result.render()
    assert (result.last_good, result.first_bad) == ("2024-02", "2024-03")
    bad_step = result.step_of("2024-03")
    assert bad_step is not None and GRUB_MISSING in bad_step.observation.message


def test_base_images_and_firmware_are_never_written(boot, data_disk: disks.DiskImage) -> None:
    """OVMF writes its variable store and the guest writes its disks: only the VM's copies
    change (the copy of the store, the overlays), never the templates and bases."""
    ovmf = firmware.ovmf()
    watched = [*ovmf.files, *firmware.seabios().files, data_disk.path]
    before = {p: sha256(p) for p in watched}
    vm = boot(
        boot_path="uefi-grub",
        disks=[Disk(data_disk, "ahci")],
        variables={"commands": ["dd if=/dev/zero of=/dev/sda bs=4k count=4 2>/dev/null", "sync"]},
        start=False,
    )
    boot_disk = next(vm.machine.workdir.glob("boot-uefi-grub.raw"))
    before[boot_disk] = sha256(boot_disk)
    vm.start()
    vm.expect_pass()
    vm.wait_shutdown()
    assert {p: sha256(p) for p in before} == before
    assert sha256(vm.machine.workdir / "ovmf-vars.fd") != before[ovmf.files[1]]


# -- a real kernel built without the EFI stub ---------------------------------------------------

LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")  # Debian's linux-source-6.1


@pytest.fixture(scope="session")
def kernel_without_efi_stub() -> tuple[Path, Path]:
    """A 64-bit tinyconfig bzImage from Debian's kernel source (no EFI at all), built once into
    the cache: (bzImage, .config). Minutes of compiling on 2 cores, hence nightly."""
    if not LINUX_SOURCE.is_file():
        pytest.skip(f"{LINUX_SOURCE} is missing: apt-get install linux-source-6.1")
    folder = cache_root() / "test-kernels" / "tinyconfig-no-efi-stub"

    def build(partial: Path) -> None:
        partial.mkdir()
        subprocess.run(["tar", "-xf", str(LINUX_SOURCE), "-C", str(partial)], check=True)
        (tree,) = partial.glob("linux-source-*")
        out = partial / "build"

        def make(*targets: str) -> None:
            jobs = f"-j{os.cpu_count() or 1}"
            argv = ["nice", "-n", "10", "make", "-C", str(tree), f"O={out}", jobs, *targets]
            subprocess.run(argv, check=True, capture_output=True)

        make("tinyconfig")
        config = out / ".config"
        config.write_text(config.read_text() + "CONFIG_64BIT=y\n")
        make("olddefconfig")
        make("bzImage")
        shutil.copyfile(out / "arch/x86/boot/bzImage", partial / "bzImage")
        shutil.copyfile(config, partial / "config")
        shutil.rmtree(tree)
        shutil.rmtree(out)

    build_once(folder, build)
    return folder / "bzImage", folder / "config"


@pytest.mark.nightly
def test_uefi_stub_skips_a_real_kernel_built_without_the_efi_stub(
    pytester: pytest.Pytester, kernel_without_efi_stub: tuple[Path, Path]
) -> None:
    bz, config = kernel_without_efi_stub
    assert "CONFIG_EFI_STUB=y" not in config.read_text()
    assert not bzimage.has_efi_stub(bz)  # no PE header in the image itself
    (pytester.path / "kernels.toml").write_text(
        f'[kernels."tiny"]\nvmlinuz = "{bz}"\nconfig = "{config}"\n'
        f'[kernels."tiny-no-config"]\nvmlinuz = "{bz}"\n'
    )
    pytester.makepyfile("def test_boot(boot, boot_path):\n    boot()\n")
    args = ["--kernels=kernels.toml", "--kernel", "tiny", "--kernel", "tiny-no-config"]
    result = pytester.runpytest(*args, "--boot-path", "uefi-stub", "-rs", "--accel", "tcg")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*kernel tiny (*) lacks CONFIG_EFI_STUB, needed by boot path uefi-stub*",
            "*kernel tiny-no-config (*): its bzImage has no EFI stub (no PE header*",
        ]
    )


@pytest.mark.nightly
def test_uefi_grub_without_a_working_loader_is_test_fail(boot, tmp_path: Path) -> None:
    """OVMF cannot start a BOOTX64.EFI that is no PE image and falls back to its shell: the
    boot fails in the firmware phase, saying so, instead of waiting at the shell's prompt."""
    broken = tmp_path / "BOOTX64.EFI"
    broken.write_text("not a PE image\n")
    vm = boot(boot_path="uefi-grub", boot_files={"/EFI/BOOT/BOOTX64.EFI": broken}, start=False)
    with pytest.raises(TestFailure, match="found no boot loader on the disk") as caught:
        vm.start()
    assert caught.value.evidence.phase == "firmware"
    assert "EFI Internal Shell" in caught.value.message
