"""One QEMU process: its command line, its start, and its certain end.

QEMU starts paused (``-S``). QMP is a socket pair and the serial console two pipes (QEMU's
stdin and stdout), all created before QEMU starts and handed to it by file descriptor, so
there is no socket path to wait for, no path-length limit, and nothing can connect to them
but us; the console is attached before the guest runs its first instruction, so no early
output can be lost.

Why pipes for the console: QEMU writes the serial port one byte at a time. On a unix socket
every byte is a message of its own with ~1 KiB of buffer accounting, so the socket is full
after a few hundred bytes whenever the reader lags, and the guest's UART waits for us (a
loaded machine measured ~1 s per 24 KB of kernel log, ~28% of a boot) while QEMU's
``logfile=`` copy doubles and drops characters. A pipe holds bytes, not messages: the same
24 KB cost ~0.05 s, and the log is intact.

No QEMU may outlive the harness: QEMU runs in a session (process group) of its own, gets
SIGKILL from the kernel when the harness dies (``PR_SET_PDEATHSIG``, even on SIGKILL of
pytest), is adopted by the lifeline reaper (:mod:`harness.lifeline`: the kernel forgets the
death signal when QEMU drops to another user), and :meth:`Machine.stop` escalates QMP quit
-> SIGTERM -> SIGKILL, each bounded. The death signal is set by util-linux's ``setpriv
--pdeathsig`` exec'ing QEMU: a Python ``preexec_fn`` would do it too, but it forces a real
``fork`` of the harness process (a pytest worker: ~45 ms for 150 MB under load, against ~3
ms for the ``vfork`` Python uses otherwise). Without setpriv, the ``preexec_fn`` it is.

QEMU confines itself (:mod:`harness.vm.sandbox`): seccomp on, and an unprivileged user when
the harness runs as root.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import lifeline, tools
from harness.outcome import Evidence, InfraError
from harness.vm.console import Console, ConsoleRecorder
from harness.vm.kernel_warnings import WarningPolicy
from harness.vm.patterns import FailurePattern, LineWatcher
from harness.vm.qmp import Qmp, QmpError
from harness.vm.sandbox import DEFAULT as DEFAULT_SANDBOX
from harness.vm.sandbox import Sandbox, describe_exit
from harness.vm.stalls import StallLimits

log = logging.getLogger(__name__)

QMP_CONNECT_TIMEOUT = 10.0
QUIT_GRACE = 2.0
TERM_GRACE = 2.0
KILL_GRACE = 5.0
# QEMU runs ahead of a slow reader by this much console output before its UART waits.
CONSOLE_PIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class MachineSpec:
    """What to boot and on which virtual hardware. Pure data; :meth:`argv` renders it."""

    kernel: Path | None  # None: the firmware boots from a disk (harness.storage.bootpaths)
    initrd: Path | None = None
    cmdline: str = ""
    accel: str = "tcg"
    machine: str = "pc"
    memory_mb: int = 512
    cpus: int = 1
    nodefaults: bool = True
    pvpanic: bool = True
    network: bool = False
    devices: Sequence[str] = ()  # -device arguments
    extra_args: Sequence[str] = ()  # anything else, appended verbatim
    qemu: str = "qemu-system-x86_64"
    sandbox: Sandbox = DEFAULT_SANDBOX  # seccomp, and whom QEMU runs as
    firmware: Path | None = None  # -bios FILE; None: QEMU's default (SeaBIOS)

    def argv(self, *, qmp_fd: int, console_log: Path) -> list[str]:
        """The full QEMU command line, with the QMP descriptor given; the serial console is
        QEMU's stdin and stdout."""
        argv = [
            self.qemu,
            "-S",
            "-no-user-config",
            "-name",
            "bootharness",
            "-machine",
            self.machine,
            "-accel",
            self.accel,
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-display",
            "none",
            "-no-reboot",
        ]
        if self.nodefaults:
            argv.append("-nodefaults")
        if self.firmware is not None:
            argv += ["-bios", str(self.firmware)]
        argv += self.sandbox.args(self.qemu)
        argv += [
            "-chardev",
            f"socket,id=qmp0,fd={qmp_fd}",
            "-mon",
            "chardev=qmp0,mode=control",
            "-chardev",
            f"stdio,id=ser0,signal=off,logfile={console_log},logappend=off",
            "-serial",
            "chardev:ser0",
        ]
        if self.pvpanic:
            argv += ["-device", "pvpanic"]
        if self.network:
            argv += ["-nic", "user,model=virtio-net-pci"]
        elif not self.nodefaults:
            argv += ["-nic", "none"]
        if self.kernel is not None:
            argv += ["-kernel", str(self.kernel)]
            if self.initrd is not None:
                argv += ["-initrd", str(self.initrd)]
            if self.cmdline:
                argv += ["-append", self.cmdline]
        for device in self.devices:
            argv += ["-device", device]
        argv += list(self.extra_args)
        return argv


_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()


DEFAULT_POLICY = WarningPolicy()


@atexit.register
def _stop_all() -> None:
    for machine in list(_LIVE):
        machine.kill()


class Machine:
    """Owns one QEMU process and its QMP and console connections.

    A context manager: every exit path ends QEMU (QMP quit, then SIGTERM, then SIGKILL).
    """

    def __init__(
        self,
        spec: MachineSpec,
        workdir: Path,
        *,
        nonce: str,
        expected_boots: int = 1,
        failure_rows: Sequence[FailurePattern] = (),
        kernel_phases: bool = False,
        watches: tuple[tuple[str, re.Pattern[str]], ...] = (),
        warnings: WarningPolicy = DEFAULT_POLICY,
        symbolise: Callable[[str, int], str] = lambda text, offset: "",
        stalls: StallLimits | None = None,
    ):
        self.spec = spec
        self.workdir = workdir
        self.nonce = nonce
        self.expected_boots = expected_boots
        # Console verdicts for inits without markers (harness.vm.patterns): the failure rows
        # to watch for, and whether the kernel's own messages mark the phases.
        self.failure_rows = tuple(failure_rows)
        self.kernel_phases = kernel_phases
        self.watches = watches  # console patterns of the firmware and loader to mark
        self.warnings = warnings  # what kernel warnings do to the boot
        self.symbolise = symbolise  # (console text, fault offset) -> symbolised trace
        self.stalls = stalls  # how the console judges stall reports (harness.vm.stalls)
        self.argv: list[str] = []
        self.started = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._qmp_socket: socket.socket | None = None  # between spawn() and connect()
        self._console: Console | None = None
        self.exit_status: int | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp_log(self) -> Path:
        return self.workdir / "qmp-events.jsonl"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "qemu.stderr"

    @property
    def qmp(self) -> Qmp:
        assert self._qmp is not None, "machine not launched"
        return self._qmp

    @property
    def console(self) -> Console:
        assert self._console is not None, "machine not launched"
        return self._console

    @property
    def launched(self) -> bool:
        """True once QEMU was started (the console exists; QMP too after :meth:`launch`)."""
        return self._console is not None

    @property
    def ready(self) -> bool:
        """True once QEMU was started and QMP connected."""
        return self._qmp is not None

    def announce_boot(self) -> None:
        """One more kernel banner is expected (a reset on purpose): the fault scanner then
        does not call it an unexpected reboot, and a bundle records the count."""
        self.expected_boots += 1
        if self._console is not None:
            self._console.recorder.scanner.expected_boots += 1

    def hand_over(self, workdir: Path, like: Machine) -> None:
        """Give a launched machine (a spare started ahead of need) to the VM that will run
        it: its folder moves to ``workdir`` (which must not exist, or be an empty folder, on
        the same file system; QEMU's open files move along) and it takes the console
        settings of ``like``, the machine the VM made for itself (its nonce, expected
        banners, verdict rows, warnings policy, stall limits); its clock restarts. What was
        read from the console before (a spare's warm-up, under the snapshot's ready nonce)
        stays in the console log, and the recorder starts anew.

        Raises:
            OSError: the folder cannot be moved there.
        """
        if self._console is None:
            raise RuntimeError("hand_over: the machine was not launched")
        old = str(self.workdir)
        os.replace(self.workdir, workdir)
        self.workdir = workdir
        self.argv = [arg.replace(old, str(workdir)) for arg in self.argv]
        (workdir / "qemu.argv").write_text("\n".join(self.argv) + "\n")
        self.nonce, self.expected_boots = like.nonce, like.expected_boots
        self.failure_rows, self.kernel_phases = like.failure_rows, like.kernel_phases
        self.watches, self.warnings = like.watches, like.warnings
        self.symbolise, self.stalls = like.symbolise, like.stalls
        self.started = time.monotonic()
        self._console.take_recorder(self._new_recorder(), symbolise=self.symbolise)
        self._console.log_path = self.console_log

    def _new_recorder(self) -> ConsoleRecorder:
        watcher = None
        if self.failure_rows or self.kernel_phases:
            watcher = LineWatcher(self.failure_rows, phases=self.kernel_phases)
        return ConsoleRecorder(
            self.started,
            self.nonce,
            self.expected_boots,
            self.stalls,
            watcher=watcher,
            watches=self.watches,
            policy=self.warnings,
        )

    def launch(self) -> None:
        """Start QEMU paused and connect QMP and the console; the guest does not run yet.

        Raises:
            MissingToolError: QEMU is not installed.
            InfraError: QEMU exited at once (bad option, missing file), with its stderr,
                or QMP did not come up.
        """
        self.spawn()
        self.connect()

    def spawn(self) -> None:
        """The first half of :meth:`launch`: start the QEMU process (and attach the console).

        Call it from a thread that lives as long as the machine: the kernel sends QEMU its
        death signal when the *thread* that started it ends, not only the process.

        Raises:
            MissingToolError: QEMU is not installed.
        """
        qemu = tools.require(self.spec.qemu)
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp_ours, qmp_theirs = socket.socketpair()
        output_ours, output_theirs = os.pipe()  # the guest's console -> us
        input_theirs, input_ours = os.pipe()  # us -> the guest's console
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep 64 KiB
            fcntl.fcntl(output_ours, fcntl.F_SETPIPE_SZ, CONSOLE_PIPE_BYTES)
        argv = self.spec.argv(qmp_fd=qmp_theirs.fileno(), console_log=self.console_log)
        argv[0] = qemu
        self.argv = argv
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        log.info("starting %s", " ".join(argv))
        with self.stderr_path.open("wb") as stderr:
            self.started = time.monotonic()
            try:
                self.process = subprocess.Popen(
                    [*prefix, *argv],
                    stdin=input_theirs,
                    stdout=output_theirs,
                    stderr=stderr,
                    pass_fds=(qmp_theirs.fileno(),),
                    start_new_session=True,
                    preexec_fn=None if prefix else lifeline.die_with_parent(),
                    cwd=self.workdir,
                )
            except BaseException:
                for fd in (output_ours, input_ours):
                    os.close(fd)
                raise
            finally:
                qmp_theirs.close()
                os.close(input_theirs)
                os.close(output_theirs)
        lifeline.adopt(self.process.pid)
        _LIVE.add(self)
        (self.workdir / "qemu.pid").write_text(f"{self.process.pid}\n")
        (self.workdir / "qemu.argv").write_text("\n".join(argv) + "\n")
        self._console = Console(
            output_ours,
            self._new_recorder(),
            sink=input_ours,
            log_path=self.console_log,
            external_fault=self._qmp_panic,
            evidence=self.evidence,
            symbolise=self.symbolise,
        )
        self._qmp_socket = qmp_ours

    def connect(self) -> None:
        """The second half of :meth:`launch`: wait for QEMU's QMP greeting and negotiate
        (any thread may do this).

        Raises:
            InfraError: QEMU exited at once (bad option, missing file), with its stderr,
                or QMP did not come up.
        """
        qmp_ours = self._qmp_socket
        assert qmp_ours is not None, "connect() before spawn()"
        self._qmp_socket = None
        try:
            self._qmp = Qmp(qmp_ours, timeout=QMP_CONNECT_TIMEOUT, log_path=self.qmp_log)
        except QmpError as error:
            # A QEMU that rejects its options closes the QMP socket as it exits.
            died = self.wait(1.0) is not None
            failure = self.exited_error("did not start") if died else error
            self.stop()
            raise failure from error

    def resume(self) -> None:
        """Let the guest run (QEMU was started paused)."""
        try:
            self.qmp.command("cont")
        except QmpError:
            if self.wait(0.5) is not None:
                raise self.exited_error("exited before the guest could run") from None
            raise

    def _qmp_panic(self) -> str | None:
        if self._qmp is None:
            return None
        event = self._qmp.find_event(["GUEST_PANICKED", "SHUTDOWN"])
        if event is None:
            return None
        if event.name == "SHUTDOWN" and event.data.get("reason") != "guest-panic":
            return None
        return f"{event.name} {event.data}"

    def evidence(self, **extra: str) -> Evidence:
        """What QEMU was asked to do and what it said."""
        return Evidence(
            argv=self.argv,
            stderr=self.stderr_text(),
            log_path=self.console_log,
            extra=dict(extra),
        )

    @property
    def pid(self) -> int:
        assert self.process is not None, "machine not launched"
        return self.process.pid

    def poll(self) -> int | None:
        """QEMU's exit status, or None while it runs."""
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for QEMU to exit; its status, or None if it still runs."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def exited_error(self, what: str) -> InfraError:
        """An INFRA_ERROR for a QEMU that died, carrying its own message."""
        status = self.poll()
        stderr = self.stderr_text().strip()
        last = stderr.splitlines()[-1] if stderr else "(no message on stderr)"
        explained = describe_exit(status)
        if explained:
            last = f"{explained}; {last}"
        return InfraError(f"QEMU {what} (exit status {status}): {last}", self.evidence())

    def stop(self) -> int | None:
        """End QEMU: QMP quit, then SIGTERM to its process group, then SIGKILL; each bounded.

        Returns QEMU's exit status. Safe to call more than once.
        """
        if self.process is None:
            return None
        if self.process.poll() is None and self._qmp is not None:
            try:
                self._qmp.command("quit", timeout=QUIT_GRACE)
            except QmpError as error:  # QEMU may be wedged or already gone
                log.debug("QMP quit: %s", error)
            self.wait(QUIT_GRACE)
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self.wait(TERM_GRACE) is None:
                log.warning("QEMU %d ignored SIGTERM for %.0f s; killing it", self.pid, TERM_GRACE)
        self.kill()
        return self.exit_status

    def kill(self) -> None:
        """SIGKILL QEMU's whole process group and reap it; close our ends."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGKILL)
        self.exit_status = self.wait(KILL_GRACE)
        if self.exit_status is not None:
            lifeline.release(self.process.pid)
        if self._qmp is not None:
            self._qmp.close()
        if self._qmp_socket is not None:  # spawned, never connected
            self._qmp_socket.close()
            self._qmp_socket = None
        if self._console is not None:
            self._console.close()
        _LIVE.discard(self)

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
