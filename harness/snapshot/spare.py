"""A spare QEMU for the next restore: started ahead of need, waiting for its migration stream.

Starting QEMU is the largest part of a restore the harness controls (~50-80 ms on an idle
machine, a few hundred under load: dynamic linking, device models, loading the kernel image
into ROM blobs). A suite restores the same snapshot test after test, so after each restore
one more QEMU for the same snapshot is started in a background thread while the test runs;
the next restore of that snapshot takes it (:func:`take`) and only loads the stream.

A spare is used only for the very snapshot it was started for: the key holds the plan's key,
the mechanism and the manifest's identity, since a spare maps the RAM file when it starts
(a snapshot discarded and made again is another file). Plans with disks get no spare (each
restore attaches its own overlays when QEMU starts). One spare per process at most; an
unused one is stopped when another is wanted, and every QEMU ends with the process.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from harness.outcome import HarnessError
from harness.snapshot.plan import Plan
from harness.snapshot.store import Snapshot
from harness.vm.machine import Machine

log = logging.getLogger(__name__)


@dataclass
class _Spare:
    key: tuple[str, str, tuple[str, int, int, int, int, int]]
    machine: Machine
    folder: Path
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)


_LOCK = threading.Lock()
_SPARE: _Spare | None = None


def _key(plan: Plan, snapshot: Snapshot) -> tuple[str, str, tuple[str, int, int, int, int, int]]:
    return (plan.key, snapshot.mechanism, snapshot.manifest_identity)


def wanted(plan: Plan) -> bool:
    """Whether restores of ``plan`` can use spares (not with disks)."""
    return plan.storage is None


def prepare(plan: Plan, snapshot: Snapshot, near: Path) -> None:
    """Start a spare for the next restore of ``snapshot`` in the background, in a folder next
    to ``near`` (a VM folder: the spare's files move into the next VM's folder by rename)."""
    global _SPARE
    if not wanted(plan):
        return
    key = _key(plan, snapshot)
    with _LOCK:
        if _SPARE is not None and _SPARE.key == key:
            return
        _discard_locked()
        near.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".spare-", dir=near))
        spec = plan.machine(
            folder,
            ready_nonce=snapshot.ready_nonce,
            mechanism=snapshot.mechanism,
            ram=snapshot.ram_file,
            share=False,
            incoming=True,
        )
        machine = Machine(spec, folder, nonce="", expected_boots=0)
        # Started here, connected in the background: QEMU's death signal comes when the
        # thread that started it ends, so that must be this long-lived one.
        try:
            machine.spawn()
        except HarnessError as error:
            log.debug("spare QEMU not started: %s", error)
            shutil.rmtree(folder, ignore_errors=True)
            return
        errors: list[BaseException] = []
        thread = threading.Thread(
            target=_connect, args=(machine, errors), name="spare-qemu", daemon=True
        )
        thread.start()
        _SPARE = _Spare(key, machine, folder, thread, errors)


def _connect(machine: Machine, errors: list[BaseException]) -> None:
    try:
        machine.connect()
    except BaseException as error:  # kept for take(), which then starts a QEMU of its own
        errors.append(error)


def take(plan: Plan, snapshot: Snapshot, like: Machine, *, wait: float) -> Machine | None:
    """The spare for ``snapshot`` handed over to the folder and console settings of ``like``
    (the machine the VM made for itself, not launched; its folder must not exist yet),
    launched and paused, waiting for its stream; None when there is none (or it failed)."""
    global _SPARE
    with _LOCK:
        spare = _SPARE
        if spare is None or spare.key != _key(plan, snapshot):
            return None
        _SPARE = None
    spare.thread.join(wait)
    machine = spare.machine
    if spare.thread.is_alive() or spare.error or machine.poll() is not None or not machine.ready:
        log.debug("spare QEMU not usable: %s", spare.error or "not ready or exited")
        _stop(spare)
        return None
    try:
        like.workdir.parent.mkdir(parents=True, exist_ok=True)
        machine.hand_over(like.workdir, like)
    except (OSError, HarnessError) as error:
        log.debug("spare QEMU not handed over: %s", error)
        _stop(spare)
        return None
    return machine


def current() -> Machine | None:
    """The spare QEMU waiting now, if any (for tests and diagnostics)."""
    with _LOCK:
        return None if _SPARE is None else _SPARE.machine


def discard() -> None:
    """Stop the spare, if there is one."""
    with _LOCK:
        _discard_locked()


def _discard_locked() -> None:
    global _SPARE
    if _SPARE is not None:
        spare, _SPARE = _SPARE, None
        _stop(spare)


def _stop(spare: _Spare) -> None:
    """SIGKILL at once: a spare runs no guest yet, there is nothing to shut down cleanly
    (and a QMP connect still waiting in its thread then fails fast)."""
    with contextlib.suppress(Exception):
        spare.machine.kill()
    spare.thread.join(10.0)
    with contextlib.suppress(Exception):
        spare.machine.kill()  # closes what the thread may have opened meanwhile
    shutil.rmtree(spare.folder, ignore_errors=True)  # gone already when handed over
