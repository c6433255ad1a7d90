"""Typed helpers over QMP: the VM's run state, its block and PCI devices, and its lifecycle.

:class:`VmState` wraps a connected :class:`~harness.vm.qmp.Qmp` and returns small frozen
dataclasses instead of raw JSON, so tests read ``state.status().running`` rather than
``qmp.command("query-status")["running"]``. Every wait has a deadline: :func:`expect_event`
raises :class:`EventTimeout` naming the event and listing the events that did come.

The full event log is written by :class:`~harness.vm.qmp.Qmp` to ``qmp-events.jsonl`` next to
``console.log`` as events arrive; the pytest report shows it for a failed test.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.outcome import BootTimeout, Evidence
from harness.vm.qmp import Qmp, QmpEvent

log = logging.getLogger(__name__)


class EventTimeout(BootTimeout):
    """An awaited QMP event did not arrive before its deadline."""

    def __init__(self, message: str, evidence: Evidence, *, names: Sequence[str]) -> None:
        super().__init__(message, evidence)
        self.names = tuple(names)


@dataclass(frozen=True)
class RunState:
    """``query-status``: QEMU's run state (``running``, ``paused``, ``shutdown``, ...)."""

    status: str
    running: bool


@dataclass(frozen=True)
class BlockDevice:
    """One entry of ``query-block``: a drive, with its medium when one is inserted."""

    device: str  # legacy drive id ("" for -blockdev / blockdev-add nodes)
    qdev: str  # the guest device's id or QOM path
    node_name: str | None
    filename: str | None
    driver: str | None  # format driver of the medium (raw, qcow2, ...)
    read_only: bool
    removable: bool


@dataclass(frozen=True)
class PciDevice:
    """One function of ``query-pci``, with bridges flattened."""

    bus: int
    slot: int
    function: int
    vendor_id: int
    device_id: int
    class_code: int
    description: str
    qdev_id: str

    @property
    def address(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"


def parse_block(result: Sequence[dict[str, Any]]) -> list[BlockDevice]:
    """``query-block``'s answer as :class:`BlockDevice` objects."""
    devices = []
    for entry in result:
        inserted = entry.get("inserted") or {}
        devices.append(
            BlockDevice(
                device=str(entry.get("device", "")),
                qdev=str(entry.get("qdev", "")),
                node_name=inserted.get("node-name"),
                filename=inserted.get("file"),
                driver=inserted.get("drv"),
                read_only=bool(inserted.get("ro", False)),
                removable=bool(entry.get("removable", False)),
            )
        )
    return devices


def parse_pci(result: Sequence[dict[str, Any]]) -> list[PciDevice]:
    """``query-pci``'s answer as :class:`PciDevice` objects, devices behind bridges included."""
    found: list[PciDevice] = []

    def walk(bus: int, devices: Sequence[dict[str, Any]]) -> None:
        for device in devices:
            ident = device.get("id", {})
            found.append(
                PciDevice(
                    bus=int(device.get("bus", bus)),
                    slot=int(device["slot"]),
                    function=int(device["function"]),
                    vendor_id=int(ident.get("vendor", 0)),
                    device_id=int(ident.get("device", 0)),
                    class_code=int(device.get("class_info", {}).get("class", 0)),
                    description=str(device.get("class_info", {}).get("desc", "")),
                    qdev_id=str(device.get("qdev_id", "")),
                )
            )
            bridge = device.get("pci_bridge")
            if bridge:
                walk(int(bridge.get("bus", {}).get("number", bus)), bridge.get("devices", []))

    for root in result:
        walk(int(root.get("bus", 0)), root.get("devices", []))
    return found


def expect_event(
    qmp: Qmp,
    names: Sequence[str],
    timeout: float,
    *,
    since: int = 0,
    match: Callable[[QmpEvent], bool] | None = None,
    what: str = "",
) -> QmpEvent:
    """The first event named in ``names`` (from index ``since``, passing ``match``).

    Raises:
        EventTimeout: none came within ``timeout`` seconds; the message lists what came.
    """
    event = qmp.wait_event(names, time.monotonic() + timeout, since=since, match=match)
    if event is not None:
        return event
    seen = [f"{e.name} {e.data}" for e in qmp.events[since:]] or ["(none)"]
    reason = f" ({what})" if what else ""
    raise EventTimeout(
        f"no QMP event {'/'.join(names)} within {timeout:.1f} s{reason}; "
        f"events since the request: {'; '.join(seen)[:600]}",
        Evidence(deadline=timeout),
        names=names,
    )


class VmState:
    """Typed QMP queries and lifecycle commands for one VM.

    Every method raises :class:`~harness.vm.qmp.QmpError` (INFRA_ERROR) when QEMU answers with an
    error or does not answer within ``timeout``.
    """

    def __init__(self, qmp: Qmp, *, timeout: float = 10.0) -> None:
        self.qmp = qmp
        self.timeout = timeout

    def _command(self, name: str, **arguments: Any) -> Any:
        return self.qmp.command(name, timeout=self.timeout, **arguments)

    def status(self) -> RunState:
        result = self._command("query-status")
        return RunState(status=str(result["status"]), running=bool(result["running"]))

    def block_devices(self) -> list[BlockDevice]:
        return parse_block(self._command("query-block"))

    def pci_devices(self) -> list[PciDevice]:
        return parse_pci(self._command("query-pci"))

    def stop(self) -> None:
        """Pause the guest's CPUs (run state ``paused``; a STOP event follows)."""
        self._command("stop")

    def cont(self) -> None:
        """Resume a paused guest (a RESUME event follows)."""
        self._command("cont")

    def system_reset(self) -> None:
        """Reset the machine. Under ``-no-reboot`` QEMU turns this into a shutdown unless
        the reboot action was set to ``reset`` first: use :func:`harness.vm.power.reset`."""
        self._command("system_reset")

    def system_powerdown(self) -> None:
        """Press the ACPI power button; the guest decides what to do (see harness.vm.power)."""
        self._command("system_powerdown")

    def set_reboot_action(self, action: str) -> None:
        """``set-action reboot=reset|shutdown``: what a reset request does (QEMU 6.0+)."""
        self._command("set-action", reboot=action)

    def quit(self) -> None:
        """Ask QEMU to exit now (the connection closes; Machine.stop reaps the process)."""
        self._command("quit")

    def events(self, *names: str, since: int = 0) -> list[QmpEvent]:
        """Events received so far (from index ``since``), only ``names`` if given."""
        return [e for e in self.qmp.events[since:] if not names or e.name in names]

    def expect_event(
        self,
        names: Sequence[str],
        timeout: float,
        *,
        since: int = 0,
        match: Callable[[QmpEvent], bool] | None = None,
        what: str = "",
    ) -> QmpEvent:
        """See :func:`expect_event`."""
        return expect_event(self.qmp, names, timeout, since=since, match=match, what=what)


def render_event_log(path: Path, limit: int = 20) -> str:
    """The last ``limit`` events of a ``qmp-events.jsonl`` log, one line each, for reports.

    Empty when the log does not exist or holds no events; unreadable lines are shown as is.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    shown = []
    for line in lines[-limit:]:
        try:
            event = json.loads(line)
            shown.append(f"{event['event']} {json.dumps(event.get('data', {}))}")
        except (ValueError, KeyError, TypeError):
            shown.append(line)
    skipped = len(lines) - len(shown)
    header = f"({skipped} earlier events in {path})\n" if skipped > 0 else ""
    return header + "\n".join(shown)


__all__: Sequence[str] = (
    "BlockDevice",
    "EventTimeout",
    "PciDevice",
    "RunState",
    "VmState",
    "expect_event",
    "parse_block",
    "parse_pci",
    "render_event_log",
)
