"""The serial console: a pexpect transport over QEMU's console socket, with deadlines.

Every wait has a deadline and, while it waits, watches for kernel faults: each chunk that
pexpect reads goes through a :class:`ConsoleRecorder`, which time-stamps progress (first
byte, kernel banner, init markers) and feeds the fault scanner. A fault ends the wait at once
with KERNEL_FAULT, after a short grace period that lets the rest of the trace arrive so the
excerpt is complete. QEMU itself writes the full console log to disk (chardev ``logfile=``),
so the log survives even if the harness dies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect
import pexpect.fdpexpect

from harness.outcome import BootTimeout, Evidence, KernelFault, TestFailure
from harness.vm import faults
from harness.vm.kernel_warnings import WarningPolicy, summary
from harness.vm.patterns import LineWatcher
from harness.vm.stalls import StallLimits

log = logging.getLogger(__name__)

MARKER_PREFIX = "[bootharness:"
_BANNER = re.compile(r"Linux version \S+")
# Terminal escapes firmware and boot loaders draw with (vt100 cursor moves and colours).
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;=?]*[A-Za-z]|[()][0-9A-Za-z])")
# How long to keep reading after a fault so the excerpt holds the whole trace.
FAULT_GRACE = 0.5
# How long to keep reading after a failure pattern matched: a kernel fault that follows it
# (the panic after "VFS: Unable to mount root fs") wins, and the evidence gets what follows.
FAILURE_GRACE = 1.0
_POLL = 0.05
READ_SIZE = 65536
# The pause between reads of a streaming console while the kernel boots (Console.gathering).
GATHER = 0.01


class ConsoleClosed(Exception):
    """The console reached end of file: QEMU exited or closed the serial port."""


@dataclass
class Mark:
    """A point of progress seen on the console, relative to the machine's start."""

    name: str
    at: float
    detail: str = ""


@dataclass
class ConsoleRecorder:
    """Receives every chunk read from the console (pexpect's ``logfile_read``)."""

    started: float
    nonce: str
    expected_boots: InitVar[int] = 1
    stalls: InitVar[StallLimits | None] = None  # the guest's stall thresholds, the host's load
    policy: WarningPolicy = field(default_factory=WarningPolicy)
    marks: list[Mark] = field(default_factory=list)
    # (mark name, pattern) looked for in each line before the first kernel banner, escapes
    # removed: the firmware's and the boot loader's progress (harness.storage.bootpaths).
    watches: tuple[tuple[str, re.Pattern[str]], ...] = ()
    scanner: faults.FaultScanner = field(init=False)
    # Failure patterns and kernel phase marks, for inits without markers (harness.vm.patterns).
    watcher: LineWatcher | None = None
    _chunks: list[str] = field(default_factory=list)
    _partial: str = ""
    raised: set[int] = field(default_factory=set)  # offsets of faults already raised on

    def __post_init__(self, expected_boots: int, stalls: StallLimits | None) -> None:
        # The scanner alone counts boots: a reset on purpose announces one more to it.
        self.scanner = faults.FaultScanner(expected_boots=expected_boots, stalls=stalls)

    def write(self, chunk: str) -> None:
        now = time.monotonic() - self.started
        if not self._chunks:
            self.marks.append(Mark("first-byte", now))
        self._chunks.append(chunk)
        for fault in self.scanner.feed(chunk):
            self.marks.append(Mark(f"fault:{fault.name}", now, fault.line.strip()[:120]))
        if self.watcher is not None:
            hits, phases = self.watcher.feed(chunk)
            self.marks += [Mark(name, now, detail) for name, detail, _ in phases]
            self.marks += [Mark(f"fail:{h.pattern.name}", now, h.line.strip()[:120]) for h in hits]
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._note_line(line.rstrip("\r"), now)

    def flush(self) -> None:  # pexpect calls this; nothing is buffered here
        return

    def _note_line(self, line: str, now: float) -> None:
        if self.watches and self.mark("kernel-banner") is None:
            self._watch(ANSI_ESCAPE.sub("", line), now)
        if MARKER_PREFIX in line:
            marker = parse_marker(line, self.nonce)
            if marker is not None:
                self.marks.append(Mark(marker[0], now, marker[1]))
        elif "Linux version" in line and _BANNER.search(line):
            self.marks.append(Mark("kernel-banner", now))

    def _watch(self, line: str, now: float) -> None:
        for name, pattern in self.watches:
            match = pattern.search(line)
            if match is None:
                continue
            detail = (match.groupdict().get("detail") or match.group(0)).strip()[:200]
            # Two patterns may tell the same thing (GRUB's "Booting `x'" and our own echo).
            if not any(m.name == name and m.detail == detail for m in self.marks):
                self.marks.append(Mark(name, now, detail))
            return

    @property
    def text(self) -> str:
        """Everything read so far."""
        return "".join(self._chunks)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def mark(self, name: str) -> Mark | None:
        """The first mark with this name, if seen."""
        return next((m for m in self.marks if m.name == name), None)

    def serious_faults(self) -> list[faults.Fault]:
        """Faults that make a boot a KERNEL_FAULT: errors and worse, and the warnings the
        policy fails on (``--kernel-warnings fail``, not on the allowlist)."""
        seen = self.scanner.faults
        serious = [f for f in seen if f.severity >= faults.Severity.ERROR]
        failing = self.policy.failing(seen)
        if failing:
            serious = sorted([*serious, *failing], key=lambda f: f.offset)
        return serious

    def reported_warnings(self) -> list[faults.Fault]:
        """The kernel warnings to list on the test and in reports (the policy's choice)."""
        return self.policy.reported(self.scanner.faults)


def parse_marker(line: str, nonce: str) -> tuple[str, str] | None:
    """``[bootharness:<nonce>] EVENT detail`` -> (EVENT, detail) for our nonce only."""
    prefix = f"{MARKER_PREFIX}{nonce}] "
    start = line.find(prefix)
    if start < 0:
        return None
    event, _, detail = line[start + len(prefix) :].partition(" ")
    return event, detail.strip()


def marker_regex(nonce: str, *events: str) -> re.Pattern[str]:
    """A regex matching one of our markers, capturing the event and its detail."""
    names = "|".join(re.escape(e) for e in events) if events else r"[A-Z][A-Z0-9-]*"
    return re.compile(
        re.escape(f"{MARKER_PREFIX}{nonce}] ")
        + rf"(?P<event>{names})(?: (?P<detail>[^\r\n]*))?\r?\n"
    )


if TYPE_CHECKING:  # generic in the type stubs only
    _FdSpawn = pexpect.fdpexpect.fdspawn[str]
else:
    _FdSpawn = pexpect.fdpexpect.fdspawn


class ConsoleSpawn(_FdSpawn):
    """pexpect over a console whose two directions are two descriptors (QEMU's stdout and
    stdin pipes): reads from ``child_fd``, writes to ``sink_fd`` (the same one for a socket)."""

    def __init__(self, source: int, sink: int, **options: Any) -> None:
        super().__init__(source, **options)
        self.sink_fd = sink
        # Seconds between reads while output streams (0: read as soon as anything arrives).
        self.gather = 0.0
        self._last_read = 0.0

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> Any:
        """pexpect's read, at most one per :attr:`gather` seconds while output streams: a
        chunk after a quiet spell is read at once, a stream in fewer, larger chunks."""
        if self.gather:
            pause = self._last_read + self.gather - time.monotonic()
            if pause > 0:
                time.sleep(pause if timeout is None or timeout < 0 else min(pause, timeout))
        data = super().read_nonblocking(size, timeout)
        self._last_read = time.monotonic()
        return data

    def send(self, s: str | bytes) -> int:
        """Write all of ``s`` to the console's input; the number of bytes written."""
        data = s.encode("utf-8") if isinstance(s, str) else s
        view = memoryview(data)
        while view:
            view = view[os.write(self.sink_fd, view) :]
        return len(data)

    def close(self) -> None:
        if self.sink_fd != self.child_fd and self.sink_fd != -1:
            with contextlib.suppress(OSError):
                os.close(self.sink_fd)
        self.sink_fd = -1
        super().close()


class Console:
    """The guest's first serial port, read and written through pexpect.

    ``source`` is what the guest prints (a pipe's read end, or a socket) and ``sink`` what it
    reads (a pipe's write end; the source itself when omitted, for a socket). The console
    owns both and closes them.
    """

    def __init__(
        self,
        source: socket.socket | int,
        recorder: ConsoleRecorder,
        *,
        log_path: Path,
        sink: int | None = None,
        external_fault: Callable[[], str | None] = lambda: None,
        evidence: Callable[[], Evidence] = Evidence,
        symbolise: Callable[[str, int], str] = lambda text, offset: "",
    ) -> None:
        self._socket = source if isinstance(source, socket.socket) else None
        fd = source.fileno() if isinstance(source, socket.socket) else source
        self.recorder = recorder
        self.log_path = log_path
        self._external_fault = external_fault
        self._evidence = evidence
        # (console text, offset of the fault's line) -> the symbolised trace, or "".
        self._symbolise = symbolise
        # Reads take whatever has arrived (up to 64 KiB), with no pause after each: the
        # defaults (2000 bytes, then sleep 100 us) cost a wake-up per line of a boot log.
        self.child = ConsoleSpawn(
            fd,
            fd if sink is None else sink,
            encoding="utf-8",
            codec_errors="replace",
            timeout=None,
            maxread=READ_SIZE,
        )
        self.child.delaybeforesend = None  # pexpect sleeps 50 ms before each send by default
        self.child.delayafterread = None
        self.child.logfile_read = recorder
        self._closed = False  # the console reached end of file

    @contextlib.contextmanager
    def gathering(self, seconds: float = GATHER) -> Iterator[None]:
        """Read at most one chunk per ``seconds`` while output streams, inside the block.

        For waits where nothing hurries the reader, as the kernel's boot log (~900 reads of
        a few dozen bytes each otherwise): the host CPU the reader spares is the guest's
        when boots run side by side (``pytest -n``) on as many cores as there are guests.
        What the block waits for is seen at most ``seconds`` later.
        """
        self.child.gather = seconds
        try:
            yield
        finally:
            self.child.gather = 0.0

    def reported_warnings(self) -> list[faults.Fault]:
        """The kernel warnings the policy lists (every warning not on the allowlist)."""
        return self.recorder.reported_warnings()

    def take_recorder(
        self, recorder: ConsoleRecorder, *, symbolise: Callable[[str, int], str]
    ) -> None:
        """Record into ``recorder`` from now on (a spare machine given to its VM, before
        anything was read)."""
        self.recorder = recorder
        self.child.logfile_read = recorder
        self._symbolise = symbolise

    @property
    def input_fd(self) -> int:
        """The descriptor the guest reads from (for a terminal attached to the console)."""
        return self.child.sink_fd

    def send(self, text: str) -> None:
        self.child.send(text)

    def sendline(self, text: str = "") -> None:
        self.child.send(text + "\n")

    def expect(
        self, pattern: str | re.Pattern[str], *, phase: str, timeout: float
    ) -> re.Match[str]:
        """Wait for ``pattern``, watching for kernel faults, until ``timeout`` seconds pass.

        Raises:
            KernelFault: a fault was seen on the console or reported by QMP.
            BootTimeout: the deadline passed with QEMU still alive.
            ConsoleClosed: the console reached end of file first.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check_faults(phase, timeout)
            self.check_failures(phase, timeout)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootTimeout(
                    f"no {describe(pattern)} on the console within {timeout:.1f} s ({phase} phase)",
                    self._with(phase, timeout),
                )
            try:
                self.child.expect(pattern, timeout=min(_POLL, remaining))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                self._closed = True
                self.recorder.scanner.flush()
                self.check_faults(phase, timeout)
                if self.recorder.watcher is not None:
                    self.recorder.watcher.flush()
                self.check_failures(phase, timeout)
                raise ConsoleClosed(phase) from None
            self.check_faults(phase, timeout)
            self.check_failures(phase, timeout)
            match = self.child.match
            assert isinstance(match, re.Match)
            return match

    def drain(self, timeout: float) -> bool:
        """Read whatever arrives for up to ``timeout`` s; True if the console closed."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.child.read_nonblocking(65536, timeout=min(_POLL, remaining))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return True
        return False

    def check_faults(self, phase: str, timeout: float) -> None:
        """Raise KernelFault if the console or QMP has shown one (after a short grace)."""
        serious = self.recorder.serious_faults()
        external = self._external_fault()
        if not serious and external is None:
            return
        # Let the rest of the trace (or QEMU's exit after a panic) arrive before judging.
        self._read_rest_of_trace()
        if not self.recorder.serious_faults() and external is None:
            return  # a stall report the host's load explains (harness.vm.stalls): a warning
        self.recorder.scanner.flush()
        serious = self.recorder.serious_faults()
        text = self.recorder.text
        trace = ""
        if serious:
            worst = max(serious, key=lambda f: f.severity)
            if worst.severity is faults.Severity.WARNING:
                message = f"kernel warning (kernel warnings policy: fail): {worst.name}: "
                message += summary(worst)
                snippet = worst.excerpt or faults.excerpt(text, worst.offset)
            else:
                message = f"kernel fault: {worst.name}: {worst.line.strip()}"
                snippet = faults.excerpt(text, worst.offset)
            trace = self.trace_of(serious)
        else:
            message = f"kernel fault reported by QEMU: {external}"
            snippet = ""
        if external is not None and serious:
            message += f" (QEMU also reported {external})"
        self.recorder.raised.update(f.offset for f in serious)
        evidence = replace(self._with(phase, timeout, excerpt=snippet), trace=trace)
        raise KernelFault(message, evidence)

    def trace_of(self, found: list[faults.Fault]) -> str:
        """The symbolised stack trace of the first of ``found`` that has one ("" when the
        kernel's files add nothing).

        The first fault of a kernel event carries the trace: a NULL dereference prints "BUG:
        kernel NULL pointer dereference", "Oops", the trace, then "Kernel panic ... Fatal
        exception", so the trace follows the first line, not the worst.
        """
        text = self.recorder.text
        for fault in sorted(found, key=lambda f: f.offset)[:3]:
            try:
                trace = self._symbolise(text, fault.offset)
            except (OSError, ValueError) as error:  # never hide the fault itself
                log.warning("cannot symbolise the trace of %s: %s", fault.name, error)
                return ""
            if trace:
                return trace
        return ""

    def check_failures(self, phase: str, timeout: float) -> None:
        """Raise TestFailure if a failure pattern matched a console line (after a short
        grace in which a kernel fault, which wins, may still arrive).

        Raises:
            KernelFault: a fault came during the grace.
            TestFailure: with the matched line as the reason.
        """
        watcher = self.recorder.watcher
        if watcher is None or not watcher.hits:
            return
        self._read_for(FAILURE_GRACE)
        if self._closed:
            self.recorder.scanner.flush()  # the last line, if unfinished, may be a fault
        self.check_faults(phase, timeout)
        hit = watcher.hits[0]
        snippet = faults.excerpt(self.recorder.text, hit.offset)
        raise TestFailure(hit.reason, self._with(phase, timeout, excerpt=snippet))

    def _read_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._closed and (remaining := deadline - time.monotonic()) > 0:
            try:
                self.child.read_nonblocking(65536, timeout=min(_POLL, remaining))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                self._closed = True

    def _read_rest_of_trace(self) -> None:
        deadline = time.monotonic() + FAULT_GRACE
        while (remaining := deadline - time.monotonic()) > 0:
            if "---[ end " in self.recorder.text[-4096:]:
                return
            try:
                self.child.read_nonblocking(65536, timeout=min(_POLL, remaining))
            except pexpect.TIMEOUT:
                continue
            except pexpect.EOF:
                return

    def _with(self, phase: str, timeout: float, excerpt: str = "") -> Evidence:
        base = self._evidence()
        return Evidence(
            phase=phase,
            deadline=timeout,
            console_tail=self.recorder.tail(),
            log_path=self.log_path,
            argv=base.argv,
            stderr=base.stderr,
            excerpt=excerpt,
            extra=base.extra,
        )

    def close(self) -> None:
        if self._socket is not None:  # the socket owns the one descriptor
            self.child.child_fd = self.child.sink_fd = -1
            with contextlib.suppress(OSError):
                self._socket.close()
            return
        with contextlib.suppress(OSError):
            self.child.close()


def describe(pattern: str | re.Pattern[str]) -> str:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    return repr(text if len(text) < 80 else text[:77] + "...")
