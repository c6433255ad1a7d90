"""Attach disks to one VM: controllers, copy-on-write overlays, guest modules, kernel needs.

:func:`plan` is pure: it places the disks on their controllers (:mod:`harness.storage.controllers`)
and works out the modules the initramfs needs (each controller's, plus the root file
system's when the VM boots from a disk) and the kernel options they need, so a test can be
skipped before anything is built. :meth:`Storage.attach` then makes one qcow2 overlay per
disk in the VM's private folder and returns the QEMU arguments that boot the overlays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.outcome import ConfigError
from harness.storage import controllers, disks
from harness.storage.controllers import Disk, Plan
from harness.storage.disks import DiskImage

log = logging.getLogger(__name__)

# The module and kernel option(s) each file system needs; ext2 and ext3 are served by the
# ext4 driver in most distribution kernels (CONFIG_EXT4_USE_FOR_EXT2).
FS_MODULE = {"ext4": "ext4", "ext3": "ext4", "ext2": "ext4", "iso9660": "isofs"}
FS_CONFIG = {
    "ext4": "CONFIG_EXT4_FS",
    "ext3": "CONFIG_EXT3_FS|CONFIG_EXT4_FS",
    "ext2": "CONFIG_EXT2_FS|CONFIG_EXT4_USE_FOR_EXT2",
    "iso9660": "CONFIG_ISO9660_FS",
}


@dataclass(frozen=True)
class Storage:
    """The disks of one VM, placed on controllers; :meth:`attach` makes their overlays."""

    plan: Plan
    images: tuple[DiskImage, ...]
    fstypes: tuple[str, ...]  # file systems the initramfs must be able to mount
    # How the root sits on the disks, for reports: "" (a file system on the whole disk),
    # or e.g. "mbr", "gpt", "lvm", "raid1", "luks" ("+"-joined when stacked).
    layout: str = ""

    @property
    def modules(self) -> tuple[str, ...]:
        """Guest modules: the controllers' drivers, then the root file system's driver."""
        fs = (FS_MODULE.get(t, t) for t in self.fstypes)
        return tuple(dict.fromkeys((*self.plan.modules, *fs)))

    @property
    def requirements(self) -> dict[str, tuple[str, ...]]:
        """Kernel options by what needs them: ``controller ahci`` -> ``CONFIG_SATA_AHCI``..."""
        needs = {f"controller {name}": options for name, options in self.plan.config.items()}
        for fstype in self.fstypes:
            needs[f"file system {fstype}"] = (FS_CONFIG.get(fstype, f"CONFIG_{fstype.upper()}_FS"),)
        return needs

    def attach(self, workdir: Path) -> list[str]:
        """Make one overlay per disk in ``workdir``; the QEMU ``-device``/``-drive`` args.

        A disk with its own ``overlay`` path boots that file, made on the first attach and
        reused afterwards; a CD-ROM boots its image read-only, with no overlay.

        Raises:
            ConfigError: a base image is missing or unreadable, or a kept overlay belongs to
                another base image.
        """
        files: list[Path] = []
        formats: list[str] = []
        for image, a in zip(self.images, self.plan.attachments, strict=True):
            if a.disk.media == "cdrom":
                files.append(image.path.resolve())
                formats.append(image.format)
            elif a.disk.overlay is not None:
                files.append(disks.kept_overlay(image, a.disk.overlay))
                formats.append("qcow2")
            else:
                files.append(disks.overlay(image, workdir / f"{a.drive_id}.qcow2"))
                formats.append("qcow2")
        args: list[str] = []
        for device in self.plan.device_args():
            args += ["-device", device]
        return self.plan.drive_args(files, formats=formats) + args

    def overlay(self, workdir: Path, index: int = 0) -> Path:
        """The overlay :meth:`attach` made (or reused) for disk ``index`` in ``workdir``."""
        attachment = self.plan.attachments[index]
        if attachment.disk.overlay is not None:
            return attachment.disk.overlay
        return workdir / f"{attachment.drive_id}.qcow2"


def plan(
    disk_list: Sequence[Disk],
    *,
    machine: str = "pc",
    variables: Mapping[str, Any] | None = None,
) -> Storage:
    """Place ``disk_list`` on controllers and work out what the VM needs to use them.

    When ``variables`` has a ``root``, the file system module of the root is added: the
    ``root_fstype`` variable if given, else the file systems of every disk image that
    says what it holds.

    Raises:
        ConfigError: see :func:`harness.storage.controllers.plan`; a disk that is not a
            :class:`Disk`, or an image path that does not exist.
    """
    for index, disk in enumerate(disk_list):
        if not isinstance(disk, Disk):
            raise ConfigError(
                f"disks[{index}] is a {type(disk).__name__}; give "
                "harness.storage.controllers.Disk(image, controller)"
            )
    placed = controllers.plan(disk_list, machine=machine)
    images = tuple(
        d.image if isinstance(d.image, DiskImage) else DiskImage.open(Path(d.image))
        for d in disk_list
    )
    variables = variables or {}
    fstypes: tuple[str, ...] = ()
    if variables.get("root"):
        wanted = str(variables.get("root_fstype") or "")
        found = (wanted,) if wanted else tuple(i.fstype for i in images if i.fstype)
        fstypes = tuple(dict.fromkeys(found))
    return Storage(placed, images, fstypes)


def with_boot_disk(storage: Storage | None, disk: Disk, *, machine: str = "pc") -> Storage:
    """``storage`` plus the boot disk ``disk``, placed after the test's own disks (their
    indices, drive ids and units stay as planned; the boot disk's ``bootindex`` puts it first
    for the firmware).

    Raises:
        ConfigError: see :func:`harness.storage.controllers.plan`.
    """
    others = [] if storage is None else [a.disk for a in storage.plan.attachments]
    placed = controllers.plan([*others, disk], machine=machine)
    image = disk.image if isinstance(disk.image, DiskImage) else DiskImage.open(Path(disk.image))
    images = () if storage is None else storage.images
    fstypes = () if storage is None else storage.fstypes
    return Storage(placed, (*images, image), fstypes)
