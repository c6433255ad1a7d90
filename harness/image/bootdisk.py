"""Bootable disk images made without root, loop devices or mounts: GRUB for BIOS, EFI partitions.

Machines boot from disks, so the boot paths that go through firmware need a disk laid out the
way installers lay it out, with the kernel and initramfs under test copied in:

- :func:`bios_disk`: an MBR disk whose first partition starts at 1 MiB and holds an ext4
  ``/boot`` (kernel, initramfs, ``grub/grub.cfg``); GRUB's ``boot.img`` in the MBR's code area
  and its core image (``biosdisk``, ``part_msdos``, ``ext2``, ...) in the gap before the
  partition, as ``grub-install`` leaves them. ``boot.img`` as shipped already points at
  sector 1 and the core image's block list at sector 2, so placing them is all it takes; the
  one byte pair ``grub-bios-setup`` changes for hard disks (the drive-number check) is
  changed the same way here.
- :func:`esp_disk`: a GPT disk with one EFI system partition (FAT): GRUB EFI as the removable
  media loader ``/EFI/BOOT/BOOTX64.EFI`` with the same ``/boot`` layout, or, for the kernel's
  own EFI stub, the kernel and a ``startup.nsh`` that the firmware's shell runs with the
  command line (the stub reads ``initrd=`` from it).

``sfdisk`` writes the partition tables into the image file, ``mke2fs -E offset=`` and
``mkfs.fat --offset`` make the file systems in place, ``mke2fs -d`` and mtools copy files in.
GRUB images depend only on GRUB and its embedded configuration: :func:`grub_image` builds each
once into the cache. The ``grub.cfg`` comes from the Jinja2 template ``grub.cfg.j2`` next to
this module, one ``menuentry`` per :class:`MenuEntry`, every value quoted for GRUB's shell.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import cache, lazyimport, tools
from harness.outcome import ConfigError, InfraError, MissingToolError

if TYPE_CHECKING:
    import jinja2
else:  # only a boot disk built afresh renders its GRUB configuration
    jinja2 = lazyimport.module("jinja2")

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SECTOR = 512
KERNEL_PATH = "/boot/vmlinuz"
INITRD_PATH = "/boot/initrd.img"
GRUB_CFG_PATH = "/boot/grub/grub.cfg"
EFI_LOADER_PATH = "/EFI/BOOT/BOOTX64.EFI"  # the removable-media path firmware boots
STARTUP_NSH_PATH = "/startup.nsh"
TEMPLATE = Path(__file__).with_name("grub.cfg.j2")
GRUB_LIB = Path("/usr/lib/grub")

# boot.img (GRUB's MBR code, grub-core/boot/i386/pc/boot.S): offsets the setup tool patches.
BOOT_KERNEL_SECTOR = 0x5C  # u64: LBA of the core image's first sector; shipped as 1
BOOT_DRIVE_CHECK = 0x66  # a 2-byte jump over "trust DL only if it looks like a hard disk"
MBR_CODE_END = 0x1B8  # the disk signature and the partition table follow: never overwritten
NOP_NOP = b"\x90\x90"

# Run by GRUB before its normal mode reads grub.cfg: its console is the first serial port,
# so the harness sees GRUB's menu and errors ("error: file ... not found").
EARLY_CONFIG_BIOS = """\
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
"""
# On UEFI the firmware's console already is the serial port (OVMF's terminal driver), and
# OVMF keeps polling the UART: GRUB reading it directly would lose keys to the firmware.
# GRUB's default EFI console goes through the firmware, which gets both right.
EARLY_CONFIG_EFI = """\
terminal_input console
terminal_output console
"""


@dataclass(frozen=True)
class GrubPlatform:
    """One GRUB platform: the modules its image carries, where it finds grub.cfg, its package."""

    name: str  # the grub-mkimage format, also its folder under /usr/lib/grub
    modules: tuple[str, ...]
    prefix: str  # where normal mode looks for grub.cfg ("" device: the boot disk/partition)
    package: str
    early_config: str  # embedded in the image, run before grub.cfg

    @property
    def directory(self) -> Path:
        return GRUB_LIB / self.name


_COMMON_MODULES = ("normal", "linux", "serial", "terminal", "echo", "test")
GRUB_BIOS = GrubPlatform(
    name="i386-pc",
    modules=("biosdisk", "part_msdos", "ext2", *_COMMON_MODULES),
    prefix="(,msdos1)/boot/grub",  # partition 1 of the disk the BIOS booted
    package="grub-pc-bin",
    early_config=EARLY_CONFIG_BIOS,
)
GRUB_EFI = GrubPlatform(
    name="x86_64-efi",
    modules=("part_gpt", "fat", *_COMMON_MODULES),
    prefix="/boot/grub",  # on the partition GRUB was loaded from
    package="grub-efi-amd64-bin",
    early_config=EARLY_CONFIG_EFI,
)


@dataclass(frozen=True)
class MenuEntry:
    """One ``menuentry``: its title, the kernel and initramfs paths on the boot file system,
    and words added to the boot's own command line (``initrd=None``: no ``initrd`` line)."""

    title: str
    kernel: str = KERNEL_PATH
    initrd: str | None = INITRD_PATH
    cmdline: str = ""


@dataclass(frozen=True)
class Menu:
    """A GRUB menu: entries, the default entry, and how long the menu waits (0: not shown)."""

    entries: tuple[MenuEntry, ...]
    default: int = 0
    timeout: int = 0

    def __post_init__(self) -> None:
        if not self.entries:
            raise ConfigError("a boot menu needs at least one entry")
        titles = [e.title for e in self.entries]
        if len(set(titles)) != len(titles):
            raise ConfigError(f"boot menu titles must differ: {titles}")
        if not 0 <= self.default < len(self.entries):
            raise ConfigError(f"boot menu default {self.default} is not an entry index")
        if self.timeout < 0:
            raise ConfigError(f"boot menu timeout {self.timeout} is negative")

    def index(self, choice: int | str) -> int:
        """The index of the entry chosen by index or by title.

        Raises:
            ConfigError: no such entry (the message lists the titles).
        """
        if isinstance(choice, int) and not isinstance(choice, bool):
            if 0 <= choice < len(self.entries):
                return choice
        else:
            for index, entry in enumerate(self.entries):
                if entry.title == choice:
                    return index
        titles = ", ".join(repr(e.title) for e in self.entries)
        raise ConfigError(f"boot menu has no entry {choice!r}; entries: {titles}")


def single_entry(title: str) -> Menu:
    """The menu most boots use: one entry booting ``/boot/vmlinuz`` with ``/boot/initrd.img``."""
    return Menu((MenuEntry(title),))


class _Word(str):
    """A value already quoted for GRUB's shell."""

    __slots__ = ()


def grub_quote(value: object) -> _Word:
    """One GRUB word: single quotes (nothing expands inside), a quote as ``'\\''``."""
    if isinstance(value, _Word):
        return value
    return _Word("'" + str(value).replace("'", "'\\''") + "'")


def grub_words(value: object) -> _Word:
    """A command line as GRUB words, one per argument (GRUB joins them with single spaces)."""
    return _Word(" ".join(grub_quote(word) for word in str(value).split()))


def render_grub_cfg(menu: Menu, cmdline: str) -> str:
    """grub.cfg for ``menu``; each entry boots with ``cmdline`` plus its own words.

    Raises:
        ConfigError: the template cannot be read or rendered.
    """
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=grub_quote,  # every {{ value }} is one quoted word unless already a _Word
    )
    env.filters["words"] = grub_words
    try:
        template = env.from_string(TEMPLATE.read_text())
        entries = [
            {
                "title": e.title,
                "kernel": e.kernel,
                "initrd": e.initrd,
                "cmdline": " ".join(w for w in (cmdline, e.cmdline) if w),
            }
            for e in menu.entries
        ]
        return template.render(
            menu={"timeout": menu.timeout, "default": menu.default, "entries": entries}
        )
    except (OSError, jinja2.TemplateError) as error:
        raise ConfigError(f"cannot render {TEMPLATE.name}: {error}") from error


def startup_nsh(entry: MenuEntry, cmdline: str) -> str:
    """The EFI shell script that starts the kernel's EFI stub with ``cmdline`` (CRLF lines).

    The stub loads ``initrd=`` itself, from the volume it was started from (backslashes).
    """
    words = [_efi_path(entry.kernel), cmdline, entry.cmdline]
    if entry.initrd:
        words.append(f"initrd={_efi_path(entry.initrd)}")
    return " ".join(w for w in words if w) + "\r\n"


def _efi_path(path: str) -> str:
    return path.replace("/", "\\")


def grub_image(platform: GrubPlatform, cache_root: Path) -> Path:
    """GRUB's image for ``platform`` (core.img or BOOTX64.EFI), built once into the cache.

    Raises:
        MissingToolError: grub-mkimage or the platform's modules are not installed.
        InfraError: grub-mkimage failed.
    """
    mkimage = tools.require("grub-mkimage")
    if not (platform.directory / "moddep.lst").is_file():
        raise MissingToolError(f"GRUB {platform.name} modules", platform.package)
    version = _run([mkimage, "--version"], what="ask grub-mkimage its version").strip()
    key = cache.digest(
        [
            platform.name,
            platform.prefix,
            *platform.modules,
            platform.early_config,
            version,
            cache.file_digest(platform.directory / "kernel.img"),
        ]
    )
    target = cache_root / "grub" / f"{platform.name}-{key[:16]}.img"

    def build(partial: Path) -> None:
        config = partial.with_name("early.cfg")
        config.write_text(platform.early_config)
        argv = [mkimage, "-O", platform.name, "-o", str(partial), "-p", platform.prefix]
        _run([*argv, "-c", str(config), *platform.modules], what=f"build GRUB {platform.name}")

    cache.build_once(target, build)
    return target


def bios_disk(
    path: Path,
    files: Mapping[str, Path],
    grub_cfg: str,
    *,
    cache_root: Path,
    label: str = "boot",
) -> Path:
    """An MBR disk that SeaBIOS boots into GRUB, which reads ``grub_cfg`` from the ext4
    partition 1 (at 1 MiB) holding ``files`` (guest path -> host file) under ``/boot``.

    Raises:
        ConfigError: a file is missing or a guest path is not absolute.
        MissingToolError: sfdisk, mkfs.ext4 or GRUB for BIOS is not installed.
        InfraError: a tool failed, or GRUB's core image does not fit before 1 MiB.
    """
    _check_files(files)
    core = grub_image(GRUB_BIOS, cache_root).read_bytes()
    if len(core) > MIB - SECTOR:
        raise InfraError(f"GRUB's core image ({len(core)} bytes) does not fit before 1 MiB")
    boot = bytearray((GRUB_BIOS.directory / "boot.img").read_bytes())
    if len(boot) != SECTOR or int.from_bytes(boot[BOOT_KERNEL_SECTOR:][:8], "little") != 1:
        raise InfraError("GRUB's boot.img does not point at sector 1 as expected")
    # What grub-bios-setup does for a hard disk: no jump over the DL check.
    boot[BOOT_DRIVE_CHECK : BOOT_DRIVE_CHECK + 2] = NOP_NOP
    fs_size = _fs_size(files.values())
    _new_file(path, MIB + fs_size)
    _partition(path, "dos", f"start=2048, size={fs_size // SECTOR}, type=83, bootable")
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as scratch:
        root = Path(scratch) / "root"
        for guest_path, source in files.items():
            _place(source, root / guest_path.lstrip("/"))
        config = root / GRUB_CFG_PATH.lstrip("/")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(grub_cfg)
        mkfs = tools.require("mkfs.ext4")
        argv = [mkfs, "-q", "-F", "-t", "ext4", "-L", label, "-d", str(root)]
        argv += ["-E", f"offset={MIB},root_owner=0:0", str(path), f"{fs_size // 1024}k"]
        _run(argv, what=f"make the /boot file system in {path}")
    with path.open("r+b") as disk:
        disk.write(boot[:MBR_CODE_END])  # the table sfdisk wrote stays
        disk.seek(SECTOR)
        disk.write(core)
    log.info("BIOS boot disk %s (%d bytes)", path, MIB + fs_size)
    return path


def esp_disk(
    path: Path,
    files: Mapping[str, Path],
    *,
    grub_cfg: str | None = None,
    startup: str | None = None,
    cache_root: Path,
    label: str = "ESP",
) -> Path:
    """A GPT disk whose EFI system partition (FAT, at 1 MiB) holds ``files``; with
    ``grub_cfg``, GRUB EFI as ``/EFI/BOOT/BOOTX64.EFI`` and ``/boot/grub/grub.cfg``; with
    ``startup``, ``/startup.nsh`` for the firmware's shell. A file of ``files`` at one of
    those paths replaces the builder's (a loader or configuration under test).

    Raises:
        ConfigError: a file is missing or a guest path is not absolute.
        MissingToolError: sfdisk, mkfs.fat, mtools or GRUB EFI is not installed.
        InfraError: a tool failed.
    """
    _check_files(files)
    loader = grub_image(GRUB_EFI, cache_root) if grub_cfg is not None else None
    extra = [loader] if loader is not None else []
    size = _fs_size([*files.values(), *extra])
    _new_file(path, MIB + size + MIB)  # the backup GPT lives in the last MiB
    _partition(path, "gpt", f"start=2048, size={size // SECTOR}, type=U, name=ESP")
    mkfs = tools.require("mkfs.fat")
    # mkfs.fat warns that the file is larger than the file system: that is the backup GPT.
    _run(
        [mkfs, "--offset", "2048", "-n", label, str(path), str(size // 1024)],
        what=f"make the EFI system partition in {path}",
    )
    with tempfile.TemporaryDirectory(prefix="bootdisk-") as scratch:
        contents: dict[str, Path] = {}
        if loader is not None and grub_cfg is not None:
            contents[EFI_LOADER_PATH] = loader
            contents[GRUB_CFG_PATH] = Path(scratch) / "grub.cfg"
            contents[GRUB_CFG_PATH].write_text(grub_cfg)
        if startup is not None:
            contents[STARTUP_NSH_PATH] = Path(scratch) / "startup.nsh"
            contents[STARTUP_NSH_PATH].write_bytes(startup.encode())
        contents.update(files)  # the caller's files win (e.g. a loader under test)
        _mcopy(path, contents)
    log.info("EFI boot disk %s (%d bytes)", path, MIB + size + MIB)
    return path


def _mcopy(disk: Path, contents: Mapping[str, Path]) -> None:
    """Copy host files to guest paths on the FAT file system at 1 MiB into ``disk``."""
    image = f"{disk}@@{MIB}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}  # no complaints about our geometry
    folders: set[str] = set()
    for guest_path in contents:
        parent = Path(guest_path).parent
        while str(parent) != "/":
            folders.add(str(parent))
            parent = parent.parent
    if folders:
        mmd = tools.require("mmd")
        argv = [mmd, "-i", image, *(f"::{f}" for f in sorted(folders, key=len))]
        _run(argv, what=f"make folders in {disk}", env=env)
    mcopy = tools.require("mcopy")
    for guest_path, source in contents.items():
        _run([mcopy, "-i", image, str(source), f"::{guest_path}"], what=f"copy {source}", env=env)


def _check_files(files: Mapping[str, Path]) -> None:
    for guest_path, source in files.items():
        if not guest_path.startswith("/"):
            raise ConfigError(f"boot disk path {guest_path!r} must be absolute (/boot/...)")
        if not Path(source).is_file():
            raise ConfigError(f"boot disk file {source} (for {guest_path}) does not exist")


def _fs_size(sources: Iterable[Path]) -> int:
    """A file system size for these files: their size, a fifth more, 8 MiB for metadata;
    whole MiB."""
    payload = sum(Path(p).stat().st_size for p in sources)
    size = payload + payload // 5 + 8 * MIB
    return (size + MIB - 1) // MIB * MIB


def _new_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with path.open("wb") as handle:
        handle.truncate(size)


def _partition(path: Path, label: str, line: str) -> None:
    sfdisk = tools.require("sfdisk")
    _run([sfdisk, "-q", "-X", label, str(path)], what=f"partition {path}", stdin=line + "\n")


def _place(source: Path, target: Path) -> None:
    """A hard link when possible (no copy of a large kernel), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _run(
    argv: Sequence[str],
    *,
    what: str,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    log.debug("running %s", argv)
    result = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else dict(env),
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise InfraError(f"could not {what}: {' '.join(argv)} exited {result.returncode}: {detail}")
    return result.stdout
