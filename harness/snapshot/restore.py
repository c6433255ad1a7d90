"""Start tests from a booted snapshot instead of booting every time.

Most tests in a suite boot the same kernel, initramfs and machine, and spend nearly all of
their time getting to the same point. Here the harness boots once to that point, saves the
VM, and starts every later test with the same definition from the saved state. This module
makes snapshots (:func:`create`, :func:`ensure`) and starts VMs from them
(:class:`SnapshotVm`, :func:`prepare_vm`); the parts it builds on:

* :mod:`harness.snapshot.plan`: a test's VM split at the ready point (the shared snapshot
  image and the test's own rest of script), the go line with its fresh nonce, clock and
  randomness, and the snapshot's cache key;
* :mod:`harness.snapshot.store`: a saved snapshot's folder, its manifest, content digests,
  the checks before use, and discarding it;
* :mod:`harness.snapshot.migration`: saving a VM's state to a file and loading it into a new QEMU;
* :mod:`harness.snapshot.errors`: the errors, each of which means the test boots cold.

**Two mechanisms**, chosen at run time (:data:`~harness.snapshot.store.MECHANISMS`, best
first):

* ``shared-ram``: guest RAM lives in a file (``memory-backend-file,share=on``) while the
  snapshot boots; with the ``x-ignore-shared`` migration capability, the saved stream holds
  only device state. A restore maps the same file ``share=off`` (``MAP_PRIVATE``): pages are
  read on demand and copied on write, so the saved RAM is never written. ``x-ignore-shared``
  is experimental, so a probe restore checks after saving that the mechanism restores and
  that the RAM file's size and times did not change (its key holds the QEMU binary's hash,
  so every QEMU upgrade checks again).
* ``stream``: the portable one: the whole migration stream (RAM included) in one file,
  saved with ``migrate fd:`` into a file the harness opened and loaded with ``-incoming
  defer`` and ``migrate-incoming fd:`` (see :mod:`harness.snapshot.migration`).

The mechanism a VM started with is in ``vm.boot_mechanism`` (``cold`` when it booted) and
in the junit property ``boot_mechanism``.

**Creation** runs under :func:`harness.cache.build_once` (a file lock and an atomic rename),
so parallel workers build a snapshot once and nobody sees half of one.

**Disks.** The snapshot is taken before any disk is mounted: the guest has probed the disks
(partition tables, in its block device cache) but holds no file system state and has no
write in flight. Each restore gets its own fresh copy-on-write overlay of the same base
images, so what the guest cached at the ready point is still what the disk holds, and no
test sees another test's writes. The migration stream does not hold disk contents; the
overlays the snapshot boot used are thrown away.

**Safety.** A snapshot that is corrupt (it fails the checks of
:func:`~harness.snapshot.store.load`), or fails to restore (QEMU rejects it, the guest does
not answer the go line), is discarded and the test boots cold, with a
:class:`~harness.snapshot.errors.SnapshotWarning`. A test can always opt out and boot cold.

**After a restore**, the VM behaves like a booted one: a new console socket pair and QMP
connection (:class:`~harness.vm.machine.Machine` makes them), fault detection expecting no
kernel banner (a banner would be an unexpected reboot), the same markers. Output from before
the snapshot is not replayed: the console log starts at the restore.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cache
from harness.image.initramfs import Initramfs
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, HarnessError, InfraError
from harness.snapshot import spare
from harness.snapshot.errors import (
    SnapshotCorrupt,
    SnapshotError,
    SnapshotUnsupported,
    SnapshotWarning,
)
from harness.snapshot.migration import incoming, save
from harness.snapshot.plan import Plan, go_line, make_plan, qemu_identity, rest_message
from harness.snapshot.store import (
    MECHANISMS,
    RAM_FILE,
    STATE_FILE,
    Snapshot,
    discard,
    file_identity,
    load,
    write_manifest,
)
from harness.vm.boot import (
    BootRequest,
    StartPlan,
    Vm,
    cold_machine,
    machine_spec,
    new_nonce,
    qemu_version,
    vm_for,
)
from harness.vm.console import Mark
from harness.vm.deadlines import Deadlines
from harness.vm.machine import Machine, MachineSpec

log = logging.getLogger(__name__)

AUTO = "auto"
MODES = ("off", AUTO, *MECHANISMS)
BOOT_LOG = "snapshot-boot.log"
DEFAULT_DEADLINES = Deadlines()


# -- making one


@dataclass
class Creation:
    """Where a snapshot boot and its probe restore keep their files (not in the cache)."""

    workdir: Path
    deadlines: Deadlines = DEFAULT_DEADLINES
    seconds: float = 0.0


def create(plan: Plan, mechanism: str, target: Path, creation: Creation) -> None:
    """Boot ``plan`` to its ready point, save it with ``mechanism`` into folder ``target``,
    check that it restores, and write the manifest last.

    Raises:
        SnapshotUnsupported: the mechanism does not work with this QEMU.
        HarnessError: the boot failed before its ready point (TestFailure, KernelFault,
            BootTimeout, InfraError), or saving failed (SnapshotError).
    """
    started = time.monotonic()
    target.mkdir()
    ready_nonce = new_nonce()
    shared = mechanism == "shared-ram"
    boot_dir = creation.workdir / f"snapshot-boot-{mechanism}"
    spec = plan.machine(
        boot_dir,
        ready_nonce=ready_nonce,
        mechanism=mechanism,
        ram=target / RAM_FILE,
        share=True,
        incoming=False,
    )
    vm = Vm(spec, boot_dir, nonce=ready_nonce, deadlines=creation.deadlines)
    with vm:
        try:
            vm.start()
        except InfraError as error:
            if shared and vm.machine.poll() is not None:
                raise SnapshotUnsupported(
                    f"QEMU cannot keep guest RAM in a shared file: {error.message}"
                ) from error
            raise
        if shared:
            capabilities = vm.qmp.command("query-migrate-capabilities")
            if not any(c.get("capability") == "x-ignore-shared" for c in capabilities):
                raise SnapshotUnsupported(
                    f"QEMU {qemu_version(spec.qemu)} has no x-ignore-shared capability",
                    lasting=True,
                )
        vm.expect_marker("READY", phase="init")
        deadline = time.monotonic() + creation.deadlines.of("shutdown")
        save(vm.machine, target / STATE_FILE, mechanism=mechanism, deadline=deadline)
    shutil.copyfile(vm.machine.console_log, target / BOOT_LOG)
    _probe(plan, target, mechanism, ready_nonce, creation)
    write_manifest(
        target,
        [STATE_FILE, RAM_FILE] if shared else [STATE_FILE],
        mechanism=mechanism,
        ready_nonce=ready_nonce,
        key=plan.key,
        key_parts=dict(plan.key_parts),
        qemu_version=qemu_version(spec.qemu),
        kernel=f"{plan.kernel.name} ({plan.kernel.release})",
        memory_mb=spec.memory_mb,
        seconds=round(time.monotonic() - started, 3),
    )
    creation.seconds = time.monotonic() - started
    log.info("snapshot %s made with %s in %.2f s", target.name, mechanism, creation.seconds)


def _probe(plan: Plan, target: Path, mechanism: str, ready_nonce: str, creation: Creation) -> None:
    """Restore the new snapshot once, and check that the saved RAM was not written."""
    snapshot = Snapshot(target, mechanism, ready_nonce, {"files": {}}, ("", 0, 0, 0, 0, 0))
    ram = snapshot.ram_file
    before = file_identity(ram)[3:] if ram is not None else None
    probe_dir = creation.workdir / f"snapshot-probe-{mechanism}"
    spec = plan.restore_machine(probe_dir, snapshot)
    machine = Machine(spec, probe_dir, nonce=new_nonce(), expected_boots=0)
    try:
        machine.launch()
        incoming(machine, snapshot, time.monotonic() + creation.deadlines.of("firmware"))
        machine.resume()
        status = machine.qmp.command("query-status")
        if status.get("status") != "running":
            raise SnapshotError(f"a restored VM is {status.get('status')!r}, not running")
    except HarnessError as error:
        if mechanism == "shared-ram":
            raise SnapshotUnsupported(f"a probe restore failed: {error.message}") from error
        raise
    finally:
        machine.stop()
    if ram is not None and file_identity(ram)[3:] != before:
        raise SnapshotUnsupported(
            f"restoring wrote to the saved RAM file {ram}: copy-on-write (share=off) "
            "does not hold with this QEMU",
            lasting=True,
        )


# -- choosing and finding snapshots

# Per process: definitions whose snapshot boot failed (their tests boot cold at once).
_FAILED: dict[str, str] = {}


def _unsupported_path(cache_root: Path, qemu: str) -> Path:
    return cache_root / "snapshots" / f"mechanisms-{qemu[:16]}.json"


def unsupported_mechanisms(cache_root: Path, qemu: str) -> dict[str, str]:
    """Mechanisms found not to work with this QEMU binary, with why (kept in the cache)."""
    try:
        data = json.loads(_unsupported_path(cache_root, qemu).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _mark_unsupported(cache_root: Path, qemu: str, mechanism: str, reason: str) -> None:
    path = _unsupported_path(cache_root, qemu)
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(str(path) + ".lock"):
        known = unsupported_mechanisms(cache_root, qemu)
        known[mechanism] = reason
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1) + "\n")
        os.replace(partial, path)


def ensure(
    plan: Plan, *, cache_root: Path, mechanism: str = AUTO, creation: Creation
) -> tuple[Snapshot, bool]:
    """The snapshot for ``plan``: found in the cache, or made now. (snapshot, made now).

    With ``auto``, a saved snapshot of either mechanism is used, best first; a new one is
    made with the best mechanism that works with this QEMU.

    Raises:
        SnapshotCorrupt: a saved snapshot fails its checks (the caller discards it).
        SnapshotError: no snapshot could be made; the reason is in the message.
        ConfigError: ``mechanism`` is not one of :data:`MECHANISMS` or ``auto``.
    """
    if mechanism not in (AUTO, *MECHANISMS):
        raise ConfigError(
            f"snapshot mechanism {mechanism!r}: use one of {AUTO}, {', '.join(MECHANISMS)}"
        )
    order = MECHANISMS if mechanism == AUTO else (mechanism,)
    for candidate in order:
        entry = plan.entry(cache_root, candidate)
        if entry.exists():
            snapshot = load(entry)
            cache.touch(entry)  # pruning keeps the snapshots in use
            return snapshot, False
    if plan.key in _FAILED:
        raise SnapshotError(_FAILED[plan.key])
    qemu = plan.key_parts["qemu"]
    unsupported = unsupported_mechanisms(cache_root, qemu)
    reasons: list[str] = []
    for candidate in order:
        if candidate in unsupported:
            reasons.append(f"{candidate}: {unsupported[candidate]}")
            continue
        entry = plan.entry(cache_root, candidate)

        def build(partial: Path, chosen: str = candidate) -> None:
            create(plan, chosen, partial, creation)

        try:
            made = cache.build_once(entry, build, verify=False)  # it has its own manifest
        except SnapshotUnsupported as error:
            log.warning("snapshot mechanism %s does not work here: %s", candidate, error.message)
            if error.lasting:
                _mark_unsupported(cache_root, qemu, candidate, error.message)
            reasons.append(f"{candidate}: {error.message}")
            continue
        except HarnessError as error:
            message = (
                f"the snapshot boot failed before its ready point "
                f"({error.outcome.name}: {error.message})"
            )
            _FAILED[plan.key] = message
            raise SnapshotError(message, error.evidence) from error
        return load(entry), made
    raise SnapshotUnsupported("no snapshot mechanism works here: " + "; ".join(reasons))


# -- a VM that starts from a snapshot


class SnapshotStart:
    """A VM's :class:`~harness.vm.boot.StartPlan`: resume from a snapshot, else boot cold.

    The snapshot is made first if the cache has none. If it cannot be made or used, the
    test boots cold (from the request), with a :class:`SnapshotWarning`; the VM's
    ``boot_mechanism`` says which way it started and :attr:`note` why it booted cold.
    """

    def __init__(
        self,
        request: BootRequest,
        plan: Plan | None,
        workdir: Path,
        *,
        cache_root: Path,
        mechanism: str = AUTO,
        unusable: SnapshotError | None = None,
        spares: Path | None = None,
        fallback: StartPlan | None = None,
    ) -> None:
        self.request = request
        self.fallback = fallback  # how to start without a snapshot, if not from the request
        self.spares = spares
        self.from_spare = False  # the restore took a spare QEMU started ahead of need
        self.plan = plan
        self.workdir = workdir
        self.cache_root = cache_root
        self.mechanism = mechanism
        self.snapshot: Snapshot | None = None
        self.note: str | None = None  # why the VM booted cold, when it did
        self.created = False  # this start made the snapshot
        self._unusable = unusable

    def start(self, vm: Vm) -> None:
        """Resume ``vm``'s guest from its snapshot up to the test's own part; boot cold if
        that cannot be done.

        Raises:
            InfraError, KernelFault, BootTimeout, TestFailure: from the cold boot, as
                :meth:`Vm.start` (a restore's own failures become a cold boot).
        """
        if self._unusable is not None or self.plan is None:
            self._boot_cold(vm, self._unusable or SnapshotError("no snapshot plan"))
            return
        creation = Creation(self.workdir, vm.deadlines)
        try:
            try:
                snapshot, self.created = ensure(
                    self.plan,
                    cache_root=self.cache_root,
                    mechanism=self.mechanism,
                    creation=creation,
                )
            except SnapshotCorrupt as error:
                # Never restore what the manifest disowns: throw it away and make it again
                # (once: a second corrupt one boots cold).
                discard(error.path, error.message)
                message = f"{error.message}: discarded and made again"
                log.warning("%s", message)
                warnings.warn(SnapshotWarning(message), stacklevel=3)
                snapshot, self.created = ensure(
                    self.plan,
                    cache_root=self.cache_root,
                    mechanism=self.mechanism,
                    creation=Creation(self.workdir / "remade", vm.deadlines),
                )
        except SnapshotCorrupt as error:
            discard(error.path, error.message)
            self._boot_cold(vm, error)
            return
        except SnapshotError as error:
            self._boot_cold(vm, error)
            return
        for spares in (True, False):
            try:
                self._restore(vm, self.plan, snapshot, spares=spares)
                return
            except HarnessError as error:
                if isinstance(error, ConfigError):  # the request's fault, not the snapshot's
                    raise
                machine = vm.machine
                if machine.launched and machine.console.recorder.mark("RESUMED") is not None:
                    # The restore worked and the test's own part already failed (a command
                    # that panics the kernel at once): like a cold boot's failure after
                    # INIT-START, the next wait reports it (faults and exits stay recorded).
                    log.debug("failure right after the restore, left to the test: %s", error)
                    return
                machine.stop()
                if self.from_spare:  # says nothing about the snapshot: again, without
                    log.debug("restore with a spare QEMU failed, once more without: %s", error)
                    continue
                discard(snapshot.path, f"restore failed: {error.message}", only=snapshot)
                self._boot_cold(
                    vm, SnapshotError(f"restoring {snapshot.path} failed: {error.message}")
                )
                return

    def describe(self, vm: Vm) -> str:
        """``<mechanism> snapshot`` (``, made now`` when this start made it), or ``cold``
        with the reason a snapshot was not used."""
        if vm.boot_mechanism not in ("cold", "pending"):
            return f"{vm.boot_mechanism} snapshot" + (", made now" if self.created else "")
        if self.note is not None:
            return f"cold (no snapshot: {self.note})"
        return vm.boot_mechanism

    def _restore(self, vm: Vm, plan: Plan, snapshot: Snapshot, *, spares: bool) -> None:
        workdir = self.workdir / "restored"
        if workdir.exists() and not spares:  # a failed attempt with a spare left its files
            shutil.move(workdir, self.workdir / "restored-spare-failed")
        nonce = new_nonce()
        # No banner is expected after a restore: one would be an unexpected reboot.
        expected_boots = max(self.request.expected_boots - 1, 0)
        spec = plan.restore_machine(workdir, snapshot)
        machine = vm.use_machine(spec, workdir, nonce=nonce, expected_boots=expected_boots)
        taken = None
        if self.spares is not None and spares:
            taken = spare.take(plan, snapshot, machine, wait=vm.deadlines.of("firmware"))
        self.from_spare = taken is not None
        if taken is not None:
            vm.adopt(taken)
            machine = taken
        self.snapshot = snapshot
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "snapshot.txt").write_text(
            f"restored from {snapshot.path} ({snapshot.mechanism})\n"
            f"the boot up to the ready point: {snapshot.path / BOOT_LOG}\n"
        )
        if taken is None:
            machine.launch()
            incoming(machine, snapshot, time.monotonic() + vm.deadlines.of("firmware"))
            machine.resume()
        # (A spare was loaded, resumed and warmed up ahead of need: harness.snapshot.spare.)
        recorder = machine.console.recorder
        recorder.marks.append(Mark("restored", time.monotonic() - recorder.started))
        # Sent only now: a byte the serial port took in before the load would be lost.
        machine.console.send(go_line(nonce, plan.rest) + rest_message(plan.rest))
        vm.boot_mechanism = snapshot.mechanism
        vm.expect_marker("RESUMED", phase="firmware")
        if self.spares is not None:  # the next restore of this snapshot starts from it
            spare.prepare(plan, snapshot, self.spares)

    def _boot_cold(self, vm: Vm, reason: SnapshotError) -> None:
        message = f"booting cold instead of from a snapshot: {reason.message}"
        log.warning("%s", message)
        warnings.warn(SnapshotWarning(message), stacklevel=4)
        self.note = reason.message
        if self.fallback is not None:  # a VM known by its image only (a replay)
            self.fallback.start(vm)
            return
        if self.plan is not None:  # else the VM was set up on its cold machine already
            folder = self.workdir / "cold"
            spec, nonce = cold_machine(self.request, cache_root=self.cache_root, workdir=folder)
            vm.use_machine(spec, folder, nonce=nonce, expected_boots=self.request.expected_boots)
        vm.boot_mechanism = "cold"
        vm.boot_cold()


class SplitStart:
    """A VM's :class:`~harness.vm.boot.StartPlan` for an image with a ready point when there
    is no snapshot: boot it cold to its ready point, then send the go line and the rest of
    the init there, as a restore would. What a replay of a test that started from a snapshot
    boots, since the image it recorded is the snapshot's (its init waits at ``READY``).

    ``machine`` gives the machine for a command-line nonce (the image's init marks with it
    until the go line brings the run's own).
    """

    def __init__(
        self,
        machine: Callable[[str], MachineSpec],
        rest: str,
        workdir: Path,
        *,
        expected_boots: int = 1,
    ) -> None:
        self.machine = machine
        self.rest = rest
        self.workdir = workdir
        self.expected_boots = expected_boots

    def start(self, vm: Vm) -> None:
        """Boot to the ready point, then hand the init its go line and rest.

        Raises:
            InfraError, KernelFault, BootTimeout, TestFailure: as :meth:`Vm.start`.
        """
        folder = self.workdir / "cold"
        ready = new_nonce()
        vm.use_machine(self.machine(ready), folder, nonce=ready, expected_boots=self.expected_boots)
        vm.boot_mechanism = "cold"
        vm.boot_cold()
        vm.expect_marker("READY", phase="init")
        nonce = new_nonce()
        vm.switch_nonce(nonce)
        vm.console.send(go_line(nonce, self.rest) + rest_message(self.rest))
        vm.expect_marker("RESUMED", phase="init")

    def describe(self, vm: Vm) -> str:
        return "cold, to the snapshot's ready point"


def plan_record(vm: Vm) -> dict[str, Any] | None:
    """What a bundle keeps to start ``vm``'s snapshot again (:func:`plan_from_record`):
    None unless ``vm`` resumed from a snapshot."""
    start = vm.start_plan
    if not isinstance(start, SnapshotStart) or start.plan is None or start.snapshot is None:
        return None
    if vm.boot_mechanism not in MECHANISMS:
        return None
    plan = start.plan
    return {
        "mechanism": start.snapshot.mechanism,
        "rest": plan.rest,
        "accel": plan.accel,
        "cmdline": plan.cmdline,
        "machine_options": {k: _plain(v) for k, v in plan.machine_options.items()},
        "key_parts": dict(plan.key_parts),
        "image_digest": plan.image.digest,
        "disks": plan.storage is not None,
    }


def plan_from_record(
    kernel: Kernel,
    image: Path,
    record: Mapping[str, Any],
    *,
    cache_root: Path,
    kernel_image: Path | None = None,
) -> Plan:
    """The plan of a recorded snapshot start, on ``kernel`` and the recorded ``image`` (the
    snapshot's image), keyed for this QEMU: the same snapshot when nothing changed, else a
    new one made from the same image. ``kernel_image`` is the file QEMU booted, when the
    kernel is described by it (a replay's recorded vmlinux).

    Raises:
        KeyError, TypeError, ValueError: the record is not one :func:`plan_record` wrote.
        MissingToolError: QEMU is not installed.
    """
    options = {
        k: tuple(v) if isinstance(v, list) else v for k, v in record["machine_options"].items()
    }
    if kernel_image is not None and kernel_image == kernel.vmlinuz:
        options["prefer_vmlinux"] = False  # the kernel is known by the very image to boot
    parts = {**record["key_parts"]}
    # The snapshot's firmware, as its key holds it: a kernel known by its image alone does
    # not say it boots through PVH, which is what chose qboot.
    firmware = json.loads(parts.get("machine", "{}")).get("firmware")
    if firmware is not None:
        options.setdefault("firmware", Path(firmware) if firmware else None)
    qemu = str(options.get("qemu", MachineSpec.__dataclass_fields__["qemu"].default))
    parts["qemu"] = qemu_identity(qemu, cache_root=cache_root)
    initramfs = Initramfs(image, str(record["image_digest"]), False, (), "")
    return Plan(
        kernel,
        initramfs,
        str(record["rest"]),
        str(record["accel"]),
        str(record["cmdline"]),
        options,
        None,
        parts,
    )


def _plain(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, list | tuple) else value


def prepare_vm(
    request: BootRequest,
    *,
    cache_root: Path,
    workdir: Path,
    mechanism: str = AUTO,
    spares: Path | None = None,
) -> Vm:
    """Set up a VM that starts from a snapshot of its definition (see the module doc).

    Takes what :func:`harness.vm.boot.prepare_vm` takes (the request's disks are planned,
    not attached: every restore gets its own overlays), plus the mechanism (``auto``,
    ``shared-ram`` or ``stream``). The VM's :attr:`~harness.vm.boot.Vm.start_plan` is its
    :class:`SnapshotStart`. With ``spares`` (a folder on the file system of later VM
    folders, that lives as long as the process), each restore starts a spare QEMU there
    for the next restore of the same snapshot (:mod:`harness.snapshot.spare`): for a
    process that restores many times, such as a test session.

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.image.initramfs.build`).
    """
    plan: Plan | None = None
    unusable: SnapshotError | None = None
    try:
        plan = make_plan(
            request.kernel,
            request.initramfs,
            cache_root=cache_root,
            accel=request.accel,
            cmdline=request.cmdline,
            storage=request.storage,
            **request.machine_options,
        )
    except SnapshotUnsupported as error:
        unusable = error
    start = SnapshotStart(
        request,
        plan,
        workdir,
        cache_root=cache_root,
        mechanism=mechanism,
        unusable=unusable,
        spares=spares,
    )
    if plan is not None:
        # Until start: the machine of the snapshot's definition (its nonce comes at restore).
        spec = machine_spec(
            plan.kernel, plan.image, nonce="", accel=plan.accel, **plan.machine_options
        )
        return vm_for(request, spec, workdir / "restored", nonce="", start_plan=start)
    folder = workdir / "cold"
    spec, nonce = cold_machine(request, cache_root=cache_root, workdir=folder)
    return vm_for(request, spec, folder, nonce=nonce, start_plan=start)
