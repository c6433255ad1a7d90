"""QEMU migration to and from a file: save a paused VM's state, load it into a new QEMU.

QEMU 7.2 has no ``file:`` URI. Both directions go through ``fd:``: the harness opens the file
and hands the descriptor to QEMU over QMP (``getfd``), so QEMU neither runs a helper (its
seccomp sandbox denies ``exec:``) nor opens a path after dropping privileges. With the
``shared-ram`` mechanism the ``x-ignore-shared`` capability leaves the RAM block that lives
in a shared file out of the stream (see :mod:`harness.snapshot.restore`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from harness.snapshot.errors import SnapshotError
from harness.snapshot.store import Snapshot
from harness.vm.machine import Machine

_POLL = 0.1
_SAVE_FD = "bh-save"
_LOAD_FD = "bh-load"


def save(machine: Machine, path: Path, *, mechanism: str, deadline: float) -> None:
    """Pause the guest and write its migration stream to ``path``.

    Raises:
        SnapshotError: the migration failed or did not finish before ``deadline``.
        InfraError: QEMU died or QMP failed.
    """
    machine.qmp.command("stop")
    _set_capabilities(machine, mechanism)
    # QEMU writes the stream to the descriptor and closes it before it reports the
    # migration completed, so the file is whole by then.
    _hand_over(machine, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _SAVE_FD)
    machine.qmp.command("migrate", uri=f"fd:{_SAVE_FD}")
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
    _hand_over(machine, snapshot.state_file, os.O_RDONLY, _LOAD_FD)
    machine.qmp.command("migrate-incoming", uri=f"fd:{_LOAD_FD}")
    _wait_migration(machine, deadline, what="restoring")


def _hand_over(machine: Machine, path: Path, flags: int, name: str) -> None:
    """Open ``path`` here and give QEMU the descriptor under ``name`` (QMP ``getfd``)."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        machine.qmp.command_with_fd(fd, "getfd", fdname=name)
    finally:
        os.close(fd)
