"""One boot, from a provisioned kernel and a built initramfs to an outcome with its evidence.

:class:`Vm` drives a :class:`~harness.vm.machine.Machine` through the boot's phases, each with
its own deadline (scaled by one multiplier for slow machines), and records when each point of
progress was reached. :func:`run` maps whatever happened to exactly one
:class:`~harness.outcome.Outcome` following docs/architecture.md: a kernel fault wins over
everything, QEMU's exit status is never a verdict, and success is the nonce marker only this
boot can print.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from harness import cache, tools
from harness.image.initramfs import Initramfs, InitramfsSpec
from harness.image.initramfs import build as build_initramfs
from harness.kernel.provision import Kernel
from harness.outcome import (
    Evidence,
    HarnessError,
    Outcome,
    TestFailure,
)
from harness.storage.attach import Storage
from harness.vm import exitcode, power
from harness.vm.console import Console, ConsoleClosed, Mark, marker_regex
from harness.vm.deadlines import DEFAULT_DEADLINES, Deadlines
from harness.vm.machine import Machine, MachineSpec
from harness.vm.qmp import Qmp, QmpEvent
from harness.vm.shell import GuestShell
from harness.vm.state import VmState

log = logging.getLogger(__name__)

# Always on: serial console, printk timestamps (fault patterns anchor on them), reboot on
# panic at once (with -no-reboot QEMU then exits), and no crypto self-tests (0.4 s under TCG).
BASE_CMDLINE = "console=ttyS0 printk.time=1 panic=-1 cryptomgr.notests"
NONCE_PARAMETER = "bootharness.nonce"


def new_nonce() -> str:
    """A fresh marker nonce: 16 hex digits nothing else on the console can guess."""
    return secrets.token_hex(8)


def qemu_version(qemu: str = "qemu-system-x86_64", *, cache_root: Path | None = None) -> str:
    """QEMU's version string, e.g. ``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)``; with a
    cache, kept there while the binary is unchanged (``qemu --version`` is a process start,
    10-50 ms, in every process that reports a boot).

    Raises:
        MissingToolError: QEMU is not installed.
    """
    path = tools.require(qemu)
    if cache_root is None:
        return _qemu_version(path)
    record = cache_root / "qemu" / f"version-{cache.digest([path])[:16]}.json"
    known = cache.recall(record, path)
    if isinstance(known, str):
        return known
    before = cache.file_identity(Path(path))
    value = _qemu_version(path)
    cache.remember(record, path, value, [before])
    return value


@functools.cache
def _qemu_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (.+)", out)
    return match.group(1).strip() if match else "unknown"


def harness_modules(kernel: Kernel) -> tuple[str, ...]:
    """Modules every initramfs gets: the pvpanic driver, so a panic reaches QMP as an event."""
    if kernel.config.get("CONFIG_PVPANIC_MMIO") == "m":
        return ("pvpanic_mmio",)
    return ()


def with_harness_modules(kernel: Kernel, spec: InitramfsSpec) -> InitramfsSpec:
    """``spec`` with :func:`harness_modules` loaded first: the image :func:`prepare_vm` boots."""
    modules = tuple(dict.fromkeys((*harness_modules(kernel), *spec.modules)))
    return replace(spec, modules=modules)


@dataclass(frozen=True)
class BootRequest:
    """Everything one boot needs, named once: what the fixtures, the CLI, bisect oracles and
    snapshots pass to :func:`prepare_vm` (and :func:`harness.snapshot.restore.prepare_vm`).

    ``storage`` is planned but not attached: each VM folder gets its own disk overlays.
    ``machine_options`` are :class:`~harness.vm.machine.MachineSpec` fields (``machine``,
    ``memory_mb``, ``devices``, ``extra_args``, ...).
    """

    kernel: Kernel
    initramfs: InitramfsSpec
    accel: str = "tcg"
    deadlines: Deadlines = DEFAULT_DEADLINES
    cmdline: str = ""
    expected_boots: int = 1
    storage: Storage | None = None
    load_factor: float = 1.0  # how much the machine's load stretched ``deadlines``
    machine_options: Mapping[str, Any] = field(default_factory=dict)

    def options_for(self, workdir: Path) -> dict[str, Any]:
        """The machine options with this request's disks attached in ``workdir``."""
        options = dict(self.machine_options)
        if self.storage is not None:
            options["extra_args"] = (
                *self.storage.attach(workdir),
                *self.machine_options.get("extra_args", ()),
            )
        return options


def cold_machine(
    request: BootRequest, *, cache_root: Path, workdir: Path
) -> tuple[MachineSpec, str]:
    """The machine that boots ``request`` from the start, and the nonce on its command line.

    Builds the initramfs (or takes it from the cache), attaches the disks' overlays in
    ``workdir`` and keeps the rendered init there for the evidence.

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.image.initramfs.build`).
    """
    kernel = request.kernel
    image = build_initramfs(kernel, with_harness_modules(kernel, request.initramfs), cache_root)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "init.sh").write_text(image.init_script)
    nonce = new_nonce()
    spec = machine_spec(
        kernel,
        image,
        nonce=nonce,
        accel=request.accel,
        cmdline=request.cmdline,
        **request.options_for(workdir),
    )
    return spec, nonce


def prepare_vm(request: BootRequest, *, cache_root: Path, workdir: Path) -> Vm:
    """Set up a VM that boots ``request`` cold (see :func:`cold_machine`).

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.image.initramfs.build`).
    """
    spec, nonce = cold_machine(request, cache_root=cache_root, workdir=workdir)
    return vm_for(request, spec, workdir, nonce=nonce)


def vm_for(
    request: BootRequest,
    spec: MachineSpec,
    workdir: Path,
    *,
    nonce: str,
    start_plan: StartPlan | None = None,
) -> Vm:
    """A :class:`Vm` for ``request`` on the machine ``spec`` (cold, or as a start plan says)."""
    return Vm(
        spec,
        workdir,
        nonce=nonce,
        deadlines=request.deadlines,
        expected_boots=request.expected_boots,
        kernel=request.kernel,
        storage=request.storage,
        load_factor=request.load_factor,
        start_plan=start_plan,
    )


def machine_spec(
    kernel: Kernel,
    initramfs: Initramfs | Path | None,
    *,
    nonce: str,
    accel: str = "tcg",
    cmdline: str = "",
    prefer_vmlinux: bool = True,
    **options: Any,
) -> MachineSpec:
    """The fast-defaults machine for ``kernel``: vmlinux through PVH when it has the entry."""
    image = (kernel.vmlinux() if prefer_vmlinux else None) or kernel.vmlinuz
    initrd = initramfs.path if isinstance(initramfs, Initramfs) else initramfs
    words = [BASE_CMDLINE, f"{NONCE_PARAMETER}={nonce}", kernel.cmdline, cmdline]
    full_cmdline = " ".join(w for w in words if w)
    return MachineSpec(kernel=image, initrd=initrd, cmdline=full_cmdline, accel=accel, **options)


@dataclass
class BootResult:
    """What one boot did, for reports, junit properties and bisect logs."""

    kernel: str
    release: str
    accel: str
    outcome: Outcome
    message: str
    marks: list[Mark] = field(default_factory=list)
    log_path: Path | None = None
    qemu_version: str = ""
    error: HarnessError | None = None
    start: str = "cold"  # or "<mechanism> snapshot", or why a snapshot was not used

    @property
    def boot_time(self) -> float | None:
        """Seconds from QEMU's start to the success marker, when it came."""
        mark = next((m for m in self.marks if m.name == "PASS"), None)
        return mark.at if mark else None

    def render(self) -> str:
        """A boot report a person reads at a glance."""
        lines = [
            f"kernel:   {self.kernel} ({self.release})",
            f"qemu:     {self.qemu_version}, accel {self.accel}",
            f"start:    {self.start}",
            "phases:",
        ]
        lines += [
            f"  {m.at:8.3f} s  {m.name}{'  ' + m.detail if m.detail else ''}" for m in self.marks
        ]
        lines.append(
            f"outcome:  {self.outcome.name}" + (f": {self.message}" if self.message else "")
        )
        if self.log_path is not None:
            lines.append(f"console:  {self.log_path}")
        if self.error is not None and self.outcome is not Outcome.PASS:
            details = self.error.evidence.render()
            if details:
                lines.append(details)
        return "\n".join(lines)


class StartPlan(Protocol):
    """How a VM's QEMU comes to run the test, when not by a plain cold boot: a snapshot
    start (:mod:`harness.snapshot.restore`) resumes a saved guest, or falls back to a cold
    boot, bringing its own machine through :meth:`Vm.use_machine` before launching it."""

    def start(self, vm: Vm) -> None: ...

    def describe(self, vm: Vm) -> str:
        """How ``vm`` started, for a person: ``shared-ram snapshot``, or the reason it
        booted cold."""
        ...


class Vm:
    """A guest being booted: its machine, its nonce and its deadlines."""

    def __init__(
        self,
        spec: MachineSpec,
        workdir: Path,
        *,
        nonce: str,
        deadlines: Deadlines = DEFAULT_DEADLINES,
        expected_boots: int = 1,
        kernel: Kernel | None = None,
        storage: Storage | None = None,
        load_factor: float = 1.0,
        start_plan: StartPlan | None = None,
    ) -> None:
        self.spec = spec
        self.kernel = kernel  # what it boots, for reports (None for a hand-made spec)
        self.storage = storage  # the disks attached, when the test gave some
        self.load_factor = load_factor  # how much the machine's load stretched the deadlines
        self.boot_mechanism = "cold"  # or how a snapshot restored it (harness.snapshot.restore)
        self.nonce = nonce
        self.deadlines = deadlines
        self.machine = Machine(spec, workdir, nonce=nonce, expected_boots=expected_boots)
        self.start_plan = start_plan
        self._guest_shell: GuestShell | None = None

    def use_machine(
        self, spec: MachineSpec, workdir: Path, *, nonce: str, expected_boots: int
    ) -> Machine:
        """Put another machine in place before launch (for a :class:`StartPlan`): a restored
        snapshot's, or the cold boot it falls back to (after a failed restore, whose QEMU
        has ended). The nonce goes with the machine."""
        if self.machine.launched and self.machine.poll() is None:
            raise RuntimeError("use_machine: the VM's QEMU is still running")
        self.spec, self.nonce = spec, nonce
        self.machine = Machine(spec, workdir, nonce=nonce, expected_boots=expected_boots)
        return self.machine

    def adopt(self, machine: Machine) -> None:
        """Put an already launched machine in place (a spare QEMU, handed over to this VM's
        folder and nonce with :meth:`~harness.vm.machine.Machine.hand_over`)."""
        if self.machine.launched and self.machine.poll() is None:
            raise RuntimeError("adopt: the VM's QEMU is still running")
        self.spec, self.nonce, self.machine = machine.spec, machine.nonce, machine

    def switch_nonce(self, nonce: str) -> None:
        """The guest's init took another nonce (a go line brought it): its markers come with
        ``nonce`` from now on."""
        self.nonce = self.machine.nonce = nonce
        if self.machine.launched:
            self.machine.console.recorder.nonce = nonce

    @property
    def console(self) -> Console:
        return self.machine.console

    @property
    def qmp(self) -> Qmp:
        return self.machine.qmp

    @property
    def marks(self) -> list[Mark]:
        started = [Mark("qemu-started", 0.0)]
        if not self.machine.launched:
            return started
        return started + self.machine.console.recorder.marks

    def start(self) -> None:
        """Launch QEMU and let the guest run; wait for the kernel to start /init (or, with
        a start plan, for the restored guest to resume).

        Raises:
            InfraError, KernelFault, BootTimeout, TestFailure: see :func:`run`.
        """
        if self.start_plan is not None:
            self.start_plan.start(self)
        else:
            self.boot_cold()

    def start_description(self) -> str:
        """How this VM started: ``cold``, ``<mechanism> snapshot``, or why a snapshot it was
        asked to start from was not used."""
        if self.start_plan is None:
            return self.boot_mechanism
        return self.start_plan.describe(self)

    def boot_cold(self) -> None:
        """Launch QEMU from the firmware and wait for the kernel to start /init."""
        self.machine.launch()
        self.machine.resume()
        self._expect(re.compile(r"[\s\S]"), "firmware")
        self.expect_marker("INIT-START", phase="kernel")

    def expect_marker(
        self, *events: str, phase: str, timeout: float | None = None
    ) -> tuple[str, str]:
        """Wait for one of our markers; returns (event, detail).

        A FAIL or RESCUE marker from the init ends the wait with TestFailure carrying
        the init's reason, whatever was awaited.
        """
        wanted = (*events, "FAIL", "RESCUE")
        match = self._expect(marker_regex(self.nonce, *wanted), phase, timeout)
        event, detail = match.group("event"), match.group("detail") or ""
        if event in ("FAIL", "RESCUE") and event not in events:
            raise TestFailure(f"the init failed: {detail}", self.evidence(phase))
        return event, detail

    def expect_pass(self) -> None:
        """Wait for the init's success marker."""
        self.expect_marker("PASS", phase="init")

    def wait_shutdown(self) -> int | None:
        """Wait for the guest to power off; QEMU's exit status (never a verdict)."""
        closed = self.machine.console.drain(self.deadlines.of("shutdown"))
        # A fault printed while shutting down still counts.
        self.machine.console.recorder.scanner.flush()
        self.check_faults("shutdown")
        if not closed:
            return None
        status = self.machine.wait(self.deadlines.of("shutdown"))
        recorder = self.machine.console.recorder
        recorder.marks.append(Mark("shutdown", time.monotonic() - recorder.started))
        return status

    def check_faults(self, phase: str) -> None:
        """Raise KernelFault if the console or QMP has shown one so far."""
        self.machine.console.check_faults(phase, self.deadlines.of(phase))

    def _expect(
        self, pattern: re.Pattern[str], phase: str, timeout: float | None = None
    ) -> re.Match[str]:
        limit = self.deadlines.of(phase) if timeout is None else timeout
        try:
            return self.machine.console.expect(pattern, phase=phase, timeout=limit)
        except ConsoleClosed:
            raise self._closed_error(phase) from None

    def _closed_error(self, phase: str) -> HarnessError:
        status = self.machine.wait(5.0)
        if status is None or status != 0:
            return self.machine.exited_error(f"exited during the {phase} phase")
        return TestFailure(
            f"the guest stopped during the {phase} phase before its marker "
            "(QEMU exited 0: power-off or reset without a kernel fault)",
            self.evidence(phase),
        )

    def evidence(self, phase: str) -> Evidence:
        """The boot's evidence for an error raised in ``phase``."""
        recorder = self.machine.console.recorder
        return Evidence(
            phase=phase,
            console_tail=recorder.tail(),
            log_path=self.machine.console_log,
            argv=self.machine.argv,
            stderr=self.machine.stderr_text(),
        )

    # Driving the guest (harness/vm/shell.py, state.py, power.py, exitcode.py): thin entry
    # points, so tests write vm.shell().run(...) and vm.reset(); the modules say what raises.

    def shell(self, **options: Any) -> GuestShell:
        """The guest shell (init run with ``after="shell"``), attached on first use."""
        current = self._guest_shell
        if current is None or options:
            current = GuestShell(self, **options)
            self._guest_shell = current
        return current

    @property
    def state(self) -> VmState:
        """Typed QMP queries and commands (run state, block and PCI devices, stop/cont)."""
        return VmState(self.qmp)

    def reset(self, timeout: float | None = None) -> QmpEvent:
        """Reset on purpose and wait for the new boot's INIT-START (see harness.vm.power.reset)."""
        return power.reset(self, timeout)

    def power_button(self, timeout: float | None = None) -> QmpEvent:
        """Press the ACPI power button, wait for the guest to power off; the SHUTDOWN event."""
        return power.press_power_button(self, timeout)

    def wait_exit_code(self, *, timeout: float | None = None, check: bool = True) -> int:
        """The guest's isa-debug-exit code (see harness.vm.exitcode.wait_exit_code)."""
        return exitcode.wait_exit_code(self, timeout=timeout, check=check)

    def stop(self) -> None:
        self.machine.stop()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(
    vm: Vm,
    *,
    kernel: Kernel,
    accel: str,
    wait_shutdown: bool = True,
    cache_root: Path | None = None,
) -> BootResult:
    """Boot ``vm`` to its success marker and map what happened to one outcome (``cache_root``
    keeps QEMU's version string between runs).

    Unknown exceptions are harness bugs: they propagate, QEMU is still stopped.
    """
    error: HarnessError | None = None
    with vm:
        try:
            vm.start()
            vm.expect_pass()
            if wait_shutdown:
                vm.wait_shutdown()
        except HarnessError as failure:
            error = failure
    marks = vm.marks
    outcome = Outcome.PASS if error is None else error.outcome
    return BootResult(
        kernel=kernel.name,
        release=kernel.release,
        accel=accel,
        outcome=outcome,
        message="" if error is None else error.message,
        marks=marks,
        log_path=vm.machine.console_log,
        qemu_version=qemu_version(vm.spec.qemu, cache_root=cache_root),
        error=error,
        start=vm.start_description(),
    )
