"""Boot paths as data, GRUB menus, boot disks, firmware files, loader patterns (no boots).

The disk builders run their real tools (sfdisk, mke2fs, mkfs.fat, mtools, grub-mkimage) and
the results are read back with other real tools (sfdisk --dump, debugfs, mtools): no root,
no loop device, no mount.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from harness.image import bootdisk
from harness.image.bootdisk import Menu, MenuEntry
from harness.kernel import bzimage
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.report.model import TestRecord, junit_properties, phase_split
from harness.storage import attach, bootpaths, firmware
from harness.storage.bootpaths import BOOT_PATHS, BootSpec
from harness.storage.controllers import Disk, plan
from harness.storage.disks import DiskImage
from harness.vm.console import ConsoleRecorder
from harness.vm.loader import failure_reason, loader_errors

ISSUE_PATHS = ("pvh", "bzimage", "bios-grub", "uefi-grub", "uefi-stub")


def fake_bzimage(path: Path, *, stub: bool) -> Path:
    """A file with an x86 boot header, with or without the EFI stub's MZ/PE headers."""
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    if stub:
        data[0:2] = b"MZ"
        data[0x3C:0x40] = (0x80).to_bytes(4, "little")
        data[0x80:0x84] = b"PE\0\0"
    else:
        data[0:2] = b"\xea\x05"  # the plain boot sector's far jump
    path.write_bytes(bytes(data))
    return path


def kernel_with(tmp_path: Path, config: str | None, *, stub: bool = True) -> Kernel:
    vmlinuz = fake_bzimage(tmp_path / "vmlinuz", stub=stub)
    config_path = None
    if config is not None:
        config_path = tmp_path / "config"
        config_path.write_text(config)
    return Kernel("k", "6.1.0-k", vmlinuz, None, config_path, None)


# -- the table -------------------------------------------------------------------------------


def test_the_five_paths_of_the_issue_in_order() -> None:
    assert tuple(BOOT_PATHS) == ISSUE_PATHS
    assert [p.name for p in bootpaths.select(["all"])] == list(ISSUE_PATHS)
    assert [p.name for p in bootpaths.select([])] == ["pvh"]
    assert [p.name for p in bootpaths.select(["uefi-stub", "pvh"])] == ["pvh", "uefi-stub"]


def test_unknown_boot_paths_are_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'grub2', 'efi'.*pvh, bzimage, bios-grub"):
        bootpaths.select(["grub2", "pvh", "efi"])
    with pytest.raises(ConfigError, match="unknown boot path 'x'"):
        bootpaths.get("x")


def test_paths_say_their_firmware_disk_and_loader() -> None:
    firmware_of = {p.name: p.firmware for p in BOOT_PATHS.values()}
    assert firmware_of == {
        "pvh": "seabios",
        "bzimage": "seabios",
        "bios-grub": "seabios",
        "uefi-grub": "ovmf",
        "uefi-stub": "ovmf",
    }
    assert [p.name for p in BOOT_PATHS.values() if p.direct] == ["pvh", "bzimage"]
    assert [p.name for p in BOOT_PATHS.values() if p.has_menu] == ["bios-grub", "uefi-grub"]
    assert BOOT_PATHS["uefi-stub"].requires == ("CONFIG_EFI_STUB",)


def test_uefi_stub_needs_the_efi_stub_by_config(tmp_path: Path) -> None:
    stub = BOOT_PATHS["uefi-stub"]
    without = kernel_with(tmp_path, "CONFIG_EFI=y\n# CONFIG_EFI_STUB is not set\n")
    reason = bootpaths.lacks_reason(stub, without)
    assert reason is not None
    assert "lacks CONFIG_EFI_STUB, needed by boot path uefi-stub" in reason
    assert bootpaths.lacks_reason(BOOT_PATHS["uefi-grub"], without) is None
    with_stub = kernel_with(tmp_path, "CONFIG_EFI=y\nCONFIG_EFI_STUB=y\n")
    assert bootpaths.lacks_reason(stub, with_stub) is None


def test_uefi_stub_needs_the_efi_stub_by_the_image_when_no_config(tmp_path: Path) -> None:
    stub = BOOT_PATHS["uefi-stub"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = kernel_with(tmp_path / "a", None, stub=False)
    reason = bootpaths.lacks_reason(stub, plain)
    assert reason is not None and "no EFI stub" in reason and "CONFIG_EFI_STUB" in reason
    assert bootpaths.lacks_reason(stub, kernel_with(tmp_path / "b", None, stub=True)) is None


def test_efi_stub_detection_on_the_header(tmp_path: Path) -> None:
    assert bzimage.has_efi_stub(fake_bzimage(tmp_path / "s", stub=True))
    assert not bzimage.has_efi_stub(fake_bzimage(tmp_path / "n", stub=False))
    (tmp_path / "elf").write_bytes(b"\x7fELF" + bytes(0x1000))
    with pytest.raises(ConfigError, match="not an x86 bzImage"):
        bzimage.has_efi_stub(tmp_path / "elf")


# -- the boot spec: menus, entries, keys -----------------------------------------------------

TWO = Menu((MenuEntry("good"), MenuEntry("bad initrd", initrd="/boot/initrd-missing.img")))


def test_menu_entries_by_index_or_title() -> None:
    assert TWO.index(1) == 1
    assert TWO.index("bad initrd") == 1
    with pytest.raises(ConfigError, match="no entry 'ugly'; entries: 'good', 'bad initrd'"):
        TWO.index("ugly")
    with pytest.raises(ConfigError, match="no entry 2"):
        TWO.index(2)
    with pytest.raises(ConfigError, match="titles must differ"):
        Menu((MenuEntry("a"), MenuEntry("a")))


def test_chosen_entry_becomes_the_default_or_keys_at_the_menu() -> None:
    bios = BOOT_PATHS["bios-grub"]
    by_default = BootSpec(bios, menu=TWO, entry="bad initrd")
    written = by_default.resolved_menu("k")
    assert (written.default, written.timeout) == (1, 0)
    assert [p.keys for p in by_default.prompts("k")] == []
    by_keys = BootSpec(bios, menu=TWO, entry=1, select="keys")
    written = by_keys.resolved_menu("k")
    assert written.default == 0 and written.timeout == bootpaths.KEYS_MENU_TIMEOUT
    (prompt,) = by_keys.prompts("k")
    assert prompt.keys == "v\r" and prompt.pattern is bootpaths.GRUB_MENU
    back = BootSpec(bios, menu=Menu(TWO.entries, default=1), entry=0, select="keys")
    assert back.prompts("k")[0].keys == "^\r"


def test_boot_specs_that_cannot_be() -> None:
    with pytest.raises(ConfigError, match="pvh has no boot disk"):
        BootSpec(BOOT_PATHS["pvh"], menu=TWO)
    with pytest.raises(ConfigError, match="a menu of several needs GRUB"):
        BootSpec(BOOT_PATHS["uefi-stub"], menu=TWO)
    with pytest.raises(ConfigError, match="selection 'mouse'"):
        BootSpec(BOOT_PATHS["bios-grub"], select="mouse")
    with pytest.raises(ConfigError, match="no entry 'x'"):
        BootSpec(BOOT_PATHS["bios-grub"], menu=TWO, entry="x")


def test_uefi_stub_answers_the_shell_countdown() -> None:
    (prompt,) = BootSpec(BOOT_PATHS["uefi-stub"]).prompts("k")
    countdown = (
        "Press \x1b[1mESC\x1b[0m in 5 seconds to skip startup.nsh or any other key to continue."
    )
    assert prompt.pattern.search(countdown) and prompt.keys == "\r"


# -- grub.cfg and startup.nsh ----------------------------------------------------------------


def test_grub_cfg_has_one_quoted_menuentry_per_entry() -> None:
    menu = Menu((MenuEntry("good"), MenuEntry("it's $bad", initrd=None, cmdline="x=1")), default=1)
    text = bootdisk.render_grub_cfg(menu, "console=ttyS0 bootharness.nonce=abc")
    assert "set default='1'\n" in text and "set timeout='0'\n" in text
    assert "timeout_style" not in text
    assert text.count("menuentry ") == 2
    assert "menuentry 'it'\\''s $bad' {" in text  # single quotes: GRUB expands nothing
    assert "\tlinux '/boot/vmlinuz' 'console=ttyS0' 'bootharness.nonce=abc'\n" in text
    assert "'bootharness.nonce=abc' 'x=1'\n" in text
    assert text.count("\tinitrd '/boot/initrd.img'") == 1  # initrd=None: no initrd line
    assert "echo 'Booting menu entry 1: it'\\''s $bad'" in text
    shown = bootdisk.render_grub_cfg(Menu(menu.entries, timeout=30), "")
    assert "set timeout='30'\nset default='0'\nset timeout_style=menu\n" in shown


def test_startup_nsh_starts_the_stub_with_the_command_line() -> None:
    script = bootdisk.startup_nsh(MenuEntry("k"), "console=ttyS0 bootharness.nonce=abc")
    assert script == (
        "\\boot\\vmlinuz console=ttyS0 bootharness.nonce=abc initrd=\\boot\\initrd.img\r\n"
    )


# -- the disks, built for real and read back ------------------------------------------------


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("payload")
    (folder / "vmlinuz").write_bytes(b"kernel" * 100000)
    (folder / "initrd.img").write_bytes(b"initrd" * 50000)
    return {
        bootdisk.KERNEL_PATH: folder / "vmlinuz",
        bootdisk.INITRD_PATH: folder / "initrd.img",
    }


def sfdisk_dump(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["sfdisk", "--json", str(path)], capture_output=True, text=True, check=True
    ).stdout
    table: dict[str, object] = json.loads(out)["partitiontable"]
    return table


def test_bios_disk_mbr_grub_in_the_gap_ext4_at_1mib(
    tmp_path: Path, payload: dict[str, Path]
) -> None:
    cfg = bootdisk.render_grub_cfg(TWO, "console=ttyS0")
    disk = bootdisk.bios_disk(tmp_path / "bios.raw", payload, cfg, cache_root=tmp_path / "c")
    table = sfdisk_dump(disk)
    assert table["label"] == "dos"
    (part,) = table["partitions"]  # type: ignore[misc]
    assert part["start"] == 2048 and part["type"] == "83" and part.get("bootable") is True
    data = disk.read_bytes()
    boot_img = (bootdisk.GRUB_BIOS.directory / "boot.img").read_bytes()
    assert data[:0x66] == boot_img[:0x66]  # GRUB's MBR code, pointing at sector 1
    assert data[0x66:0x68] == b"\x90\x90"  # the drive check, as grub-bios-setup leaves it
    assert data[0x68:0x1B8] == boot_img[0x68:0x1B8]
    assert data[0x1FE:0x200] == b"\x55\xaa"
    core = bootdisk.grub_image(bootdisk.GRUB_BIOS, tmp_path / "c").read_bytes()
    assert data[512 : 512 + len(core)] == core  # the core image in the gap
    assert len(core) < 1024 * 1024 - 512
    # Read /boot back with debugfs from the partition at 1 MiB.
    fs = tmp_path / "fs.raw"
    fs.write_bytes(data[1024 * 1024 :])
    listing = subprocess.run(
        ["debugfs", "-R", "ls -p /boot", str(fs)], capture_output=True, text=True, check=True
    ).stdout
    assert "/vmlinuz/" in listing and "/initrd.img/" in listing and "/grub/" in listing
    got = subprocess.run(
        ["debugfs", "-R", "cat /boot/grub/grub.cfg", str(fs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert got == cfg


def test_esp_disk_gpt_fat_with_grub_efi(tmp_path: Path, payload: dict[str, Path]) -> None:
    cfg = bootdisk.render_grub_cfg(TWO, "console=ttyS0")
    disk = bootdisk.esp_disk(tmp_path / "esp.raw", payload, grub_cfg=cfg, cache_root=tmp_path)
    table = sfdisk_dump(disk)
    assert table["label"] == "gpt"
    (part,) = table["partitions"]  # type: ignore[misc]
    assert part["start"] == 2048
    assert part["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"  # EFI system partition
    image = f"{disk}@@1M"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    loader = tmp_path / "BOOTX64.EFI"
    subprocess.run(
        ["mcopy", "-i", image, "::/EFI/BOOT/BOOTX64.EFI", str(loader)], check=True, env=env
    )
    assert loader.read_bytes()[:2] == b"MZ"  # a PE image, GRUB EFI's
    shown = subprocess.run(
        ["mtype", "-i", image, "::/boot/grub/grub.cfg"], capture_output=True, text=True, env=env
    )
    assert shown.stdout == cfg
    files = subprocess.run(
        ["mdir", "-b", "-i", image, "::/boot"], capture_output=True, text=True, env=env
    ).stdout
    assert "::/boot/vmlinuz" in files and "::/boot/initrd.img" in files


def test_esp_disk_for_the_stub_has_startup_nsh_and_no_removable_loader(
    tmp_path: Path, payload: dict[str, Path]
) -> None:
    script = bootdisk.startup_nsh(MenuEntry("k"), "console=ttyS0")
    disk = bootdisk.esp_disk(tmp_path / "stub.raw", payload, startup=script, cache_root=tmp_path)
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    image = f"{disk}@@1M"
    shown = subprocess.run(["mtype", "-i", image, "::/startup.nsh"], capture_output=True, env=env)
    assert shown.stdout == script.encode()  # CRLF lines, as the shell wants them
    loader = subprocess.run(["mdir", "-i", image, "::/EFI/BOOT/BOOTX64.EFI"], env=env, check=False)
    # The firmware would start a kernel found there without a command line: none is there.
    assert loader.returncode != 0


def test_grub_images_are_built_once(tmp_path: Path) -> None:
    first = bootdisk.grub_image(bootdisk.GRUB_EFI, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert bootdisk.grub_image(bootdisk.GRUB_EFI, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp


def test_missing_boot_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        bootdisk.bios_disk(
            tmp_path / "x.raw", {"/boot/vmlinuz": tmp_path / "nope"}, "", cache_root=tmp_path
        )
    with pytest.raises(ConfigError, match="must be absolute"):
        bootdisk.esp_disk(tmp_path / "x.raw", {"boot/x": tmp_path}, cache_root=tmp_path)


# -- firmware ----------------------------------------------------------------------------------


def test_ovmf_from_the_firmware_descriptors(tmp_path: Path) -> None:
    code, variables = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"c")
    variables.write_bytes(b"v")

    def descriptor(name: str, features: list[str], machines: list[str]) -> None:
        data = {
            "interface-types": ["uefi"],
            "mapping": {
                "device": "flash",
                "executable": {"filename": str(code), "format": "raw"},
                "nvram-template": {"filename": str(variables), "format": "raw"},
            },
            "targets": [{"architecture": "x86_64", "machines": machines}],
            "features": features,
        }
        (tmp_path / name).write_text(json.dumps(data))

    descriptor("10-secure.json", ["secure-boot", "requires-smm"], ["pc-q35-*"])
    descriptor("20-q35-only.json", [], ["pc-q35-*"])
    descriptor("30-plain.json", ["acpi-s3"], ["pc-i440fx-*", "pc-q35-*"])
    found = firmware.ovmf("pc", descriptor_dirs=[tmp_path])
    assert (found.code, found.vars_template) == (code, variables)
    args = found.qemu_args(tmp_path / "vm")
    assert args[:2] == ["-drive", f"if=pflash,format=raw,unit=0,file={code},readonly=on"]
    copy = tmp_path / "vm" / "ovmf-vars.fd"
    assert args[2:] == ["-drive", f"if=pflash,format=raw,unit=1,file={copy}"]
    assert copy.read_bytes() == b"v" and copy.stat().st_mode & 0o777 == 0o600
    assert firmware.seabios().qemu_args(tmp_path) == []


def test_the_installed_ovmf_is_found() -> None:
    found = firmware.ovmf()
    assert found.code is not None and found.code.is_file()
    assert found.vars_template is not None and found.vars_template.is_file()


# -- disks, marks, phases, reports ------------------------------------------------------------


def test_the_boot_disk_comes_after_the_test_disks_and_boots_first() -> None:
    data = DiskImage(Path("/nonexistent/data.raw"), "raw", 1 << 20)
    boot = DiskImage(Path("/nonexistent/boot.raw"), "raw", 1 << 20)
    placed = plan([Disk(data, "ahci"), Disk(boot, "ahci", bootindex=0)])
    devices = placed.device_args()
    assert devices[0] == "ich9-ahci,id=ahci0"
    assert devices[1].endswith("serial=bh-disk0")
    assert devices[2] == "ide-hd,drive=disk1,bus=ahci0.1,serial=bh-disk1,bootindex=0"


def test_with_boot_disk_keeps_the_test_disks_in_place(tmp_path: Path) -> None:
    data = DiskImage(Path("/nonexistent/data.raw"), "raw", 1 << 20, fstype="ext4")
    boot = DiskImage(Path("/nonexistent/boot.raw"), "raw", 1 << 20, label="boot")
    planned = attach.plan([Disk(data, "ide")], variables={"root": "LABEL=x"})
    both = attach.with_boot_disk(planned, Disk(boot, "ahci", bootindex=0))
    assert both.images == (data, boot) and both.fstypes == ("ext4",)
    assert [a.drive_id for a in both.plan.attachments] == ["disk0", "disk1"]
    assert both.plan.device_args()[-1].endswith(",bootindex=0")
    alone = attach.with_boot_disk(None, Disk(boot, "ide", bootindex=0))
    (device,) = alone.plan.device_args()
    assert device == "ide-hd,drive=disk0,bus=ide.0,unit=0,serial=bh-disk0,bootindex=0"


GRUB_BIOS_LOG = (
    "\x1b[H\x1b[J\x1b[1;1H  Booting `bad initrd'\n\r\n\r"
    "Booting menu entry 1: bad initrd\n\r"
    "error: file `/boot/initrd-missing.img' not found.\n\r\n\rPress any key to continue..."
)
OVMF_LOG = (
    '\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 "UEFI QEMU HARDDISK bh-boot " from X\r\n'
    'BdsDxe: starting Boot0001 "UEFI QEMU HARDDISK bh-boot " from X\r\n'
    "Booting menu entry 0: good\r\nerror: no suitable video mode found.\r\n"
    "Booting in blind mode\r\n[    0.000000] Linux version 6.1.0 (x)\r\n"
    "[    1.000000] ata1: error: not a loader's\r\n"
)


def recorded(text: str) -> ConsoleRecorder:
    recorder = ConsoleRecorder(0.0, "n", watches=bootpaths.LOADER_MARKS)
    recorder.write(text)
    return recorder


def test_grub_failure_reason_is_grubs_first_error_line() -> None:
    recorder = recorded(GRUB_BIOS_LOG)
    entries = [m.detail for m in recorder.marks if m.name == "loader-entry"]
    assert entries == ["bad initrd"]  # GRUB's line and our echo: one mark
    assert re.search(bootpaths.GRUB_FATAL, GRUB_BIOS_LOG)
    assert failure_reason(recorder, "Press any key to continue") == (
        "GRUB failed booting entry 'bad initrd': error: file `/boot/initrd-missing.img' not found."
    )
    assert failure_reason(recorded(""), "\rgrub> ").startswith("GRUB stopped at its command")


def test_ovmf_handover_entry_and_benign_errors_are_marks_not_reasons() -> None:
    recorder = recorded(OVMF_LOG)
    names = [(m.name, m.detail) for m in recorder.marks]
    assert ("firmware-done", 'Boot0001 "UEFI QEMU HARDDISK bh-boot "') in names
    assert ("loader-entry", "good") in names
    assert ("loader-error", "no suitable video mode found.") in names
    # After the kernel's banner nothing is a loader's line any more.
    assert not any("not a loader's" in m.detail for m in recorder.marks)
    assert loader_errors(recorder) == []


def test_phases_per_path_and_junit_boot_path() -> None:
    direct = {"first-byte": 0.2, "kernel-banner": 0.2, "INIT-START": 1.5, "PASS": 2.0}
    assert phase_split(direct) == {"firmware": 0.2, "kernel": 1.3, "init": 0.5}
    grub = {
        "first-byte": 1.0,
        "loader-entry": 1.1,
        "kernel-banner": 20.0,
        "INIT-START": 25.0,
        "PASS": 26.0,
    }
    assert phase_split(grub) == {"firmware": 1.0, "loader": 19.0, "kernel": 5.0, "init": 1.0}
    ovmf = {"first-byte": 6.0, "firmware-done": 7.0, "kernel-banner": 17.0, "INIT-START": 22.0}
    assert phase_split(ovmf) == {"firmware": 7.0, "loader": 10.0, "kernel": 5.0}
    record = TestRecord("t::x[k-ahci-bios-grub]", "x", boot_path="bios-grub", boot_entry="good")
    record.phases = grub
    props = dict(junit_properties(record))
    assert props["boot_path"] == "bios-grub" and props["boot_entry"] == "good"
    assert props["phase_loader"] == "19.000" and props["phase_firmware"] == "1.000"
