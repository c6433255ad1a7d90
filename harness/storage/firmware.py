"""Firmware files: SeaBIOS (QEMU's default), qboot, and OVMF's code and variable store, never
written.

qboot is QEMU's own minimal firmware (``qboot.rom`` in QEMU's data folder): no option ROMs, no
boot menu, no disk scan, just the tables the kernel reads (e820, ACPI and SMBIOS from QEMU,
PCI set up) and the jump into a kernel given with ``-kernel``. For the direct kernel boots the
harness makes through PVH, it reaches the kernel's first line ~0.15-0.3 s sooner than SeaBIOS
under TCG (measured on 2 cores: first console byte 0.35-0.43 s against 0.50-0.65 s). It
cannot boot from a disk, so the boot paths that test a real firmware (bzImage through
SeaBIOS's loader, GRUB, UEFI) keep theirs.

OVMF comes in two flash images: the code, which QEMU maps read-only, and a variable store
the firmware writes (boot entries, the shell's settings). Every VM gets its own copy of the
store's template in its folder, so the installed template stays as the package left it and
no two VMs share state. The files are found the way libvirt finds them: through QEMU's
firmware descriptors (``/usr/share/qemu/firmware/*.json``, overridden by ``/etc/qemu/firmware``),
picking UEFI for x86_64 on flash without Secure Boot or SMM (which the ``pc`` machine lacks),
and falling back to Debian's file names.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.outcome import MissingToolError

log = logging.getLogger(__name__)

DESCRIPTOR_DIRS = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))
# Features the plain pc machine cannot give, or that change what boots.
_UNWANTED = {"secure-boot", "requires-smm", "enrolled-keys", "amd-sev-es", "amd-sev-snp"}
_FALLBACK_OVMF = (
    (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
)
SEABIOS_FILES = (Path("/usr/share/seabios/bios-256k.bin"), Path("/usr/share/seabios/bios.bin"))
QBOOT_FILES = (Path("/usr/share/qemu/qboot.rom"), Path("/usr/local/share/qemu/qboot.rom"))
_MACHINE_GLOBS = {"pc": "pc-i440fx-*", "q35": "pc-q35-*"}


@dataclass(frozen=True)
class Firmware:
    """One firmware: its files, and the QEMU arguments that give it to one VM."""

    name: str  # "seabios" or "ovmf"
    code: Path | None  # None: QEMU's built-in default
    vars_template: Path | None = None  # copied per VM, never used in place

    @property
    def files(self) -> tuple[Path, ...]:
        """The installed files this firmware boots from (their digests never change)."""
        return tuple(p for p in (self.code, self.vars_template) if p is not None)

    def qemu_args(self, workdir: Path) -> list[str]:
        """Arguments for one VM; OVMF's variable store is copied into ``workdir`` first.

        SeaBIOS needs none: QEMU loads it from its own data folder.
        """
        if self.name == "seabios" or self.code is None:
            return []
        args = ["-drive", f"if=pflash,format=raw,unit=0,file={self.code},readonly=on"]
        if self.vars_template is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            copy = workdir / f"{self.name}-vars.fd"
            copy.unlink(missing_ok=True)
            shutil.copyfile(self.vars_template, copy)
            os.chmod(copy, 0o600)
            args += ["-drive", f"if=pflash,format=raw,unit=1,file={copy}"]
        return args


def seabios() -> Firmware:
    """QEMU's default BIOS; its file is named for digests, QEMU finds it by itself."""
    code = next((p for p in SEABIOS_FILES if p.is_file()), None)
    return Firmware("seabios", code)


def qboot(files: Sequence[Path] = QBOOT_FILES) -> Path | None:
    """qboot's file when QEMU's data package installed it (Debian: qemu-system-data), else
    None: the caller then boots with QEMU's default BIOS, only a little slower."""
    return next((p for p in files if p.is_file()), None)


def ovmf(machine: str = "pc", descriptor_dirs: Sequence[Path] = DESCRIPTOR_DIRS) -> Firmware:
    """OVMF for ``machine`` (``pc`` or ``q35``): code and variable store template.

    Raises:
        MissingToolError: no usable OVMF is installed (package ``ovmf``).
    """
    for descriptor in _descriptors(descriptor_dirs):
        found = _usable(descriptor, machine)
        if found is not None:
            log.debug("OVMF from %s: %s", descriptor, found)
            return found
    for code, variables in _FALLBACK_OVMF:
        if code.is_file() and variables.is_file():
            return Firmware("ovmf", code, variables)
    raise MissingToolError("OVMF firmware (OVMF_CODE*.fd, OVMF_VARS*.fd)", "ovmf")


def get(name: str, machine: str = "pc") -> Firmware:
    """The firmware named ``name``: ``seabios`` or ``ovmf``."""
    return ovmf(machine) if name == "ovmf" else seabios()


def _descriptors(dirs: Sequence[Path]) -> list[Path]:
    """Descriptor files in priority order: by file name, an earlier folder hiding a later
    one's file of the same name (QEMU's docs/interop/firmware.json rules)."""
    chosen: dict[str, Path] = {}
    for folder in dirs:
        if not folder.is_dir():
            continue
        for path in folder.glob("*.json"):
            chosen.setdefault(path.name, path)
    return [chosen[name] for name in sorted(chosen)]


def _usable(descriptor: Path, machine: str) -> Firmware | None:
    try:
        data: Any = json.loads(descriptor.read_text())
        mapping = data["mapping"]
        if "uefi" not in data.get("interface-types", ()) or mapping.get("device") != "flash":
            return None
        if _UNWANTED & set(data.get("features", ())):
            return None
        # Descriptors list versioned machine globs (pc-i440fx-*): match a versioned name.
        versioned = _MACHINE_GLOBS.get(machine.split(",", 1)[0], machine).replace("*", "7.2")
        if not any(
            target.get("architecture") == "x86_64"
            and any(fnmatch.fnmatch(versioned, m) for m in target.get("machines", ()))
            for target in data.get("targets", ())
        ):
            return None
        code = Path(mapping["executable"]["filename"])
        variables = Path(mapping["nvram-template"]["filename"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.debug("skipping firmware descriptor %s: %s", descriptor, error)
        return None
    if not (code.is_file() and variables.is_file()):
        return None
    return Firmware("ovmf", code, variables)
