"""QEMU migration to and from a file: save a paused VM's state, load it into a new QEMU.

QEMU 7.2 has no ``file:`` URI, so both directions go through ``exec:cat``. With the
``shared-ram`` mechanism the ``x-ignore-shared`` capability leaves the RAM block that lives
in a shared file out of the stream (see :mod:`harness.snapshot.restore`).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from harness.snapshot.errors import SnapshotError
from harness.snapshot.store import Snapshot
from harness.vm.machine import Machine

_POLL = 0.1


def save(machine: Machine, path: Path, *, mechanism: str, deadline: float) -> None:
    """Pause the guest and write its migration stream to ``path``.

    Raises:
        SnapshotError: the migration failed or did not finish before ``deadline``.
        InfraError: QEMU died or QMP failed.
    """
    machine.qmp.command("stop")
    _set_capabilities(machine, mechanism)
    # exec: runs through /bin/sh, and QEMU waits for the command to exit before it
    # reports the migration completed, so the file is whole by then.
    machine.qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
    _wait_migration(machine, deadline, what="saving")
    if path.stat().st_size == 0:
        raise SnapshotError(f"saving the VM wrote an empty stream to {path}", machine.evidence())


def _set_capabilities(machine: Machine, mechanism: str) -> None:
    capabilities = [{"capability": "events", "state": True}]
    if mechanism == "shared-ram":
        # Needed on both sides: the shared RAM block is left out of the stream.
        capabilities.append({"capability": "x-ignore-shared", "state": True})
    machine.qmp.command("migrate-set-capabilities", capabilities=capabilities)


def _wait_migration(machine: Machine, deadline: float, *, what: str) -> None:
    final = ("completed", "failed", "cancelled")
    while True:
        event = machine.qmp.wait_event(
            ["MIGRATION"],
            min(deadline, time.monotonic() + _POLL),
            match=lambda e: e.data.get("status") in final,
        )
        if event is not None:
            status = event.data.get("status")
            if status == "completed":
                return
            raise SnapshotError(f"{what} the VM: migration {status}", machine.evidence())
        if machine.poll() is not None:
            raise machine.exited_error(f"exited while {what} the VM")
        if time.monotonic() >= deadline:
            raise SnapshotError(
                f"{what} the VM did not finish before its deadline", machine.evidence()
            )


def incoming(machine: Machine, snapshot: Snapshot, deadline: float) -> None:
    """Load ``snapshot`` into a QEMU started with ``-incoming defer`` (still paused).

    Raises:
        SnapshotError, InfraError: the load failed, QEMU died, or the deadline passed.
    """
    _set_capabilities(machine, snapshot.mechanism)
    machine.qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snapshot.state_file))}")
    _wait_migration(machine, deadline, what="restoring")
