"""Add a disk to a running guest and take it away again, through QMP.

:func:`add_disk` opens the image as a block node (``blockdev-add``) and plugs a device onto
it (``device_add``): ``scsi-hd`` on a virtio-scsi controller the VM was started with (SCSI
hotplug goes through the controller's event queue, no firmware involved), or
``virtio-blk-pci`` on the ``pc`` machine's root bus (ACPI PCI hotplug: the guest's
``acpiphp`` scans the slot). :func:`remove_disk` asks for the device back (``device_del``)
and waits for DEVICE_DELETED. A PCI device is released only when the guest answers the ACPI
eject request, so the wait has a deadline and names the device when it passes; then the
block node is deleted.

The image reaches QEMU as a descriptor the harness opened (QMP ``add-fd``; the node's file is
``/dev/fdset/N``): a sandboxed QEMU runs as an unprivileged user by then and may not open
paths in the harness's private folders (see :mod:`harness.vm.sandbox`). So an image must be a
single file: a qcow2 whose backing file QEMU would open by name cannot be hotplugged that way.

Whether the guest *saw* the change is the test's business: check ``/sys/block`` and ``/dev``
through :class:`harness.vm.shell.GuestShell` (the kernel's uevents reach ``mdev``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.vm.qmp import Qmp, QmpError, QmpEvent
from harness.vm.state import expect_event

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 20.0


@dataclass(frozen=True)
class PluggedDisk:
    """A disk plugged by :func:`add_disk`: its guest device id and its block node."""

    device_id: str
    node_name: str
    image: Path
    driver: str
    fdset: int | None = None  # QEMU's fd set holding our descriptor of the image


def add_disk(
    qmp: Qmp,
    image: Path,
    device_id: str,
    *,
    driver: str = "virtio-blk-pci",
    bus: str | None = None,
    image_format: str = "raw",
    read_only: bool = False,
    properties: dict[str, object] | None = None,
) -> PluggedDisk:
    """Plug ``image`` into the running guest as device ``device_id``.

    ``driver`` is the guest device model (``virtio-blk-pci``, ``scsi-hd`` with ``bus`` like
    ``"scsi0.0"``, ...); ``properties`` are extra ``device_add`` arguments.

    Raises:
        FileNotFoundError: ``image`` does not exist.
        QmpError: QEMU refused the node or the device (its message says why: unknown bus,
            id in use, bad format); a node made for a refused device is deleted again.
    """
    if not image.is_file():
        raise FileNotFoundError(f"hotplug image {image} does not exist; create it first")
    node = f"{device_id}-node"
    fd = os.open(image, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        fdset = int(qmp.command_with_fd(fd, "add-fd", opaque=device_id)["fdset-id"])
    finally:
        os.close(fd)  # QEMU holds its own copy now
    try:
        qmp.command(
            "blockdev-add",
            driver=image_format,
            node_name=node,
            read_only=read_only,
            file={"driver": "file", "filename": f"/dev/fdset/{fdset}"},
        )
    except QmpError:
        qmp.command("remove-fd", fdset_id=fdset)
        raise
    arguments: dict[str, Any] = {"driver": driver, "id": device_id, "drive": node}
    if bus is not None:
        arguments["bus"] = bus
    arguments.update(properties or {})
    try:
        qmp.command("device_add", **arguments)
    except QmpError:
        qmp.command("blockdev-del", node_name=node)
        qmp.command("remove-fd", fdset_id=fdset)
        raise
    log.info("hotplugged %s (%s) from %s", device_id, driver, image)
    return PluggedDisk(device_id, node, image, driver, fdset)


def remove_device(qmp: Qmp, device_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> QmpEvent:
    """Unplug ``device_id`` and wait for its DEVICE_DELETED event.

    Raises:
        QmpError: QEMU refused the request (no such device).
        EventTimeout: the guest did not release the device within ``timeout`` seconds.
    """
    since = len(qmp.events)
    qmp.command("device_del", id=device_id)
    return expect_event(
        qmp,
        ["DEVICE_DELETED"],
        timeout,
        since=since,
        match=lambda event: event.data.get("device") == device_id,
        what=f"the guest did not release {device_id!r} (PCI unplug needs the guest's ACPI)",
    )


def remove_disk(qmp: Qmp, disk: PluggedDisk, *, timeout: float = DEFAULT_TIMEOUT) -> QmpEvent:
    """Unplug a disk from :func:`add_disk` and delete its block node; the DEVICE_DELETED event.

    Raises: as :func:`remove_device`; QmpError if the node cannot be deleted.
    """
    event = remove_device(qmp, disk.device_id, timeout=timeout)
    qmp.command("blockdev-del", node_name=disk.node_name)
    if disk.fdset is not None:
        qmp.command("remove-fd", fdset_id=disk.fdset)
    return event


__all__: Sequence[str] = ("PluggedDisk", "add_disk", "remove_device", "remove_disk")
