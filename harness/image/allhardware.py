"""One initramfs for every machine (initrd(4)): carry every driver, load only what is needed.

The classic answer to "one boot image for many hardware configurations": the image holds the
drivers of every storage controller, and the init loads those the machine's devices ask for.
Each device in sysfs has a ``modalias`` (``pci:v00008086d00002922...``); ``modules.alias``
maps those patterns to modules; ``modprobe`` matches them. The init (template variable
``coldplug``) reads every device's modalias, asks ``modprobe -a`` for all of them, and repeats
while loading a driver makes new devices appear (a SCSI host adapter creates its disks, which
ask for ``sd_mod``), so nothing is loaded by name.

:func:`index_files` writes the ``modules.dep`` and ``modules.alias`` of exactly the modules the
image carries (busybox's modprobe reads both), with paths as the image stores them
(uncompressed ``.ko``): the kernel's full files would name thousands of absent modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from harness.image.initramfs import module_path, resolve_modules
from harness.kernel.modules import ModuleFile, modprobe_name
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError

# Every storage driver the harness's controllers use, the disk and CD-ROM drivers above them,
# and the file systems a root may have. File systems have no modalias: the init loads the
# root's by name when it mounts it (``modprobe <fstype>``).
STORAGE_DRIVERS = (
    "ata_piix",
    "ahci",
    "sym53c8xx",
    "megaraid_sas",
    "virtio_pci",
    "virtio_scsi",
    "virtio_blk",
    "nvme",
    "sd_mod",
    "sr_mod",
)
FILE_SYSTEMS = ("ext4", "isofs")


def available(kernel: Kernel, names: Sequence[str] = STORAGE_DRIVERS + FILE_SYSTEMS) -> list[str]:
    """The modules of ``names`` that ``kernel`` has as loadable modules (built-in ones and
    ones it lacks are left out: there is nothing to carry for them).

    Raises:
        ConfigError: the kernel has no modules folder.
    """
    if kernel.modules_dir is None:
        raise ConfigError(f"kernel {kernel.name!r} has no modules folder to carry drivers from")
    found = []
    for name in names:
        try:
            if resolve_modules(kernel, [name]):
                found.append(name)
        except ConfigError:
            continue  # not a module of this kernel (built in, or not built at all)
    return found


def index_files(kernel: Kernel, names: Sequence[str]) -> dict[str, bytes]:
    """``modules.dep`` and ``modules.alias`` for ``names`` and their dependencies, as files
    for the initramfs (paths relative to its root).

    Raises:
        ConfigError: a name is not a module of the kernel, or the kernel has no modules.
    """
    if kernel.modules_dir is None:
        raise ConfigError(f"kernel {kernel.name!r} has no modules folder")
    modules = resolve_modules(kernel, names)
    stored = {m.relpath: _stored_relpath(kernel.release, m) for m in modules}
    dep_lines = []
    source = kernel.modules_dir / "modules.dep"
    for line in source.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        head, _, tail = line.partition(":")
        if head in stored:
            deps = " ".join(stored[d] for d in tail.split() if d in stored)
            dep_lines.append(f"{stored[head]}: {deps}".rstrip())
    wanted = {m.name for m in modules}
    alias_lines = []
    alias_file = kernel.modules_dir / "modules.alias"
    if alias_file.is_file():
        for line in alias_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            words = line.split()
            if len(words) == 3 and words[0] == "alias" and modprobe_name(words[2]) in wanted:
                alias_lines.append(line)
    base = f"lib/modules/{kernel.release}"
    return {
        f"{base}/modules.dep": _text(dep_lines),
        f"{base}/modules.alias": _text(alias_lines),
    }


def _stored_relpath(release: str, module: ModuleFile) -> str:
    """Where the initramfs stores ``module``, relative to its modules folder."""
    return module_path(release, module).removeprefix(f"lib/modules/{release}/")


def _text(lines: Sequence[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode("utf-8", errors="surrogateescape")


def loaded_modules(detail: str) -> Mapping[str, bool]:
    """The ``COLDPLUG`` marker's detail (``<passes> <module> <module> ...``) as a set."""
    return dict.fromkeys(detail.split()[1:], True)
