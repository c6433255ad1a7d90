"""Storage controllers as data, and the QEMU arguments that attach disks to them.

Each :class:`Controller` is one emulated model: the QEMU device that is the controller (none
for the ``pc`` machine's built-in PIIX IDE, nor for virtio-blk and NVMe, where every disk is a
PCI function of its own), how a drive hangs off it, the guest modules that drive it, the
kernel options those modules need, and how the guest names its disks. Adding a model is
adding an entry to :data:`CONTROLLERS`.

:func:`plan` turns a list of :class:`Disk` attachments into ``-device``/``-drive`` arguments,
the modules to put in the initramfs and the kernel options to require. It is pure: the
overlays it points QEMU at are made by :mod:`harness.storage.disks`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.outcome import ConfigError
from harness.storage.disks import DiskImage

log = logging.getLogger(__name__)

_ID = re.compile(r"[^A-Za-z0-9]+")
MEDIA = ("disk", "cdrom")


@dataclass(frozen=True)
class Controller:
    """One emulated storage controller model.

    ``devices``, ``drive`` and ``cdrom`` are ``-device`` templates: ``{id}`` is the controller
    instance's QEMU id, ``{drive}`` the ``-drive`` id, ``{serial}`` the disk's serial number,
    ``{unit}`` its unit on the controller, ``{bus}``/``{slot}`` ``unit`` split in two for
    buses with two devices each (IDE master/slave). ``cdrom`` is how a CD-ROM drive hangs off
    the controller (ATAPI ``ide-cd`` or SCSI ``scsi-cd``); None where there is no such drive.
    """

    name: str
    description: str
    devices: tuple[str, ...]  # the controller itself, once per instance
    drive: str  # one per disk
    modules: tuple[str, ...]  # guest modules, in the order to ask for them
    config: tuple[str, ...]  # kernel options the modules need (y or m)
    naming: str  # "sd", "vd" or "nvme": the guest's block device names
    max_units: int
    machines: tuple[str, ...] = ()  # machine types it exists on (empty: any)
    cdrom: str | None = None  # one per CD-ROM drive
    cdrom_modules: tuple[str, ...] = ()  # guest modules for a CD-ROM drive on it
    cdrom_config: tuple[str, ...] = ()

    def device_args(self, instance_id: str) -> list[str]:
        """The controller's own ``-device`` values for one instance."""
        return [template.format(id=instance_id) for template in self.devices]

    def drive_arg(
        self, instance_id: str, drive_id: str, unit: int, serial: str, media: str = "disk"
    ) -> str:
        """The ``-device`` value that attaches drive ``drive_id`` at ``unit``.

        Raises:
            ConfigError: ``unit`` is beyond what the controller has, or a CD-ROM drive on a
                controller that has none.
        """
        if not 0 <= unit < self.max_units:
            raise ConfigError(
                f"controller {self.name!r}: unit {unit} does not exist; "
                f"use 0 to {self.max_units - 1}"
            )
        template = self.drive
        if media == "cdrom":
            if self.cdrom is None:
                raise ConfigError(
                    f"controller {self.name!r} has no CD-ROM drive; use one of "
                    f"{', '.join(n for n, c in CONTROLLERS.items() if c.cdrom)}"
                )
            template = self.cdrom
        return template.format(
            id=instance_id,
            drive=drive_id,
            unit=unit,
            bus=unit // 2,
            slot=unit % 2,
            serial=serial,
        )

    def guest_disk(self, index: int) -> str:
        """The guest's device for the ``index``-th disk of this naming (0 -> /dev/sda).

        Only exact when this controller's disks are the guest's only ones of this naming:
        the kernel names disks in probe order, across controllers.
        """
        if self.naming == "nvme":
            return f"/dev/nvme{index}n1"
        return f"/dev/{self.naming}{_letters(index)}"

    def guest_partition(self, index: int, number: int) -> str:
        """The guest's device for partition ``number`` of the ``index``-th disk."""
        disk = self.guest_disk(index)
        return f"{disk}p{number}" if self.naming == "nvme" else f"{disk}{number}"


def _letters(index: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: the kernel's sd_format_disk_name."""
    text = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        text = chr(ord("a") + rest) + text
    return text


CONTROLLERS: Mapping[str, Controller] = {
    c.name: c
    for c in (
        Controller(
            name="ide",
            description="PIIX3 IDE built into the pc machine (ide.0 and ide.1, two units each)",
            devices=(),
            drive="ide-hd,drive={drive},bus=ide.{bus},unit={slot},serial={serial}",
            modules=("ata_piix", "sd_mod"),
            config=("CONFIG_ATA_PIIX", "CONFIG_BLK_DEV_SD"),
            naming="sd",
            max_units=4,
            machines=("pc",),
            cdrom="ide-cd,drive={drive},bus=ide.{bus},unit={slot},serial={serial}",
            cdrom_modules=("ata_piix", "sr_mod"),
            cdrom_config=("CONFIG_ATA_PIIX", "CONFIG_BLK_DEV_SR"),
        ),
        Controller(
            name="ahci",
            description="ICH9 AHCI SATA controller (six ports)",
            devices=("ich9-ahci,id={id}",),
            drive="ide-hd,drive={drive},bus={id}.{unit},serial={serial}",
            modules=("ahci", "sd_mod"),
            config=("CONFIG_SATA_AHCI", "CONFIG_BLK_DEV_SD"),
            naming="sd",
            max_units=6,
            cdrom="ide-cd,drive={drive},bus={id}.{unit},serial={serial}",
            cdrom_modules=("ahci", "sr_mod"),
            cdrom_config=("CONFIG_SATA_AHCI", "CONFIG_BLK_DEV_SR"),
        ),
        Controller(
            name="lsi",
            description="LSI 53C895A parallel SCSI (guest driver sym53c8xx)",
            devices=("lsi53c895a,id={id}",),
            drive="scsi-hd,drive={drive},bus={id}.0,scsi-id={unit},serial={serial}",
            modules=("sym53c8xx", "sd_mod"),
            config=("CONFIG_SCSI_SYM53C8XX_2", "CONFIG_BLK_DEV_SD"),
            naming="sd",
            max_units=7,  # SCSI id 7 is the adapter's own
            cdrom="scsi-cd,drive={drive},bus={id}.0,scsi-id={unit},serial={serial}",
            cdrom_modules=("sym53c8xx", "sr_mod"),
            cdrom_config=("CONFIG_SCSI_SYM53C8XX_2", "CONFIG_BLK_DEV_SR"),
        ),
        Controller(
            name="megasas",
            description="LSI MegaRAID SAS 1078 (guest driver megaraid_sas)",
            devices=("megasas,id={id}",),
            drive="scsi-hd,drive={drive},bus={id}.0,scsi-id={unit},serial={serial}",
            modules=("megaraid_sas", "sd_mod"),
            config=("CONFIG_MEGARAID_SAS", "CONFIG_BLK_DEV_SD"),
            naming="sd",
            max_units=8,
        ),
        Controller(
            name="virtio-scsi",
            description="virtio SCSI host adapter on PCI",
            devices=("virtio-scsi-pci,id={id}",),
            drive="scsi-hd,drive={drive},bus={id}.0,channel=0,scsi-id={unit},lun=0,serial={serial}",
            modules=("virtio_pci", "virtio_scsi", "sd_mod"),
            config=("CONFIG_VIRTIO_PCI", "CONFIG_SCSI_VIRTIO", "CONFIG_BLK_DEV_SD"),
            naming="sd",
            max_units=256,
            cdrom=(
                "scsi-cd,drive={drive},bus={id}.0,channel=0,scsi-id={unit},lun=0,serial={serial}"
            ),
            cdrom_modules=("virtio_pci", "virtio_scsi", "sr_mod"),
            cdrom_config=("CONFIG_VIRTIO_PCI", "CONFIG_SCSI_VIRTIO", "CONFIG_BLK_DEV_SR"),
        ),
        Controller(
            name="virtio-blk",
            description="virtio block device on PCI, one function per disk",
            devices=(),
            drive="virtio-blk-pci,drive={drive},serial={serial}",
            modules=("virtio_pci", "virtio_blk"),
            config=("CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK"),
            naming="vd",
            max_units=32,
        ),
        Controller(
            name="nvme",
            description="NVMe controller on PCI, one per disk (namespace 1)",
            devices=(),
            drive="nvme,drive={drive},serial={serial}",
            modules=("nvme",),
            config=("CONFIG_BLK_DEV_NVME",),
            naming="nvme",
            max_units=32,
        ),
    )
}


def get(controller: str | Controller) -> Controller:
    """The controller named ``controller`` (a :class:`Controller` is returned as is).

    Raises:
        ConfigError: no such controller, listing the known ones.
    """
    if isinstance(controller, Controller):
        return controller
    try:
        return CONTROLLERS[controller]
    except KeyError:
        raise ConfigError(
            f"unknown disk controller {controller!r}; use one of {', '.join(CONTROLLERS)}"
        ) from None


@dataclass(frozen=True)
class Disk:
    """One disk to attach: a base image, the controller it hangs off, and where.

    ``image`` is a :class:`harness.storage.disks.DiskImage` or a path to an image file (raw or
    qcow2, detected). The VM boots a copy-on-write overlay of it, never the image itself.
    ``unit`` defaults to the controller's next free one; ``instance`` picks a second
    controller of the same model (``ahci`` instance 1 is another ich9-ahci).

    ``media="cdrom"`` makes it a CD-ROM drive (ATAPI or SCSI, per the controller) holding
    ``image`` (an ISO 9660 image) read-only, with no overlay. ``overlay`` names the overlay
    file to boot instead of a fresh one per VM: made by the first boot that attaches it and
    reused by every later one, so one test can boot several times against the same disk
    state (install, then boot what was installed) while the base image never changes.
    """

    image: DiskImage | Path
    controller: str | Controller
    unit: int | None = None
    instance: int = 0
    serial: str | None = None
    media: str = "disk"
    overlay: Path | None = None
    bootindex: int | None = None  # the firmware's boot order (0 first); None: not bootable


@dataclass(frozen=True)
class Attachment:
    """A disk placed on a controller instance, with its QEMU ids."""

    disk: Disk
    controller: Controller
    instance_id: str
    drive_id: str
    unit: int
    serial: str


@dataclass
class Plan:
    """What attaching a list of disks takes: QEMU arguments, guest modules, kernel options."""

    attachments: list[Attachment] = field(default_factory=list)
    controller_devices: list[str] = field(default_factory=list)

    @property
    def controllers(self) -> list[Controller]:
        """Each controller model used, once, in first-use order."""
        seen: dict[str, Controller] = {}
        for attachment in self.attachments:
            seen.setdefault(attachment.controller.name, attachment.controller)
        return list(seen.values())

    @property
    def modules(self) -> tuple[str, ...]:
        """Guest modules for every controller used (and its CD-ROM drives), each once, in order."""
        names = (m for a in self.attachments for m in _needs(a, "modules"))
        return tuple(dict.fromkeys(names))

    @property
    def config(self) -> dict[str, tuple[str, ...]]:
        """Kernel options each used controller needs (with its drives), by controller name."""
        needs: dict[str, tuple[str, ...]] = {}
        for a in self.attachments:
            name = a.controller.name
            needs[name] = tuple(dict.fromkeys((*needs.get(name, ()), *_needs(a, "config"))))
        return needs

    def device_args(self) -> list[str]:
        """``-device`` values: controllers first, then one per disk."""
        devices = list(self.controller_devices)
        for a in self.attachments:
            device = a.controller.drive_arg(
                a.instance_id, a.drive_id, a.unit, a.serial, a.disk.media
            )
            if a.disk.bootindex is not None:
                device += f",bootindex={a.disk.bootindex}"
            devices.append(device)
        return devices

    def drive_args(
        self, overlays: Sequence[Path], fmt: str = "qcow2", formats: Sequence[str] = ()
    ) -> list[str]:
        """``-drive`` arguments (flag and value pairs), one per disk, for its overlay.

        ``formats`` gives each file's format when they differ (a CD-ROM's image is attached
        as it is, read-only, usually raw); otherwise every file is ``fmt``.
        """
        if len(overlays) != len(self.attachments):
            raise ValueError("one overlay per attached disk")
        chosen = list(formats) or [fmt] * len(overlays)
        args: list[str] = []
        for attachment, overlay, form in zip(self.attachments, overlays, chosen, strict=True):
            # file.auto-read-only=off: the overlay is opened read-write at QEMU's start, before
            # a sandboxed QEMU drops privileges; otherwise a VM restored from a snapshot
            # reopens it by name when it resumes, and may not (harness.vm.sandbox).
            value = f"if=none,id={attachment.drive_id},file={overlay},format={form}"
            if attachment.disk.media == "cdrom":
                value += ",media=cdrom,readonly=on"
            else:
                value += ",file.auto-read-only=off"
            args += ["-drive", value]
        return args


def _needs(attachment: Attachment, what: str) -> tuple[str, ...]:
    """A controller's ``modules`` or ``config`` for a disk on it, or for a CD-ROM drive."""
    controller = attachment.controller
    if attachment.disk.media == "cdrom":
        return controller.cdrom_modules if what == "modules" else controller.cdrom_config
    return controller.modules if what == "modules" else controller.config


def plan(disks: Sequence[Disk], *, machine: str = "pc") -> Plan:
    """Place ``disks`` on their controllers; units are given out in order where not chosen.

    Raises:
        ConfigError: unknown controller, a unit taken twice or out of range, or a controller
            that does not exist on ``machine``.
    """
    result = Plan()
    used: dict[str, set[int]] = {}
    for index, disk in enumerate(disks):
        controller = get(disk.controller)
        if controller.machines and _machine_type(machine) not in controller.machines:
            raise ConfigError(
                f"disk {index}: controller {controller.name!r} exists only on the "
                f"{' or '.join(controller.machines)} machine, not {machine!r}; "
                "choose another controller or machine"
            )
        if disk.media not in MEDIA:
            raise ConfigError(f"disk {index}: media {disk.media!r}: use one of {', '.join(MEDIA)}")
        if disk.media == "cdrom" and disk.overlay is not None:
            raise ConfigError(f"disk {index}: a CD-ROM is read-only and has no overlay")
        if disk.instance < 0:
            raise ConfigError(f"disk {index}: controller instance {disk.instance} is negative")
        instance_id = f"{_ID.sub('', controller.name)}{disk.instance}"
        taken = used.get(instance_id)
        if taken is None:
            taken = used[instance_id] = set()
            if disk.instance > 0 and not controller.devices:
                raise ConfigError(
                    f"disk {index}: controller {controller.name!r} has no separate controller "
                    "device, so it has no second instance; leave instance at 0"
                )
            result.controller_devices += controller.device_args(instance_id)
        unit = disk.unit
        if unit is None:
            unit = next((u for u in range(controller.max_units) if u not in taken), None)
            if unit is None:
                raise ConfigError(
                    f"disk {index}: controller {controller.name!r} ({instance_id}) is full "
                    f"({controller.max_units} units); use another instance or controller"
                )
        elif unit in taken:
            raise ConfigError(
                f"disk {index}: unit {unit} of controller {controller.name!r} ({instance_id}) "
                "is already taken by another disk"
            )
        taken.add(unit)
        drive_id = f"disk{index}"
        attachment = Attachment(
            disk=disk,
            controller=controller,
            instance_id=instance_id,
            drive_id=drive_id,
            unit=unit,
            serial=disk.serial or f"bh-{drive_id}",
        )
        # Validates the unit against the controller's range (and that it has CD-ROM drives).
        controller.drive_arg(instance_id, drive_id, unit, attachment.serial, disk.media)
        result.attachments.append(attachment)
    return result


def _machine_type(machine: str) -> str:
    """``pc-i440fx-7.2,accel=tcg`` -> ``pc``; ``q35`` stays ``q35``."""
    base = machine.split(",", 1)[0]
    if base == "pc" or base.startswith("pc-i440fx"):
        return "pc"
    if base == "q35" or base.startswith("pc-q35"):
        return "q35"
    return base


DEFAULT_CONTROLLER = "virtio-blk"
ALL = "all"


def select(selectors: Sequence[str]) -> list[Controller]:
    """Controllers named by ``selectors`` (``all`` for every one), each once, in table order.

    No selectors selects :data:`DEFAULT_CONTROLLER`.

    Raises:
        ConfigError: unknown names, all listed at once with the known ones.
    """
    known = CONTROLLERS
    wanted = list(selectors) or [DEFAULT_CONTROLLER]
    if ALL in wanted:
        return list(known.values())
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown disk controller(s) {', '.join(map(repr, unknown))}; "
            f"use {ALL} or any of: {', '.join(known)}"
        )
    return [c for name, c in known.items() if name in wanted]
