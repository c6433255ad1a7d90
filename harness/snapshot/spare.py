"""A spare QEMU for the next restore: restored and warmed up ahead of need.

A restore has two costs the test should not wait for: starting QEMU (~50-80 ms on an idle
machine, a few hundred under load: dynamic linking, device models, loading the kernel image
into ROM blobs) and, under TCG, translating afresh every code path the guest runs after the
load: the translation cache is not part of a snapshot, so the first processes the go line
starts (``stty``, ``date``) cost ~75 ms of translation on 2 cores. A suite restores the same
snapshot test after test, so after each restore one more QEMU for the same snapshot is
started, loaded with the stream, resumed, and sent a ``WARM`` line, in a background thread
while the test runs: the guest at the ready point runs the same kind of processes once and
says ``WARMED`` (with the snapshot's own ready nonce), then waits for its go line again. The
next restore of that snapshot takes it (:func:`take`) and only sends the go line.

A spare is used only for the very snapshot it was started for: the key holds the plan's key,
the mechanism and the manifest's identity, since a spare maps the RAM file when it starts
(a snapshot discarded and made again is another file). Plans with disks get no spare (each
restore attaches its own overlays when QEMU starts). One spare per process at most; an
unused one is stopped when another is wanted, and every QEMU ends with the process. An init
without the ``WARM`` loop (a template of a user's own) fails the warm-up: that spare is not
used, and the restore starts its own QEMU as before.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.outcome import HarnessError
from harness.snapshot.migration import incoming
from harness.snapshot.plan import Plan
from harness.snapshot.store import Snapshot
from harness.vm.console import marker_regex
from harness.vm.machine import Machine

log = logging.getLogger(__name__)

WARM_LINE = "WARM\n"  # read at the ready point in place of a go line (initrd_templates)
WARMED = "WARMED"  # the marker the guest prints when it is ready for its go line again
# How long a spare may take to start, load and warm up, from the thread that does it.
READY_TIMEOUT = 30.0


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
        spec = plan.restore_machine(folder, snapshot)
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
            target=_get_ready, args=(machine, snapshot, errors), name="spare-qemu", daemon=True
        )
        thread.start()
        _SPARE = _Spare(key, machine, folder, thread, errors)


def _get_ready(machine: Machine, snapshot: Snapshot, errors: list[BaseException]) -> None:
    """Connect QMP, load the snapshot, resume the guest and let it warm up (see above)."""
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        machine.connect()
        incoming(machine, snapshot, deadline)
        machine.resume()
        machine.console.send(WARM_LINE)
        warmed = marker_regex(snapshot.ready_nonce, WARMED)
        machine.console.expect(warmed, phase="firmware", timeout=deadline - time.monotonic())
    except BaseException as error:  # kept for take(), which then starts a QEMU of its own
        errors.append(error)


def take(plan: Plan, snapshot: Snapshot, like: Machine, *, wait: float) -> Machine | None:
    """The spare for ``snapshot`` handed over to the folder and console settings of ``like``
    (the machine the VM made for itself, not launched; its folder must not exist yet),
    restored, running and waiting for its go line; None when there is none (or it failed).
    Waits up to ``wait`` seconds for a spare still getting ready."""
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
    """SIGKILL at once: a spare's guest waits at the ready point, there is nothing to shut
    down cleanly (and a QMP connect still waiting in its thread then fails fast)."""
    with contextlib.suppress(Exception):
        spare.machine.kill()
    spare.thread.join(10.0)
    with contextlib.suppress(Exception):
        spare.machine.kill()  # closes what the thread may have opened meanwhile
    shutil.rmtree(spare.folder, ignore_errors=True)  # gone already when handed over
