"""Log in on a real system's serial getty, answering passphrase prompts on the way.

A distribution boots to ``<hostname> login: `` on the serial console (systemd starts
``serial-getty@ttyS0`` because the console is there). :func:`wait_for_login` waits for that
prompt as the boot's success (marks ``unlock:N``, ``login-prompt`` and ``PASS``), typing the
LUKS passphrase each time an initramfs asks for it: initramfs-tools' cryptroot ("Please unlock
disk root: ") and systemd's password agent in a dracut image ("Please enter passphrase for
disk ...: "). The failure table (:mod:`harness.vm.patterns`) is watched all along, so a refused
passphrase ends in TEST_FAIL with the generator's own line, not in a timeout: initramfs-tools
says "cryptsetup failed, bad password or options?" at once; systemd-cryptsetup asks again,
the harness types the same passphrase again (``tries``, systemd's default 3), and then
systemd prints "[FAILED] Failed to start systemd-cryptsetup@...". A prompt still coming after
``tries`` answers is a TEST_FAIL of its own.

:func:`login` then types the user name (and password, if the test gives one), waits for the
shell prompt and replaces the login shell by ``/bin/sh``: bash's line editor echoes what is
typed and brackets it with escape sequences, which the framed protocol of
:class:`~harness.vm.shell.GuestShell` does not need. The returned shell runs commands with
their exit status exactly as on our own init's shell.

Systemd stops writing status lines to the console once a getty holds it, so "Reached target
Multi-User System" is usually *not* on the console: the login prompt is the success line
(:data:`MULTI_USER` is there for consoles without a getty). ``systemctl is-system-running
--wait`` in the shell is the real check.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from harness.outcome import HarnessError, TestFailure
from harness.vm.console import ConsoleClosed, Mark
from harness.vm.guest import Guest
from harness.vm.shell import GuestShell

log = logging.getLogger(__name__)

# "bootharness login: " after a blank line; no newline after it.
LOGIN_PROMPT = r"(?:^|\n)[A-Za-z0-9][\w.-]* login: "
MULTI_USER = r"Reached target .{0,120}?Multi-User System"
# The success patterns of a distro boot (the login prompt: see the module doc).
SUCCESS_PATTERNS = (LOGIN_PROMPT,)
PASSPHRASE_PROMPTS = (
    r"Please unlock disk \S+: ",  # initramfs-tools (cryptroot's askpass)
    r"Please enter passphrase for disk [^\n]*?\): ",  # systemd-ask-password (dracut)
)
_SHELL_PROMPT = re.compile(r"[#$] ")
_PASSWORD = re.compile(r"Password: ")
_REFUSED = re.compile(r"Login incorrect")
SHELL = "/bin/sh"
DEFAULT_TRIES = 3  # systemd-cryptsetup's tries= default


def wait_for_login(
    vm: Guest,
    *,
    passphrase: str | None = None,
    tries: int = DEFAULT_TRIES,
    prompt: str = LOGIN_PROMPT,
    timeout: float | None = None,
) -> str:
    """Wait for the login prompt, typing ``passphrase`` at each passphrase prompt; the
    prompt's text. Marks ``PASS`` when it comes.

    Raises:
        TestFailure: a failure line (the table, or the test's own fail patterns), a
            passphrase prompt when no passphrase was given, or one more than ``tries``; the
            guest powered off first.
        KernelFault, BootTimeout, InfraError: as in every boot.
    """
    phase = "init"
    limit = vm.deadlines.of(phase) if timeout is None else timeout
    deadline = time.monotonic() + limit
    asks = "|".join(f"(?:{p})" for p in PASSPHRASE_PROMPTS)
    combined = re.compile(f"(?P<passphrase>{asks})|(?P<login>{prompt})")
    recorder = vm.machine.console.recorder
    typed = 0
    while True:
        remaining = max(deadline - time.monotonic(), 0.0)
        try:
            match = vm.console.expect(combined, phase=phase, timeout=remaining)
        except ConsoleClosed:
            raise _closed(vm, phase, "the login prompt") from None
        now = time.monotonic() - recorder.started
        text = match.group(0).strip()
        if match.group("login") is None:
            if passphrase is None:
                raise TestFailure(
                    f"the initramfs asks for a passphrase ({text!r}) and the test gave none",
                    vm.evidence(phase),
                )
            if typed >= tries:
                raise TestFailure(
                    f"the passphrase was refused {typed} times; asked again: {text!r}",
                    vm.evidence(phase),
                )
            typed += 1
            recorder.marks.append(Mark(f"unlock:{typed}", now, text[:120]))
            vm.console.sendline(passphrase)
            continue
        recorder.marks.append(Mark("login-prompt", now, text[:120]))
        recorder.marks.append(Mark("PASS", now))
        return text


def login(
    vm: Guest,
    *,
    user: str = "root",
    password: str | None = None,
    passphrase: str | None = None,
    tries: int = DEFAULT_TRIES,
    timeout: float | None = None,
) -> GuestShell:
    """Log in as ``user`` on the serial getty and return the attached guest shell.

    Waits for the login prompt first unless this boot already passed (see
    :func:`wait_for_login`, which gets ``passphrase`` and ``tries``).

    Raises:
        TestFailure: see :func:`wait_for_login`; the login was refused, or a password
            prompt came and the test gave no ``password``.
        KernelFault, BootTimeout, InfraError: as in every boot.
    """
    if not passed(vm):
        wait_for_login(vm, passphrase=passphrase, tries=tries, timeout=timeout)
    phase = "command"
    limit = vm.deadlines.of(phase) if timeout is None else timeout
    vm.console.sendline(user)
    deadline = time.monotonic() + limit
    while True:
        answer = _expect(vm, (_PASSWORD, _REFUSED, _SHELL_PROMPT), phase, deadline)
        if answer == 0:
            if password is None:
                raise TestFailure(
                    f"the getty asks {user}'s password and the test gave none", vm.evidence(phase)
                )
            vm.console.sendline(password)
            continue
        if answer == 1:
            raise TestFailure(f"the login of {user!r} was refused", vm.evidence(phase))
        break
    # Replace bash (line editing, bracketed paste) by a plain shell for the framed protocol.
    vm.console.sendline(f"exec {SHELL}")
    return GuestShell(vm)


def passed(vm: Guest) -> bool:
    """Whether the current boot has its PASS mark (the login prompt came)."""
    marks = vm.machine.console.recorder.marks
    last_banner = max((i for i, m in enumerate(marks) if m.name == "kernel-banner"), default=-1)
    return any(m.name == "PASS" for m in marks[last_banner + 1 :])


def _expect(vm: Guest, patterns: Sequence[re.Pattern[str]], phase: str, deadline: float) -> int:
    remaining = max(deadline - time.monotonic(), 0.0)
    combined = re.compile("|".join(f"(?P<p{i}>{p.pattern})" for i, p in enumerate(patterns)))
    try:
        match = vm.console.expect(combined, phase=phase, timeout=remaining)
    except ConsoleClosed:
        raise _closed(vm, phase, "the shell prompt") from None
    return next(i for i in range(len(patterns)) if match.group(f"p{i}") is not None)


def _closed(vm: Guest, phase: str, awaited: str) -> HarnessError:
    status = vm.machine.wait(5.0)
    if status != 0:
        return vm.machine.exited_error(f"exited during the {phase} phase")
    return TestFailure(
        f"the guest stopped during the {phase} phase before {awaited} "
        "(QEMU exited 0: power-off or reset without a kernel fault)",
        vm.evidence(phase),
    )


__all__ = (
    "LOGIN_PROMPT",
    "MULTI_USER",
    "PASSPHRASE_PROMPTS",
    "SUCCESS_PATTERNS",
    "login",
    "passed",
    "wait_for_login",
)
