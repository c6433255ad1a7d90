"""QEMU's view against the guest's, from a real boot's recorded QMP answers and console.

tests/data/storage/ holds what one real boot (ide, virtio-blk, nvme and ahci disks of 8, 9,
10 and 11 MiB) answered to query-block, query-pci and qom-get serial, and its console with
the nonce replaced by NONCE.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness import tools
from harness.vm import blockview
from harness.vm.qmp import QmpError

DATA = Path(__file__).resolve().parents[1] / "data" / "storage"
MIB = 1 << 20


class RecordedQmp:
    """Answers the QMP commands blockview sends with what a real QEMU answered."""

    def __init__(self) -> None:
        self.answers = {
            "query-block": json.loads((DATA / "query-block.json").read_text()),
            "query-pci": json.loads((DATA / "query-pci.json").read_text()),
        }
        self.serials: dict[str, str] = json.loads((DATA / "qom-serials.json").read_text())

    def command(self, name: str, *, timeout: float = 10.0, **arguments: Any) -> Any:
        if name == "qom-get":
            if arguments["path"] not in self.serials:
                raise QmpError(f"no object {arguments['path']}")
            return self.serials[arguments["path"]]
        return self.answers[name]


@pytest.fixture
def guest() -> blockview.GuestView:
    text = (DATA / "block-view.console.txt").read_text()
    return blockview.parse_guest(blockview.between_markers(text, "NONCE"))


@pytest.fixture
def qemu() -> blockview.QemuView:
    return blockview.query_qemu(RecordedQmp())


def test_qemu_view_lists_each_attached_drive_with_size_and_serial(qemu) -> None:
    assert [(d.drive_id, d.size, d.serial) for d in qemu.drives] == [
        (f"disk{i}", (8 + i) * MIB, f"bh-disk{i}") for i in range(4)
    ]
    storage = blockview.storage_functions(qemu.pci)
    # PIIX IDE, virtio-blk, NVMe and ICH9 AHCI, by vendor:device.
    assert {(f.vendor, f.device) for f in storage} == {
        (0x8086, 0x7010),
        (0x1AF4, 0x1001),
        (0x1B36, 0x0010),
        (0x8086, 0x2922),
    }


def test_guest_view_reads_disks_partitions_and_pci(guest) -> None:
    assert {name: (d.size, d.serial) for name, d in guest.disks.items()} == {
        "sda": (8 * MIB, "bh-disk0"),
        "vda": (9 * MIB, "bh-disk1"),
        "nvme0n1": (10 * MIB, "bh-disk2"),
        "sdb": (11 * MIB, "bh-disk3"),
    }
    assert guest.partitions == {name: d.size for name, d in guest.disks.items()}
    assert len(blockview.storage_functions(guest.pci)) == 4


def test_views_of_one_boot_agree(qemu, guest) -> None:
    assert blockview.compare(qemu, guest) == []
    assert blockview.disk_of(guest, "bh-disk2") == "nvme0n1"


def test_every_disagreement_is_reported(qemu, guest) -> None:
    lost = dataclasses.replace(guest, disks={k: v for k, v in guest.disks.items() if k != "vda"})
    assert blockview.compare(qemu, lost) == [
        "QEMU drive disk1 (serial 'bh-disk1', 9437184 bytes) is not among the guest's disks: "
        "['nvme0n1', 'sda', 'sdb']"
    ]
    resized = dict(guest.disks)
    resized["sda"] = dataclasses.replace(resized["sda"], size=MIB)
    assert blockview.compare(qemu, dataclasses.replace(guest, disks=resized)) == [
        "QEMU drive disk0 is 8388608 bytes, the guest's sda is 1048576 bytes"
    ]
    extra = dict(guest.disks)
    extra["sdz"] = blockview.GuestDisk("sdz", MIB, "stray")
    assert blockview.compare(qemu, dataclasses.replace(guest, disks=extra)) == [
        "the guest sees disk sdz, which matches no QEMU drive"
    ]
    no_nvme = [f for f in guest.pci if f.vendor != 0x1B36]
    assert blockview.compare(qemu, dataclasses.replace(guest, pci=no_nvme)) == [
        "QEMU has storage controller 00:04.0 [1b36:0010]; the guest does not"
    ]


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ValueError, match="no BLOCK-VIEW"):
        blockview.between_markers("no markers here\n", "NONCE")


def test_guest_commands_run_under_busybox_and_print_a_parsable_view() -> None:
    # The same busybox that runs /init runs the commands here, on the host's /sys.
    script = 'mark() { echo "[bootharness:NONCE] $*"; }\n' + "\n".join(
        blockview.guest_commands(0, wait=1)
    )
    out = subprocess.run(
        [tools.require("busybox"), "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    view = blockview.parse_guest(blockview.between_markers(out, "NONCE"))
    not_disks = ("loop", "ram", "zram", "sr", "fd", "md", "dm-")  # what the view leaves out
    host_disks = {p.name for p in Path("/sys/block").iterdir() if not p.name.startswith(not_disks)}
    assert host_disks, "this host has no block device to compare with"
    # Every disk of the host, no more, each with the size /sys says (independently read).
    assert set(view.disks) == host_disks
    for name, disk in view.disks.items():
        sectors = int((Path("/sys/block") / name / "size").read_text())
        assert disk.size == sectors * 512, name
    host_pci = list(Path("/sys/bus/pci/devices").glob("*"))
    assert bool(view.pci) == bool(host_pci)
