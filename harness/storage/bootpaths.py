"""Boot paths as data: how a machine gets from power-on to the kernel under test.

Each :class:`BootPath` is one way machines boot, with what it needs and what it prints:

==========  =============================================================================
pvh         QEMU loads the extracted vmlinux and enters it through PVH (the fast default)
bzimage     QEMU loads the compressed bzImage (``-kernel``): the x86 boot protocol, the
            setup code and the kernel's own decompressor
bios-grub   SeaBIOS -> GRUB installed on an MBR disk -> kernel and initramfs from its /boot
uefi-grub   OVMF -> GRUB EFI on an EFI system partition -> kernel and initramfs from it
uefi-stub   OVMF -> its shell runs startup.nsh -> the kernel's EFI stub, ``initrd=`` loaded
            by the stub itself
==========  =============================================================================

Adding a path is adding an entry to :data:`BOOT_PATHS`. The console patterns that tell the
firmware's hand-over, GRUB's menu, the entry it boots and its errors are data here too
(:data:`LOADER_MARKS`, :data:`GRUB_FATAL`); :mod:`harness.vm.loader` drives the loader phase
with them. :func:`build_disk` makes a boot disk for one VM (its command line carries the
VM's nonce) through :mod:`harness.image.bootdisk`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.image import bootdisk
from harness.image.bootdisk import Menu
from harness.kernel import bzimage
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.storage.disks import DiskImage, make_read_only

log = logging.getLogger(__name__)

ALL = "all"
DEFAULT_BOOT_PATH = "pvh"
DEFAULT_BOOT_CONTROLLER = "ahci"  # SeaBIOS and OVMF boot from it on pc and q35 alike
SELECT_DEFAULT = "default"  # the chosen entry is GRUB's default (timeout 0)
SELECT_KEYS = "keys"  # the menu waits; the harness types the keys on the serial console
SELECTIONS = (SELECT_DEFAULT, SELECT_KEYS)
KEYS_MENU_TIMEOUT = 60  # seconds GRUB's menu waits for keys (they come as soon as it shows)

# Console patterns. GRUB draws with vt100 escapes; every pattern matches plain text runs.
OVMF_HANDOVER = re.compile(r'BdsDxe: starting (?P<detail>Boot[0-9A-F]{4} "[^"\r\n]*")')
GRUB_ENTRY = re.compile(r"Booting `(?P<detail>[^\r\n]*)'")
# Our grub.cfg's own line in every entry (GRUB EFI does not print the one above).
MENU_ENTRY_ECHO = re.compile(r"Booting menu entry \d+: (?P<detail>[^\r\n]*)")
GRUB_ERROR = re.compile(r"\berror: (?P<detail>[^\r\n]*)")
EFI_STUB_ERROR = re.compile(r"EFI stub: ERROR: (?P<detail>[^\r\n]*)")
# After a failed entry GRUB waits for a key (then shows the menu again); without a menu it
# stops at its prompt, or at the rescue prompt when it cannot load normal mode.
GRUB_FATAL = re.compile(r"Press any key to continue|grub rescue> |[\r\n]grub> ")
# Error lines of healthy boots: GRUB EFI without a display has no video mode to set.
BENIGN_LOADER_ERRORS = ("no suitable video mode found",)
GRUB_MENU = re.compile(r"Use the \^ and v keys to select which entry is highlighted")
SHELL_STARTUP = re.compile(r"or any other key to continue")
# Marks the console recorder takes from lines before the kernel banner (name, pattern).
LOADER_MARKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("firmware-done", OVMF_HANDOVER),
    ("loader-entry", GRUB_ENTRY),
    ("loader-entry", MENU_ENTRY_ECHO),
    ("loader-error", GRUB_ERROR),
    ("loader-error", EFI_STUB_ERROR),
)


@dataclass(frozen=True)
class Prompt:
    """Something a loader waits at, and the keys the harness answers with (once)."""

    pattern: re.Pattern[str]
    keys: str
    what: str


@dataclass(frozen=True)
class BootPath:
    """One boot path: firmware, what loads the kernel, the disk it needs, what it prints."""

    name: str
    description: str
    firmware: str  # "seabios" or "ovmf" (harness.storage.firmware)
    kernel_image: str  # what QEMU is given: "vmlinux" (PVH), "bzimage", or "" (from the disk)
    disk: str = ""  # the boot disk: "" none, "mbr-grub", "esp-grub", "esp-stub"
    loader: str = ""  # "" (QEMU loads the kernel), "grub" or "efi-shell"
    requires: tuple[str, ...] = ()  # kernel options (y or m)
    # The console pattern that ends the firmware phase; None: the first console byte (SeaBIOS
    # prints nothing on the serial port, so the first byte is the loader's or the kernel's).
    firmware_done: re.Pattern[str] | None = None
    firmware_factor: float = 1.0  # OVMF starts slowly under TCG: its deadline is scaled
    prompts: tuple[Prompt, ...] = ()
    # A hand-over to this boot option means the firmware found no loader on the disk.
    wrong_handover: str = ""

    @property
    def direct(self) -> bool:
        """True when QEMU loads the kernel itself (no boot disk, no loader)."""
        return not self.disk

    @property
    def has_menu(self) -> bool:
        return self.loader == "grub"


BOOT_PATHS: Mapping[str, BootPath] = {
    p.name: p
    for p in (
        BootPath(
            name="pvh",
            description="QEMU -kernel with the extracted vmlinux, entered through PVH "
            "(the bzImage when the kernel has no PVH entry)",
            firmware="seabios",
            kernel_image="vmlinux",
        ),
        BootPath(
            name="bzimage",
            description="QEMU -kernel with the bzImage: boot protocol, setup code, decompressor",
            firmware="seabios",
            kernel_image="bzimage",
            # The decompressor prints nothing: the first byte comes after it (xz: seconds).
            firmware_factor=3.0,
        ),
        BootPath(
            name="bios-grub",
            description="SeaBIOS -> GRUB on an MBR disk (core image before 1 MiB) -> /boot",
            firmware="seabios",
            kernel_image="",
            disk="mbr-grub",
            loader="grub",
        ),
        BootPath(
            name="uefi-grub",
            description="OVMF -> GRUB EFI (/EFI/BOOT/BOOTX64.EFI) on a GPT EFI system partition",
            firmware="ovmf",
            kernel_image="",
            disk="esp-grub",
            loader="grub",
            firmware_done=OVMF_HANDOVER,
            firmware_factor=4.0,
            wrong_handover="EFI Internal Shell",
        ),
        BootPath(
            name="uefi-stub",
            description="OVMF -> its shell runs startup.nsh -> the kernel's EFI stub",
            firmware="ovmf",
            kernel_image="",
            disk="esp-stub",
            loader="efi-shell",
            requires=("CONFIG_EFI_STUB",),
            firmware_done=OVMF_HANDOVER,
            firmware_factor=4.0,
            # The shell counts down 5 s before startup.nsh; any key but ESC goes on at once.
            prompts=(Prompt(SHELL_STARTUP, "\r", "the EFI shell's startup.nsh countdown"),),
        ),
    )
}


def get(path: str | BootPath) -> BootPath:
    """The boot path named ``path`` (a :class:`BootPath` is returned as is).

    Raises:
        ConfigError: no such path, listing the known ones.
    """
    if isinstance(path, BootPath):
        return path
    try:
        return BOOT_PATHS[path]
    except KeyError:
        raise ConfigError(
            f"unknown boot path {path!r}; use one of {', '.join(BOOT_PATHS)} or {ALL}"
        ) from None


def select(selectors: Sequence[str]) -> list[BootPath]:
    """Boot paths named by ``selectors`` (``all``: every one), each once, in table order;
    none selected: the default path.

    Raises:
        ConfigError: unknown names, all listed at once with the known ones.
    """
    wanted = list(selectors) or [DEFAULT_BOOT_PATH]
    if ALL in wanted:
        return list(BOOT_PATHS.values())
    unknown = [name for name in wanted if name not in BOOT_PATHS]
    if unknown:
        raise ConfigError(
            f"unknown boot path(s) {', '.join(map(repr, unknown))}; "
            f"use {ALL} or any of: {', '.join(BOOT_PATHS)}"
        )
    return [p for name, p in BOOT_PATHS.items() if name in wanted]


def lacks_reason(path: BootPath, kernel: Kernel) -> str | None:
    """Why ``kernel`` cannot boot on ``path``, or None if it can.

    The kernel's configuration decides when it is known; otherwise, for the EFI stub, the
    bzImage itself (a kernel built without the stub is no PE image).
    """
    if kernel.config:
        lacking = [o for o in path.requires if not kernel.has_config(o)]
        if lacking:
            return (
                f"kernel {kernel.name} ({kernel.release}) lacks {', '.join(lacking)}, "
                f"needed by boot path {path.name}"
            )
        return None
    if "CONFIG_EFI_STUB" in path.requires and not bzimage.has_efi_stub(kernel.vmlinuz):
        return (
            f"kernel {kernel.name} ({kernel.release}): its bzImage has no EFI stub (no PE "
            f"header; built without CONFIG_EFI_STUB), needed by boot path {path.name}"
        )
    return None


@dataclass(frozen=True)
class BootSpec:
    """How one VM gets to its kernel: the path, and for paths through a disk, the disk's
    controller, the GRUB menu, which entry to boot and how it is chosen.

    ``entry`` is an index or a title (None: the menu's default); ``select`` is
    ``"default"`` (written as GRUB's default, no menu shown) or ``"keys"`` (the menu waits
    and the harness types the keys at it). ``files`` adds files to the boot file system
    (guest path -> host file), e.g. a second kernel for another entry.
    """

    path: BootPath = field(default_factory=lambda: BOOT_PATHS[DEFAULT_BOOT_PATH])
    controller: str = DEFAULT_BOOT_CONTROLLER
    menu: Menu | None = None
    entry: int | str | None = None
    select: str = SELECT_DEFAULT
    files: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            choices = " or ".join(SELECTIONS)
            raise ConfigError(f"boot entry selection {self.select!r}: use {choices}")
        if self.path.direct and (self.menu is not None or self.entry is not None or self.files):
            raise ConfigError(
                f"boot path {self.path.name} has no boot disk: a menu, an entry or boot files "
                "need bios-grub, uefi-grub or uefi-stub"
            )
        if self.menu is not None and not self.path.has_menu and len(self.menu.entries) > 1:
            raise ConfigError(
                f"boot path {self.path.name} boots one entry: a menu of several needs GRUB "
                "(bios-grub or uefi-grub)"
            )
        if self.menu is not None and self.entry is not None:
            self.menu.index(self.entry)  # raises for an unknown entry

    def resolved_menu(self, title: str) -> Menu:
        """The menu to write: the test's (or one entry titled ``title``), with the chosen
        entry as the default (``select="default"``) or a menu that waits for keys."""
        menu = self.menu or bootdisk.single_entry(title)
        chosen = menu.default if self.entry is None else menu.index(self.entry)
        if self.select == SELECT_KEYS:
            return Menu(menu.entries, default=menu.default, timeout=KEYS_MENU_TIMEOUT)
        return Menu(menu.entries, default=chosen, timeout=0)

    def prompts(self, title: str) -> tuple[Prompt, ...]:
        """What the loader will wait at and the keys that answer it, for this boot."""
        prompts = list(self.path.prompts)
        if self.path.has_menu and self.select == SELECT_KEYS:
            menu = self.menu or bootdisk.single_entry(title)
            chosen = menu.default if self.entry is None else menu.index(self.entry)
            moves = chosen - menu.default
            keys = ("v" * moves if moves > 0 else "^" * -moves) + "\r"
            what = f"GRUB's menu (entry {chosen}: {menu.entries[chosen].title!r})"
            prompts.append(Prompt(GRUB_MENU, keys, what))
        return tuple(prompts)


def build_disk(
    spec: BootSpec,
    workdir: Path,
    *,
    kernel: Kernel,
    initrd: Path,
    cmdline: str,
    cache_root: Path,
) -> DiskImage:
    """The boot disk of one VM in ``workdir`` (read-only; the VM boots an overlay of it):
    ``kernel``'s bzImage as ``/boot/vmlinuz``, ``initrd`` as ``/boot/initrd.img``, the
    spec's extra files, and GRUB with its menu or the EFI shell's startup.nsh.

    Raises:
        ConfigError: bad menu or files.
        MissingToolError: a tool or GRUB platform is not installed.
        InfraError: a tool failed.
    """
    path = spec.path
    if path.direct:
        raise ConfigError(f"boot path {path.name} boots without a disk")
    files = {bootdisk.KERNEL_PATH: kernel.vmlinuz, bootdisk.INITRD_PATH: initrd, **spec.files}
    menu = spec.resolved_menu(kernel.name)
    target = workdir / f"boot-{path.name}.raw"
    workdir.mkdir(parents=True, exist_ok=True)
    if path.disk == "mbr-grub":
        cfg = bootdisk.render_grub_cfg(menu, cmdline)
        bootdisk.bios_disk(target, files, cfg, cache_root=cache_root)
        label = "boot"
    elif path.disk == "esp-grub":
        cfg = bootdisk.render_grub_cfg(menu, cmdline)
        bootdisk.esp_disk(target, files, grub_cfg=cfg, cache_root=cache_root)
        label = "ESP"
    elif path.disk == "esp-stub":
        entry = menu.entries[menu.default]
        script = bootdisk.startup_nsh(entry, cmdline)
        bootdisk.esp_disk(target, files, startup=script, cache_root=cache_root)
        label = "ESP"
    else:  # a table entry this function does not know: a harness bug
        raise ValueError(f"boot path {path.name}: unknown disk kind {path.disk!r}")
    make_read_only(target)
    # No fstype: the guest's root never comes from the boot disk, so its file system must
    # not join the initramfs's modules (harness.storage.attach adds those of root disks).
    return DiskImage(target, "raw", target.stat().st_size, label=label, partitioned=True)
