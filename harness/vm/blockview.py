"""What QEMU says is attached, against what the guest sees.

QEMU's side comes from QMP: ``query-block`` (each drive, its size, and through ``qom-get``
the serial number of the device it is attached to) and ``query-pci`` (every PCI function,
of which the mass-storage ones, class 0x01, are the controllers). The guest's side comes
from shell commands (:func:`guest_commands`) that the init runs: they wait until the
expected number of disks appeared, then print ``/sys/block`` (name, size, serial),
``/proc/partitions`` and ``/sys/bus/pci/devices`` between two markers on the console;
:func:`parse_guest` reads that text back. :func:`compare` lists every disagreement.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.vm.qmp import QmpError

log = logging.getLogger(__name__)

BEGIN = "BLOCK-VIEW"
END = "BLOCK-VIEW-END"
STORAGE_CLASS = 0x01  # PCI base class "mass storage controller"
_NOT_DISKS = re.compile(r"^(loop|ram|zram|sr|fd|md|dm-)")


class QmpLike(Protocol):
    def command(self, name: str, *, timeout: float = ..., **arguments: Any) -> Any: ...


@dataclass(frozen=True)
class Drive:
    """A disk QEMU has attached: its drive id, size and device serial number."""

    drive_id: str
    size: int  # bytes
    serial: str
    qdev: str


@dataclass(frozen=True)
class PciFunction:
    """One PCI function: slot, function, vendor, device and base class."""

    slot: int
    function: int
    vendor: int
    device: int
    base_class: int


@dataclass(frozen=True)
class GuestDisk:
    """A whole disk the guest sees in /sys/block."""

    name: str
    size: int  # bytes
    serial: str


@dataclass
class GuestView:
    """Everything the guest printed between the markers."""

    disks: dict[str, GuestDisk] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)  # name -> bytes
    pci: list[PciFunction] = field(default_factory=list)


@dataclass
class QemuView:
    drives: list[Drive] = field(default_factory=list)
    pci: list[PciFunction] = field(default_factory=list)


def guest_commands(disks: int, *, wait: int = 10) -> list[str]:
    """Init commands that wait (up to ``wait`` s) for ``disks`` whole disks, then print
    the guest's view between ``BLOCK-VIEW`` and ``BLOCK-VIEW-END`` markers.

    The serial number is where each driver puts it: virtio-blk in ``serial``, NVMe in
    ``device/serial``, SCSI and ATA disks in VPD page 0x80 (4 header bytes, then the text).
    """
    count = "ls /sys/block | grep -cvE '^(loop|ram|zram|sr|fd|md|dm-)'"
    wait_loop = (
        f"tries={int(wait) * 10}; "
        f'while [ "$({count})" -lt {int(disks)} ] && [ "$tries" -gt 0 ]; do '
        "sleep 0.1; tries=$((tries - 1)); done"
    )
    show_disks = (
        "for d in /sys/block/*; do n=${d##*/}; "
        'case "$n" in loop* | ram* | zram* | sr* | fd* | md* | dm-*) continue ;; esac; '
        's=$(cat "$d/serial" 2>/dev/null || cat "$d/device/serial" 2>/dev/null || '
        "tail -c +5 \"$d/device/vpd_pg80\" 2>/dev/null | tr -d '\\000'); "
        'echo "disk $n $(cat "$d/size") $s"; done'
    )
    show_partitions = (
        "tail -n +3 /proc/partitions | while read -r major minor blocks name; do "
        'echo "part $name $blocks"; done'
    )
    show_pci = (
        "for p in /sys/bus/pci/devices/*; do "
        'echo "pci ${p##*/} $(cat "$p/vendor") $(cat "$p/device") $(cat "$p/class")"; done'
    )
    return [
        wait_loop,
        f"mark {BEGIN}; {show_disks}; {show_partitions}; {show_pci}; mark {END}",
    ]


def between_markers(text: str, nonce: str) -> str:
    """The console text between this boot's BLOCK-VIEW markers.

    Raises:
        ValueError: the markers are not both there.
    """
    begin = f"[bootharness:{nonce}] {BEGIN}\n"
    end = f"[bootharness:{nonce}] {END}"
    text = text.replace("\r\n", "\n")
    start = text.find(begin)
    stop = text.find(end, start + 1)
    if start < 0 or stop < 0:
        raise ValueError(f"the console holds no {BEGIN} ... {END} block for nonce {nonce}")
    return text[start + len(begin) : stop]


def parse_guest(text: str) -> GuestView:
    """Read the lines :func:`guest_commands` printed (other lines, such as kernel
    messages that slipped in, are ignored)."""
    view = GuestView()
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "disk" and words[2].isdigit():
            serial = " ".join(words[3:])
            name = words[1]
            if not _NOT_DISKS.match(name):
                view.disks[name] = GuestDisk(name, int(words[2]) * 512, serial)
        elif len(words) == 3 and words[0] == "part" and words[2].isdigit():
            view.partitions[words[1]] = int(words[2]) * 1024
        elif len(words) == 5 and words[0] == "pci":
            function = _guest_pci(words[1:])
            if function is not None:
                view.pci.append(function)
    return view


def _guest_pci(words: Sequence[str]) -> PciFunction | None:
    match = re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:([0-9a-f]{2})\.([0-7])", words[0])
    if match is None:
        return None
    try:
        vendor, device, klass = (int(w, 16) for w in words[1:])
    except ValueError:
        return None
    return PciFunction(int(match.group(1), 16), int(match.group(2)), vendor, device, klass >> 16)


def query_qemu(qmp: QmpLike) -> QemuView:
    """QEMU's view: attached drives (``query-block`` + the device's ``serial`` property)
    and PCI functions (``query-pci``).

    Raises:
        QmpError: a QMP command failed.
    """
    view = QemuView()
    for block in qmp.command("query-block"):
        inserted = block.get("inserted")
        qdev = str(block.get("qdev") or "")
        if not inserted or not qdev:
            continue  # an empty drive, or one no device uses
        size = int(inserted.get("image", {}).get("virtual-size", 0))
        view.drives.append(Drive(str(block.get("device") or qdev), size, _serial(qmp, qdev), qdev))
    for bus in qmp.command("query-pci"):
        for dev in bus.get("devices", []):
            view.pci.append(
                PciFunction(
                    int(dev["slot"]),
                    int(dev["function"]),
                    int(dev["id"]["vendor"]),
                    int(dev["id"]["device"]),
                    int(dev["class_info"]["class"]) >> 8,
                )
            )
    return view


def _serial(qmp: QmpLike, qdev: str) -> str:
    # virtio-blk-pci's drive belongs to its inner virtio-blk-device, found by qdev path;
    # an NVMe drive belongs to a namespace whose parent bus's controller holds the serial.
    for path in (qdev, qdev.rsplit("/", 1)[0] if qdev.endswith("/virtio-backend") else ""):
        if not path:
            continue
        try:
            value = qmp.command("qom-get", path=path, property="serial")
        except QmpError:
            continue
        if value:
            return str(value)
    return ""


def storage_functions(functions: Sequence[PciFunction]) -> set[PciFunction]:
    """The mass-storage controllers among ``functions``."""
    return {f for f in functions if f.base_class == STORAGE_CLASS}


def compare(qemu: QemuView, guest: GuestView) -> list[str]:
    """Every disagreement between QEMU's view and the guest's; [] when they agree.

    Each QEMU drive must be a guest disk with the same serial number and size; the guest
    must have no disk QEMU did not attach; and both must list the same PCI mass-storage
    functions (slot, function, vendor and device ids).
    """
    problems: list[str] = []
    by_serial = {d.serial: d for d in guest.disks.values()}
    matched: set[str] = set()
    for drive in qemu.drives:
        disk = by_serial.get(drive.serial)
        if disk is None:
            problems.append(
                f"QEMU drive {drive.drive_id} (serial {drive.serial!r}, {drive.size} bytes) "
                f"is not among the guest's disks: {sorted(guest.disks)}"
            )
            continue
        matched.add(disk.name)
        if disk.size != drive.size:
            problems.append(
                f"QEMU drive {drive.drive_id} is {drive.size} bytes, the guest's "
                f"{disk.name} is {disk.size} bytes"
            )
    for name in sorted(set(guest.disks) - matched):
        problems.append(f"the guest sees disk {name}, which matches no QEMU drive")
    ours, theirs = storage_functions(qemu.pci), storage_functions(guest.pci)
    for function in sorted(ours - theirs, key=_pci_key):
        problems.append(f"QEMU has storage controller {_pci(function)}; the guest does not")
    for function in sorted(theirs - ours, key=_pci_key):
        problems.append(f"the guest has storage controller {_pci(function)}; QEMU does not")
    return problems


def _pci_key(f: PciFunction) -> tuple[int, int]:
    return (f.slot, f.function)


def _pci(f: PciFunction) -> str:
    return f"00:{f.slot:02x}.{f.function} [{f.vendor:04x}:{f.device:04x}]"


def disk_of(guest: GuestView, serial: str) -> str | None:
    """The guest's name for the disk with ``serial`` (``sda``, ``vda``, ``nvme0n1``)."""
    return next((d.name for d in guest.disks.values() if d.serial == serial), None)
