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
import re
import socket
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import pexpect
import pexpect.fdpexpect

from harness.outcome import BootTimeout, Evidence, KernelFault, TestFailure
from harness.vm import faults
from harness.vm.patterns import LineWatcher

log = logging.getLogger(__name__)

MARKER_PREFIX = "[bootharness:"
_BANNER = re.compile(r"Linux version \S+")
# How long to keep reading after a fault so the excerpt holds the whole trace.
FAULT_GRACE = 0.5
# How long to keep reading after a failure pattern matched: a kernel fault that follows it
# (the panic after "VFS: Unable to mount root fs") wins, and the evidence gets what follows.
FAILURE_GRACE = 1.0
_POLL = 0.05


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
    marks: list[Mark] = field(default_factory=list)
    scanner: faults.FaultScanner = field(init=False)
    # Failure patterns and kernel phase marks, for inits without markers (harness.vm.patterns).
    watcher: LineWatcher | None = None
    _chunks: list[str] = field(default_factory=list)
    _partial: str = ""

    def __post_init__(self, expected_boots: int) -> None:
        # The scanner alone counts boots: a reset on purpose announces one more to it.
        self.scanner = faults.FaultScanner(expected_boots=expected_boots)

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
        if MARKER_PREFIX in line:
            marker = parse_marker(line, self.nonce)
            if marker is not None:
                self.marks.append(Mark(marker[0], now, marker[1]))
        elif "Linux version" in line and _BANNER.search(line):
            self.marks.append(Mark("kernel-banner", now))

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
        """Faults at error level or worse: these make a boot a KERNEL_FAULT."""
        return [f for f in self.scanner.faults if f.severity >= faults.Severity.ERROR]


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


class Console:
    """The guest's first serial port, read and written through pexpect."""

    def __init__(
        self,
        sock: socket.socket,
        recorder: ConsoleRecorder,
        *,
        log_path: Path,
        external_fault: Callable[[], str | None] = lambda: None,
        evidence: Callable[[], Evidence] = Evidence,
    ) -> None:
        self._sock = sock
        self.recorder = recorder
        self.log_path = log_path
        self._external_fault = external_fault
        self._evidence = evidence
        self.child = pexpect.fdpexpect.fdspawn(
            sock, encoding="utf-8", codec_errors="replace", timeout=None
        )
        self.child.delaybeforesend = None  # pexpect sleeps 50 ms before each send by default
        self.child.logfile_read = recorder
        self._closed = False  # the console reached end of file

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
        self.recorder.scanner.flush()
        serious = self.recorder.serious_faults()
        text = self.recorder.text
        if serious:
            worst = max(serious, key=lambda f: f.severity)
            summary = f"kernel fault: {worst.name}: {worst.line.strip()}"
            snippet = faults.excerpt(text, worst.offset)
        else:
            summary = f"kernel fault reported by QEMU: {external}"
            snippet = ""
        if external is not None and serious:
            summary += f" (QEMU also reported {external})"
        evidence = self._with(phase, timeout, excerpt=snippet)
        raise KernelFault(summary, evidence)

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
        with contextlib.suppress(OSError):
            self._sock.close()


def describe(pattern: str | re.Pattern[str]) -> str:
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    return repr(text if len(text) < 80 else text[:77] + "...")
