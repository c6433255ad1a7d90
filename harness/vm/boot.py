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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from harness import cache, tools
from harness.image import foreign, templates
from harness.image.foreign import OverlayFiles
from harness.image.initramfs import Initramfs, InitramfsSpec
from harness.image.initramfs import build as build_initramfs
from harness.kernel.provision import Kernel
from harness.kernel.symbols import Symboliser, trace_block
from harness.outcome import (
    ConfigError,
    Evidence,
    HarnessError,
    KernelFault,
    Outcome,
    TestFailure,
)
from harness.storage import bootpaths, firmware
from harness.storage.attach import Storage, with_boot_disk
from harness.storage.bootpaths import BootSpec
from harness.storage.controllers import Disk
from harness.vm import clock, exitcode, loader, login, power
from harness.vm.console import Console, ConsoleClosed, Mark, marker_regex
from harness.vm.deadlines import DEFAULT_DEADLINES, Deadlines
from harness.vm.dimensions import FOREIGN, UNKNOWN, Dimensions, joined
from harness.vm.faults import Fault
from harness.vm.kernel_warnings import WarningPolicy
from harness.vm.kernel_warnings import summary as warning_summary
from harness.vm.machine import Machine, MachineSpec
from harness.vm.patterns import INIT_START_REGEX, ConsoleVerdict
from harness.vm.qmp import Qmp, QmpEvent
from harness.vm.shell import GuestShell
from harness.vm.stalls import StallLimits
from harness.vm.state import VmState

log = logging.getLogger(__name__)

# Always on: serial console, printk timestamps (fault patterns anchor on them), reboot on
# panic at once (with -no-reboot QEMU then exits), and no crypto self-tests (0.4 s under TCG),
# including the KDF SP800-108 one that up to Linux 6.2 runs in its own initcall whatever
# cryptomgr.notests says (0.1 s of 1.9 under TCG, measured with initcall_debug; an initcall a
# kernel does not have is ignored).
BASE_CMDLINE = (
    "console=ttyS0 printk.time=1 panic=-1 cryptomgr.notests initcall_blacklist=crypto_kdf108_init"
)
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
    return str(cache.remembered(record, path, Path(path), lambda: _qemu_version(path)))


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

    ``initrd`` boots a prebuilt image as it is instead of building ``initramfs``;
    ``overlay`` appends an archive of files to whichever image boots
    (:func:`harness.image.foreign.overlay`). ``verdict`` holds the console patterns; with
    ``markers`` False (the default for ``initrd`` and for templates that declare
    ``{# bootharness: markers=off #}``) they alone judge the boot (:mod:`harness.vm.patterns`).
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
    initrd: Path | None = None
    overlay: OverlayFiles = field(default_factory=dict)
    verdict: ConsoleVerdict = field(default_factory=ConsoleVerdict)
    markers: bool | None = None
    boot: BootSpec = field(default_factory=BootSpec)  # the boot path (default: pvh)
    kernel_warnings: WarningPolicy = field(default_factory=WarningPolicy)

    @property
    def prints_markers(self) -> bool:
        """Whether the init prints this harness's markers (else patterns judge the boot).

        Raises:
            ConfigError: the template cannot be found.
        """
        if self.markers is not None:
            return self.markers
        if self.initrd is not None:
            return False
        spec = self.initramfs
        return templates.prints_markers(spec.template, extra_dirs=spec.template_dirs)

    def options_for(self, workdir: Path, storage: Storage | None = None) -> dict[str, Any]:
        """The machine options with this request's disks (or ``storage``) attached in
        ``workdir``, and the boot path's firmware (OVMF's variable store copied there)."""
        options = dict(self.machine_options)
        disks = storage if storage is not None else self.storage
        machine = str(options.get("machine", "pc"))
        chosen = firmware.get(self.boot.path.firmware, machine)
        extra = [*chosen.qemu_args(workdir)]
        if disks is not None:
            extra += disks.attach(workdir)
        if extra:
            options["extra_args"] = (*extra, *self.machine_options.get("extra_args", ()))
        return options


def cold_machine(
    request: BootRequest, *, cache_root: Path, workdir: Path
) -> tuple[MachineSpec, str]:
    """The machine that boots ``request`` from the start, and the nonce on its command line.

    Builds the initramfs (or takes it from the cache) or checks the prebuilt one, appends
    the overlay, attaches the disks' overlays in ``workdir`` and keeps the rendered init (or
    the prebuilt image's name and digest) there for the evidence.

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.image.initramfs.build`),
            or a prebuilt image the kernel cannot unpack.
    """
    kernel = request.kernel
    workdir.mkdir(parents=True, exist_ok=True)
    if request.initrd is not None:
        foreign.check_kernel_can_unpack(request.initrd, kernel.config, kernel_name=kernel.name)
        image_path = request.initrd
        (workdir / "initrd.txt").write_text(
            f"{request.initrd}\nsha256 {foreign.image_digest(request.initrd)}\n"
        )
    else:
        spec = with_harness_modules(kernel, request.initramfs)
        built = build_initramfs(kernel, spec, cache_root)
        (workdir / "init.sh").write_text(built.init_script)
        image_path = built.path
    if request.overlay:
        image_path = overlaid_image(image_path, request.overlay, cache_root)
    nonce = new_nonce()
    path = request.boot.path
    if path.direct:
        machine = machine_spec(
            kernel,
            image_path,
            nonce=nonce,
            accel=request.accel,
            cmdline=request.cmdline,
            prefer_vmlinux=path.kernel_image == "vmlinux",
            **request.options_for(workdir),
        )
        return machine, nonce
    # Through firmware: the kernel and initramfs go onto a boot disk of this VM's own, whose
    # loader passes the command line with this boot's nonce.
    disk_image = bootpaths.build_disk(
        request.boot,
        workdir,
        kernel=kernel,
        initrd=image_path,
        cmdline=full_cmdline(kernel, nonce, request.cmdline, request.accel),
        cache_root=cache_root,
    )
    machine_type = str(request.machine_options.get("machine", "pc"))
    boot_disk = Disk(disk_image, request.boot.controller, bootindex=0, serial="bh-boot")
    storage = with_boot_disk(request.storage, boot_disk, machine=machine_type)
    options = request.options_for(workdir, storage)
    return MachineSpec(kernel=None, accel=request.accel, **options), nonce


def overlaid_image(image: Path, files: OverlayFiles, cache_root: Path) -> Path:
    """``image`` with an overlay archive of ``files`` appended, kept in the cache under the
    digest of both (the same base and files give the same image, built once).

    Raises:
        ConfigError: an unreadable image or a bad overlay file.
    """
    archive = foreign.overlay_archive(image, files)
    key = cache.digest(["overlay-1", foreign.image_digest(image), archive])
    target = cache_root / "initramfs" / f"overlay-{key[:32]}.img"

    def write(partial: Path) -> None:
        data = image.read_bytes()
        partial.write_bytes(data + b"\0" * (-len(data) % 4) + archive)

    cache.build_once(target, write)
    return target


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
        verdict=request.verdict,
        markers=request.prints_markers,
        boot=request.boot,
        dimensions=declared_dimensions(request, booted=spec.initrd),
        kernel_warnings=request.kernel_warnings,
    )


def full_cmdline(kernel: Kernel, nonce: str, cmdline: str = "", accel: str = "tcg") -> str:
    """The kernel command line of one boot: the harness's base, the nonce, the guest's time
    keeping for ``accel`` (:mod:`harness.vm.clock`), the kernel's own and the test's words."""
    timing = clock.parameters(accel, f"{kernel.cmdline} {cmdline}")
    words = [BASE_CMDLINE, f"{NONCE_PARAMETER}={nonce}", timing, kernel.cmdline, cmdline]
    return " ".join(w for w in words if w)


def declared_dimensions(request: BootRequest, *, booted: Path | None = None) -> Dimensions:
    """What ``request`` says about the boot's dimensions before it runs (the rest, such as the
    kernel and the disks' controllers, :meth:`Vm.dimensions` reads from the VM itself).

    A feature that changes what boots (a boot path, a prebuilt initramfs) names it here. A
    prebuilt image is ``foreign``, with the digest of the file as booted (``booted``: with its
    overlay, when it has one) and the generator its content shows.
    """
    path = request.boot.path.name
    if request.initrd is not None:
        image = booted or request.initrd
        return Dimensions(
            initramfs=FOREIGN,
            initramfs_digest=foreign.image_digest(image)[:12],
            generator=foreign.generator_of(request.initrd),
            boot_path=path,
        )
    return Dimensions(template=request.initramfs.template.removesuffix(".j2"), boot_path=path)


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
    """The fast-defaults machine for ``kernel``: vmlinux through PVH when it has the entry,
    started by qboot rather than SeaBIOS when QEMU has it (:func:`firmware.qboot`; a
    ``firmware`` option, even None, chooses otherwise), and under TCG a guest clock that the
    host's load cannot miscalibrate (:mod:`.clock`)."""
    pvh = kernel.vmlinux() if prefer_vmlinux else None
    image = pvh or kernel.vmlinuz
    initrd = initramfs.path if isinstance(initramfs, Initramfs) else initramfs
    line = full_cmdline(kernel, nonce, cmdline, accel)
    if pvh is not None and "firmware" not in options:
        options["firmware"] = firmware.qboot()
    return MachineSpec(kernel=image, initrd=initrd, cmdline=line, accel=accel, **options)


def symboliser_for(kernel: Kernel | None) -> Symboliser | None:
    """What symbolises ``kernel``'s traces: its own vmlinux (a source build's, with debug info
    when it was built with it), System.map and modules; None when it has none of them."""
    if kernel is None:
        return None
    symboliser = Symboliser(
        system_map=kernel.system_map, vmlinux=kernel.debug_vmlinux, modules_dir=kernel.modules_dir
    )
    return symboliser if symboliser.useful else None


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
    boot_path: str = bootpaths.DEFAULT_BOOT_PATH
    boot_entry: str = ""  # the boot loader's menu entry that booted, when there was one
    warnings: list[str] = field(default_factory=list)  # kernel warnings the policy lists

    @property
    def boot_time(self) -> float | None:
        """Seconds from QEMU's start to the success marker, when it came."""
        mark = next((m for m in self.marks if m.name == "PASS"), None)
        return mark.at if mark else None

    def render(self) -> str:
        """A boot report a person reads at a glance."""
        lines = [*self.header_lines(), *(mark_line(m) for m in self.marks), *self.end_lines()]
        return "\n".join(lines)

    def header_lines(self) -> list[str]:
        """What booted, known before the boot starts; ends with the ``phases:`` heading."""
        return header_lines(
            self.kernel, self.release, self.qemu_version, self.accel, self.boot_path
        )

    def end_lines(self) -> list[str]:
        """How the VM started, the outcome, the console log and, for a failure, its
        evidence."""
        lines = [f"warning:  {warning}" for warning in self.warnings]
        lines.append(f"start:    {self.start}")
        lines.append(
            f"outcome:  {self.outcome.name}" + (f": {self.message}" if self.message else "")
        )
        if self.log_path is not None:
            lines.append(f"console:  {self.log_path}")
        if self.error is not None and self.outcome is not Outcome.PASS:
            details = self.error.evidence.render()
            if details:
                lines.append(details)
        return lines


def header_lines(
    kernel: str, release: str, qemu: str, accel: str, boot_path: str = bootpaths.DEFAULT_BOOT_PATH
) -> list[str]:
    """The head of a boot report (see :meth:`BootResult.render`)."""
    return [
        f"kernel:   {kernel} ({release})",
        f"qemu:     {qemu}, accel {accel}",
        f"boot:     {boot_path}",
        "phases:",
    ]


def mark_line(mark: Mark) -> str:
    """One point of progress as a boot report lists it: seconds, name, detail."""
    return f"  {mark.at:8.3f} s  {mark.name}{'  ' + mark.detail if mark.detail else ''}"


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
        verdict: ConsoleVerdict | None = None,
        markers: bool = True,
        boot: BootSpec | None = None,
        dimensions: Dimensions = UNKNOWN,
        kernel_warnings: WarningPolicy | None = None,
    ) -> None:
        self.spec = spec
        self.boot = boot or BootSpec()  # the boot path and, through a disk, menu and entry
        self.kernel = kernel  # what it boots, for reports (None for a hand-made spec)
        self.kernel_warnings = kernel_warnings or WarningPolicy()
        self.symboliser = symboliser_for(kernel)
        self.storage = storage  # the disks attached, when the test gave some
        self.load_factor = load_factor  # how much the machine's load stretched the deadlines
        self.boot_mechanism = "cold"  # or how a snapshot restored it (harness.snapshot.restore)
        self.nonce = nonce
        self.deadlines = deadlines
        # Whether the init prints our markers; without them the console patterns of
        # ``verdict`` judge the boot and the kernel's messages mark its phases.
        self.markers = markers
        self.verdict = verdict or ConsoleVerdict()
        self.machine = self._new_machine(spec, workdir, nonce, expected_boots)
        self.start_plan = start_plan
        self.declared = dimensions  # what its maker said it boots (see dimensions())
        self._guest_shell: GuestShell | None = None
        # What to type when an initramfs asks for a LUKS passphrase (a distro boot's layout).
        self.passphrase: str | None = None

    def use_machine(
        self, spec: MachineSpec, workdir: Path, *, nonce: str, expected_boots: int
    ) -> Machine:
        """Put another machine in place (for a :class:`StartPlan`): a restored snapshot's, or
        the cold boot it falls back to, also after a restore that failed and was stopped.
        The nonce goes with the machine."""
        if self.machine.launched and self.machine.poll() is None:
            raise RuntimeError("use_machine: the VM's QEMU is running; stop it first")
        self.spec, self.nonce = spec, nonce
        self.machine = self._new_machine(spec, workdir, nonce, expected_boots)
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

    def _new_machine(
        self, spec: MachineSpec, workdir: Path, nonce: str, expected_boots: int
    ) -> Machine:
        # Through firmware, the console also tells the firmware's hand-over and GRUB's entry
        # and errors: marks for the report and reasons for a failure.
        watches = () if self.boot.path.direct else bootpaths.LOADER_MARKS
        return Machine(
            spec,
            workdir,
            nonce=nonce,
            expected_boots=expected_boots,
            failure_rows=self.verdict.failure_rows(markers=self.markers),
            kernel_phases=not self.markers,
            watches=watches,
            warnings=self.kernel_warnings,
            symbolise=self.symbolise,
            stalls=self.stalls(spec),
        )

    def stalls(self, spec: MachineSpec) -> StallLimits:
        """How stall reports of this guest are judged: its own thresholds, scaled by the
        load factor its deadlines were scaled by (see :mod:`harness.vm.stalls`)."""
        config = self.kernel.config if self.kernel is not None else {}
        return StallLimits.for_boot(spec.cmdline, config, self.load_factor)

    @property
    def boot_entry(self) -> str:
        """The title of the menu entry the boot loader booted ("" without a loader)."""
        if not self.machine.launched:
            return ""
        mark = self.machine.console.recorder.mark("loader-entry")
        return mark.detail if mark is not None else ""

    def dimensions(self) -> Dimensions:
        """What this VM boots, for reports: the declared dimensions (boot path, initramfs)
        with what the VM itself knows: its kernel, its disks' controllers and layout, and the
        kernel warnings its console has shown so far (those the warnings policy lists)."""
        found = self.declared
        if self.kernel is not None:
            found = replace(
                found,
                kernel=self.kernel.name,
                release=self.kernel.release,
                kernel_commit=self.kernel.commit or found.kernel_commit,
                kernel_config=self.kernel.config_digest or found.kernel_config,
            )
        # The boot disk's controller first (it is not among the test's own disks).
        names = [] if self.boot.path.direct else [self.boot.controller]
        if self.storage is not None:
            names += [c.name for c in self.storage.plan.controllers]
            found = replace(found, layout=self.storage.layout or found.layout)
        if names:
            found = replace(found, controller=joined(names))
        return replace(found, kernel_warnings=tuple(self.warning_lines()))

    def symbolise(self, text: str, offset: int) -> str:
        """The trace of the fault at ``offset`` in console ``text``, symbolised against the
        kernel's vmlinux (file:line, with debug info) or System.map; "" if nothing to add."""
        if self.symboliser is None:
            return ""
        return self.symboliser.decode(trace_block(text, offset))

    def warnings(self) -> list[Fault]:
        """The kernel warnings seen so far that the policy lists (none before launch)."""
        if not self.machine.launched:
            return []
        return self.machine.console.reported_warnings()

    def warning_lines(self) -> list[str]:
        """Each listed warning's console line without its time stamp: what reports show."""
        return [warning_summary(fault) for fault in self.warnings()]

    def unraised_failing_warnings(self) -> list[Fault]:
        """Warnings the policy fails on that no wait has raised yet (printed after the last
        wait on the console): the plugin fails the test on them when it ends."""
        if not self.machine.launched:
            return []
        recorder = self.machine.console.recorder
        failing = recorder.policy.failing(recorder.scanner.faults)
        return [f for f in failing if f.offset not in recorder.raised]

    def warning_fault(self, found: Sequence[Fault], *, phase: str) -> KernelFault:
        """The KERNEL_FAULT for warnings the policy fails on, with the first one's evidence."""
        first = found[0]
        console = self.machine.console
        console.recorder.raised.update(f.offset for f in found)
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        evidence = replace(
            self.evidence(phase),
            excerpt=first.excerpt,
            trace=console.trace_of([first]),
        )
        return KernelFault(
            f"kernel warning (kernel warnings policy: fail): {first.name}: "
            f"{warning_summary(first)}{more}",
            evidence,
        )

    def warnings_section(self) -> str:
        """The warnings of this VM for a test's report: listed ones, and the allow-listed ones
        with their reasons ("" when there are none)."""
        if not self.machine.launched:
            return ""
        recorder = self.machine.console.recorder
        lines = [f"{f.name}: {warning_summary(f)}" for f in self.warnings()]
        lines += [
            f"known ({entry.reason}): {warning_summary(f)}"
            for f, entry in recorder.policy.known(recorder.scanner.faults)
        ]
        return "\n".join(lines)

    def fault_traces(self) -> str:
        """Every fault seen (warnings the policy lists included), each with its symbolised
        trace when the kernel's files add something: for bundles and reports."""
        if not self.machine.launched:
            return ""
        console = self.machine.console
        blocks = []
        listed = {id(f) for f in console.reported_warnings()}
        for fault in console.recorder.scanner.faults:
            if fault.severity.name == "WARNING" and id(fault) not in listed:
                continue
            trace = self.symbolise(console.recorder.text, fault.offset)
            if trace:
                blocks.append(f"{fault.name}: {warning_summary(fault)}\n{trace}")
        return "\n\n".join(blocks)

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

    def elapsed(self) -> float | None:
        """Seconds since this VM's QEMU started (the clock of its marks); None before."""
        if not self.machine.launched:
            return None
        return time.monotonic() - self.machine.started

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
        """Launch QEMU from the firmware and wait for the kernel to start /init (the init's
        INIT-START marker, or without markers the kernel's "Run /init as init process"); on
        a path through firmware and a loader, drive the loader phase in between."""
        if self.symboliser is not None:
            self.symboliser.preload()
        self.machine.launch()
        self.machine.resume()
        path = self.boot.path
        handover = path.firmware_done or re.compile(r"[\s\S]")
        seen = self._expect(
            handover, "firmware", self.deadlines.of("firmware") * path.firmware_factor
        )
        if path.wrong_handover and path.wrong_handover in seen.group(0):
            raise TestFailure(
                f"the firmware found no boot loader on the disk and started {seen.group(0)!r}",
                self.evidence("firmware"),
            )
        if path.loader:
            try:
                loader.run_loader(
                    self.machine.console,
                    self.boot.prompts(self.kernel.name if self.kernel is not None else ""),
                    timeout=self.deadlines.of("loader"),
                    evidence=self.evidence,
                )
            except ConsoleClosed:
                raise self._closed_error("loader") from None
        # The kernel's log streams for a second or more, and nothing waits on its lines.
        with self.machine.console.gathering():
            if self.markers:
                self.expect_marker("INIT-START", phase="kernel")
            else:
                self._expect(INIT_START_REGEX, "kernel", awaited="the kernel starting the init")

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
        """Wait for the init's success marker; without markers, for every ``expect`` pattern
        in order (marks ``expect:1``, ``expect:2``..., then ``PASS``).

        Raises:
            ConfigError: a boot without markers and without expect patterns.
            KernelFault, TestFailure, BootTimeout: see :func:`run`.
        """
        if self.markers:
            self.expect_marker("PASS", phase="init")
            return
        patterns = self.verdict.expect_patterns
        if not patterns:
            raise ConfigError(
                "this init prints no markers, so only expect patterns can say it succeeded: "
                "give expect=[REGEX, ...] (CLI: --expect REGEX), the line(s) a good boot prints"
            )
        recorder = self.machine.console.recorder
        for number, pattern in enumerate(patterns, start=1):
            match = self._expect(pattern, "init", awaited=f"expect pattern {pattern.pattern!r}")
            detail = match.group(0).strip()[:120]
            recorder.marks.append(Mark(f"expect:{number}", self._now(), detail))
        recorder.marks.append(Mark("PASS", self._now()))

    def _now(self) -> float:
        return time.monotonic() - self.machine.console.recorder.started

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
        self,
        pattern: re.Pattern[str],
        phase: str,
        timeout: float | None = None,
        *,
        awaited: str = "its marker",
    ) -> re.Match[str]:
        limit = self.deadlines.of(phase) if timeout is None else timeout
        try:
            return self.machine.console.expect(pattern, phase=phase, timeout=limit)
        except ConsoleClosed:
            raise self._closed_error(phase, awaited) from None

    def _closed_error(self, phase: str, awaited: str = "its marker") -> HarnessError:
        status = self.machine.wait(5.0)
        if status is None or status != 0:
            return self.machine.exited_error(f"exited during the {phase} phase")
        return TestFailure(
            f"the guest stopped during the {phase} phase before {awaited} "
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

    def login(
        self,
        user: str = "root",
        *,
        password: str | None = None,
        passphrase: str | None = None,
        timeout: float | None = None,
    ) -> GuestShell:
        """Log in on a real system's serial getty; the shell (see harness.vm.login.login).
        ``passphrase`` defaults to :attr:`passphrase`. ``vm.shell()`` returns it afterwards."""
        current = login.login(
            self,
            user=user,
            password=password,
            passphrase=self.passphrase if passphrase is None else passphrase,
            timeout=timeout,
        )
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
        boot_path=vm.boot.path.name,
        boot_entry=vm.boot_entry,
        warnings=vm.warning_lines(),
    )
