"""A shell in the guest, driven over the serial console: run a command, get its output and status.

The init template's ``after="shell"`` starts ``setsid cttyhack sh`` on the console after the
PASS marker. :class:`GuestShell` talks to that shell the way labgrid does, with random markers,
but made robust against what a serial console does to text:

* **Kernel messages land anywhere.** printk writes straight to the UART, so a message can
  appear in the middle of a line the shell is printing. The command's output is therefore not
  printed raw: it goes to a file in the guest and comes back **base64-encoded** between two
  markers, with its status and byte count. On the host, complete printk records
  (``[    1.234567] ...`` up to the end of their line) are cut out of the framed text, which
  rejoins any line they split; base64 has no ``[``, so nothing of the output can be mistaken
  for a record, and output that itself looks like kernel messages (``dmesg``) comes back
  intact. Anything else that lands in the frame (a background program writing to the
  console) breaks the base64 or the byte count and raises :class:`FrameError` instead of
  returning wrong output. The console log level is also lowered while the shell is attached
  (``console_loglevel``, default 5: routine driver chatter off, warnings and oopses still on
  the console so the fault scanner sees them).
* **Input sent before the shell is ready.** Attaching waits for a first round trip: a line
  that prints a fresh marker, resent (after Ctrl-C, which drops a half-read or half-quoted
  line) with a new marker until one answers, within a deadline. The first line also turns
  the terminal's echo off, so later commands are not echoed back.
* **Commands that hang.** Every command has a deadline (``Deadlines.command`` times the
  multiplier unless given). At the deadline the shell gets Ctrl-C and must answer a fresh
  marker; then :class:`CommandTimeout` says the VM is still usable. If it does not answer
  (the command ignores SIGINT), the VM is stopped and the error says so.

The command runs in the shell itself (``eval``), so ``cd`` and variables persist between
commands; its stdin is ``/dev/null`` and its stderr goes with its stdout. It must not
``exit`` the shell: that shell is PID 1, and the kernel panics when it exits.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from harness.outcome import BootTimeout, Evidence, HarnessError, InfraError, TestFailure
from harness.vm.console import ConsoleClosed
from harness.vm.exitcode import guest_exit_line
from harness.vm.faults import PRINTK_PREFIX
from harness.vm.guest import Guest

log = logging.getLogger(__name__)

PHASE = "command"
# ash reads a line of at most 1024 bytes once echo is off (it then uses fgets): keep every
# line we type well below that, and send long commands in pieces.
CHUNK = 600
DEFAULT_CONSOLE_LOGLEVEL = 5
# How long Ctrl-C and a fresh marker may take before a timed-out VM is given up.
RESYNC_TIMEOUT = 10.0
# First wait for a sync answer; doubled on every retry.
FIRST_SYNC_WAIT = 0.5
ATTACH_TIMEOUT = 30.0
CTRL_C = "\x03"

# A complete printk record as the serial console shows it: prefix, text, end of line.
_PRINTK_RECORD = re.compile(PRINTK_PREFIX + r"[^\n]*\n")
_LINE = re.compile(r"\n")


class GuestShellError(BootTimeout):
    """No guest shell answered before the deadline (BOOT_TIMEOUT)."""


class FrameError(InfraError):
    """A command's framed output was corrupted on the console (foreign text inside it)."""


class CommandTimeout(BootTimeout):
    """A guest command did not finish before its deadline.

    ``vm_usable`` tells whether the shell answered again after Ctrl-C (True) or the VM was
    stopped (False).
    """

    def __init__(self, message: str, evidence: Evidence, *, command: str, vm_usable: bool) -> None:
        super().__init__(message, evidence)
        self.command = command
        self.vm_usable = vm_usable


class CommandFailed(TestFailure):
    """:meth:`GuestShell.check` saw a non-zero exit status."""

    def __init__(self, message: str, evidence: Evidence, *, result: Result) -> None:
        super().__init__(message, evidence)
        self.result = result


@dataclass(frozen=True)
class Result:
    """What one guest command did: its output (stdout and stderr together) and exit status."""

    command: str
    output: str
    status: int
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 0


# --- the wire format, pure -------------------------------------------------------------


def new_token() -> str:
    """A marker token no guest output can guess: 16 hex digits."""
    return secrets.token_hex(8)


def marker(token: str) -> str:
    return f"==BH{token}"


def sync_line(token: str, *, console_loglevel: int | None) -> str:
    """The line that turns echo off, clears the prompts and prints the sync marker.

    The marker is printed from two arguments, so an echo of the typed line never holds it.
    The line holds no double quote: a stray unclosed ``"`` typed earlier keeps swallowing
    lines until Ctrl-C clears it, and the retry sends one.
    """
    parts = ["stty -echo 2>/dev/null", "PS1=", "PS2="]
    if console_loglevel is not None:
        parts.append(f"echo {int(console_loglevel)} >/proc/sys/kernel/printk")
    parts.append(
        "for __bh_d in /run /tmp /dev/shm /; do __bh_out=$__bh_d/.bh-out.$$; "
        ": >$__bh_out 2>/dev/null && break; done"
    )
    parts.append(f"printf '%s:S==\\n' '{marker(token)}'")
    return "; ".join(parts)


def sync_tag(token: str) -> str:
    """What the guest prints when the sync line of ``token`` ran."""
    return f"{marker(token)}:S==\n"


def command_lines(command: str, token: str, *, chunk: int = CHUNK) -> list[str]:
    """The lines to type to run ``command`` framed by ``token``'s markers.

    The command travels base64-encoded, so no quoting, line editing or tty special character
    can change it; a long one is written to a file in pieces first.
    """
    encoded = base64.b64encode(command.encode()).decode("ascii")
    lines: list[str] = []
    if len(encoded) <= chunk:
        source = f"printf %s {encoded} | base64 -d"
    else:
        lines.append(": >$__bh_out.cmd")
        for start in range(0, len(encoded), chunk):
            lines.append(f"printf %s {encoded[start : start + chunk]} >>$__bh_out.cmd")
        source = "base64 -d $__bh_out.cmd"
    begin = f"printf '%s:B==\\n' '{marker(token)}'"
    run = f'{{ eval "$({source})"; }} </dev/null >$__bh_out 2>&1; __bh_s=$?'
    send = "base64 $__bh_out"
    end = (
        f"printf '%s:E %d %d==\\n' '{marker(token)}' $__bh_s "
        "$(wc -c <$__bh_out); rm -f $__bh_out.cmd"
    )
    lines.append("; ".join((begin, run, send, end)))
    return lines


def strip_printk(text: str) -> str:
    """``text`` without complete kernel records; a record that split a line rejoins it."""
    return _PRINTK_RECORD.sub("", text)


def clean(text: str) -> str:
    """Console text as the framing reads it: no kernel records, no carriage returns."""
    return strip_printk(text.replace("\r", ""))


@dataclass(frozen=True)
class Frame:
    status: int
    output: bytes


def parse_frame(text: str, token: str) -> Frame | None:
    """The framed result for ``token`` in cleaned console ``text``, or None if not complete.

    Raises:
        FrameError: the frame is there but its body is not the base64 of exactly the
            announced number of bytes (foreign text landed inside it).
    """
    tag = re.escape(marker(token))
    match = re.search(
        tag + r":B==\n(?P<body>[\s\S]*?)" + tag + r":E (?P<status>\d+) (?P<size>\d+)==\n", text
    )
    if match is None:
        return None
    body = match.group("body")
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    # busybox base64 wraps at 76 columns: every line but the last is full.
    if any(len(line) != 76 for line in lines[:-1]) or (lines and not lines[-1]):
        raise FrameError(f"guest output frame has foreign text in it: {body[:200]!r}")
    try:
        data = base64.b64decode("".join(lines), validate=True)
    except (binascii.Error, ValueError) as error:
        raise FrameError(f"guest output frame is not base64 ({error}): {body[:200]!r}") from None
    size = int(match.group("size"))
    if len(data) != size:
        raise FrameError(f"guest output frame holds {len(data)} bytes, the guest sent {size}")
    return Frame(int(match.group("status")), data)


# --- the driver ------------------------------------------------------------------------


class GuestShell:
    """A shell on the guest's serial console. Creating one attaches to it (see module doc).

    ``console_loglevel`` is written to /proc/sys/kernel/printk on attach (None: leave it);
    ``attach_timeout`` bounds the first round trip, ``resync_timeout`` the one after a
    timed-out command (defaults scale with the deadlines' multiplier).

    Raises (from the constructor):
        TestFailure: the init failed (FAIL/RESCUE marker) before its shell started.
        GuestShellError: no shell answered before the deadline (did the init run with
            ``after="shell"``?).
        TestFailure, InfraError: QEMU exited first (status 0, or another).
        KernelFault: the kernel faulted meanwhile.
    """

    def __init__(
        self,
        vm: Guest,
        *,
        console_loglevel: int | None = DEFAULT_CONSOLE_LOGLEVEL,
        attach_timeout: float | None = None,
        resync_timeout: float | None = None,
    ) -> None:
        self.vm = vm
        self.console_loglevel = console_loglevel
        self.resync_timeout = (
            RESYNC_TIMEOUT * vm.deadlines.multiplier if resync_timeout is None else resync_timeout
        )
        self.sync_attempts = 0
        self.boot = 0
        multiplier = vm.deadlines.multiplier
        self.attach(ATTACH_TIMEOUT * multiplier if attach_timeout is None else attach_timeout)

    # -- public API

    def run(self, command: str, timeout: float | None = None) -> Result:
        """Run ``command`` in the guest shell; its output and exit status.

        Raises:
            CommandTimeout: no result before the deadline (``timeout`` s, by default the
                ``command`` deadline); the VM was then resynced or stopped (see the error).
            FrameError: the framed output was corrupted on the console.
            KernelFault: the kernel faulted while the command ran.
            TestFailure: the guest powered off while the command ran (QEMU exited 0).
            InfraError: QEMU died while the command ran.
        """
        self._follow_reboot()
        limit = self.vm.deadlines.of(PHASE) if timeout is None else timeout
        token = new_token()
        started = time.monotonic()
        deadline = started + limit
        for line in command_lines(command, token):
            self.vm.console.sendline(line)
        try:
            text = self._read_until(f"{marker(token)}:E ", deadline, then_line=True)
        except BootTimeout:
            raise self._timed_out(command, limit) from None
        frame = parse_frame(text, token)
        if frame is None:  # the end marker came without its begin marker
            raise FrameError(f"guest output frame for {command!r} lost its begin marker")
        output = frame.output.decode("utf-8", errors="replace")
        result = Result(command, output, frame.status, time.monotonic() - started)
        log.debug("guest: %r -> %d (%.2f s)", command, frame.status, result.duration)
        return result

    def check(self, command: str, timeout: float | None = None) -> str:
        """Run ``command``; its output. Raises CommandFailed (TEST_FAIL) on a non-zero status,
        and whatever :meth:`run` raises."""
        result = self.run(command, timeout)
        if not result.ok:
            raise CommandFailed(
                f"guest command {command!r} exited {result.status}: "
                f"{_shorten(result.output.strip())}",
                self._evidence(),
                result=result,
            )
        return result.output

    def wait_until(self, command: str, timeout: float, interval: float = 0.1) -> Result:
        """Re-run ``command`` until it exits 0 (a condition in the guest); the last result.

        Raises:
            TestFailure: still failing at the deadline (with its last output).
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(command, timeout=max(deadline - time.monotonic(), 1.0))
            if result.ok:
                return result
            if time.monotonic() + interval > deadline:
                raise TestFailure(
                    f"guest condition {command!r} still failed after {timeout:.1f} s "
                    f"(status {result.status}): {_shorten(result.output.strip())}",
                    self._evidence(),
                )
            time.sleep(interval)  # poll interval of a deadline-bounded wait

    def send_final(self, line: str) -> None:
        """Type a line that ends the run (power-off, reset, exit code): no answer is awaited."""
        self.vm.console.sendline(line)

    def exit_with(self, code: int) -> None:
        """End the run with guest exit ``code`` (isa-debug-exit; see harness.vm.exitcode).

        Collect it with ``vm.wait_exit_code()``. Raises ValueError for a code outside 0-255.
        """
        self.send_final(guest_exit_line(code, self.vm.nonce))

    def attach(self, timeout: float) -> None:
        """Wait for the init's PASS marker (if not seen yet), then for a first round trip."""
        if not self._passed_in_current_boot():
            self.vm.expect_pass()
        self.boot = self._boots()
        if not self._sync(time.monotonic() + timeout, interrupt_first=False):
            raise GuestShellError(
                f"the guest shell did not answer within {timeout:.1f} s "
                f"({self.sync_attempts} attempts; does the init run with after='shell'?)",
                self._evidence(timeout),
            )

    # -- internals

    def _boots(self) -> int:
        return self.vm.machine.console.recorder.scanner.boots

    def _passed_in_current_boot(self) -> bool:
        marks = self.vm.machine.console.recorder.marks
        last_banner = max((i for i, m in enumerate(marks) if m.name == "kernel-banner"), default=-1)
        return any(m.name == "PASS" for m in marks[last_banner + 1 :])

    def _follow_reboot(self) -> None:
        # After a reset the test asked for, the new boot's shell needs its own round trip.
        if self._boots() != self.boot:
            self.attach(ATTACH_TIMEOUT * self.vm.deadlines.multiplier)

    def _sync(self, deadline: float, *, interrupt_first: bool) -> bool:
        wait = FIRST_SYNC_WAIT
        first = True
        while (remaining := deadline - time.monotonic()) > 0:
            token = new_token()
            self.sync_attempts += 1
            if interrupt_first or not first:
                # Ctrl-C drops a half-typed line, a pending quote or a hung foreground job.
                self.vm.console.send(CTRL_C)
            first = False
            self.vm.console.sendline(sync_line(token, console_loglevel=self.console_loglevel))
            if self._wait_for(sync_tag(token), min(wait, remaining)):
                return True
            wait *= 2
        return False

    def _wait_for(self, tag: str, timeout: float) -> bool:
        try:
            self._read_until(tag, time.monotonic() + timeout)
        except BootTimeout:
            return False
        return True

    def _read_until(self, tag: str, deadline: float, *, then_line: bool = False) -> str:
        """Cleaned console text up to and including ``tag`` (and the rest of its line).

        Lines are cleaned one by one: a kernel record ends at the end of its physical line,
        so cleaning each line and joining them equals cleaning the whole text, in linear time.
        """
        cleaned = ""
        while True:
            searched_from = max(len(cleaned) - len(tag), 0)
            cleaned += clean(self._read_line(deadline))
            found = cleaned.find(tag, searched_from)
            if found < 0:
                continue
            if not then_line:
                return cleaned
            while "\n" not in cleaned[found:]:
                cleaned += clean(self._read_line(deadline))
            return cleaned

    def _read_line(self, deadline: float) -> str:
        """The console's next line (with its newline); BootTimeout at the deadline."""
        console = self.vm.console
        try:
            console.expect(_LINE, phase=PHASE, timeout=max(deadline - time.monotonic(), 0.0))
        except ConsoleClosed:
            raise self._closed_error() from None
        before = console.child.before
        return (before if isinstance(before, str) else "") + "\n"

    def _closed_error(self) -> HarnessError:
        machine = self.vm.machine
        status = machine.wait(5.0)
        if status != 0:
            return machine.exited_error("exited while the guest shell was in use")
        return TestFailure(
            "the guest stopped while the harness talked to its shell "
            "(QEMU exited 0: power-off or reset without a kernel fault)",
            self._evidence(),
        )

    def _timed_out(self, command: str, limit: float) -> CommandTimeout:
        evidence = self._evidence(limit)
        resync = self.resync_timeout
        usable = self._sync(time.monotonic() + resync, interrupt_first=True)
        if usable:
            what = "interrupted with Ctrl-C; the shell answered again, the VM is still usable"
        else:
            what = f"the shell did not answer Ctrl-C within {resync:.1f} s; the VM was stopped"
            self.vm.stop()
        log.warning("guest command %r timed out: %s", command, what)
        return CommandTimeout(
            f"guest command {command!r} did not finish within {limit:.1f} s; {what}",
            evidence,
            command=command,
            vm_usable=usable,
        )

    def _evidence(self, deadline: float | None = None) -> Evidence:
        machine = self.vm.machine
        return Evidence(
            phase=PHASE,
            deadline=deadline,
            console_tail=machine.console.recorder.tail(),
            log_path=machine.console_log,
            argv=machine.argv,
            stderr=machine.stderr_text(),
        )


def _shorten(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__: Sequence[str] = (
    "CommandFailed",
    "CommandTimeout",
    "FrameError",
    "GuestShell",
    "GuestShellError",
    "Result",
)
