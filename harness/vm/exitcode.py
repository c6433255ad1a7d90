"""Guest exit codes through QEMU's ``isa-debug-exit`` device.

With ``-device isa-debug-exit,iobase=0xf4,iosize=0x04`` (:data:`DEBUG_EXIT_DEVICE`), a byte
``v`` the guest writes to I/O port 0xf4 makes QEMU exit at once with status ``(v << 1) | 1``.
The default init does it with ``guest_exit CODE`` (usable in ``commands``) or
``after="exit-code"`` with ``exit_code=N``; a guest shell with
:meth:`harness.vm.shell.GuestShell.send_final` and :func:`guest_exit_line`. Both print the
nonce marker ``EXIT-CODE n`` first, then write the byte to ``/dev/port`` with busybox ``dd``.

QEMU's exit status alone is never a verdict: it means a guest code only when the
harness configured the device, and even then status 1 is both "guest code 0" and QEMU's own
error exit. So :func:`verdict` calls a run PASS only when the guest's nonce marker announced
code 0 *and* QEMU's status agrees; a non-zero code fails the test (TEST_FAIL) whether or not
a marker announced it, since reporting a failure can never hide one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from harness.outcome import BootTimeout, ConfigError, Evidence, InfraError, Outcome, TestFailure
from harness.vm.guest import Guest

log = logging.getLogger(__name__)

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_DEVICE = f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x04"
EXIT_MARKER = "EXIT-CODE"


class GuestExitError(TestFailure):
    """The guest ended the run with a non-zero exit code (TEST_FAIL); ``code`` holds it."""

    def __init__(self, message: str, evidence: Evidence, *, code: int) -> None:
        super().__init__(message, evidence)
        self.code = code


@dataclass(frozen=True)
class ExitVerdict:
    """What a QEMU exit status means for a run with the debug-exit device."""

    outcome: Outcome
    code: int | None  # the guest's code, None when the status does not carry one
    reason: str


def guest_exit_line(code: int, nonce: str) -> str:
    """A shell line that announces ``code`` with the nonce marker and writes it to the port.

    Raises:
        ValueError: ``code`` is not 0-255 (the device takes one byte).
    """
    _check_code(code)
    return (
        f"printf '[bootharness:%s] %s %d\\n' {nonce} {EXIT_MARKER} {code}; "
        f"printf '\\{code:03o}' | dd of=/dev/port bs=1 seek={DEBUG_EXIT_PORT} count=1 2>/dev/null"
    )


def _check_code(code: int) -> None:
    if not 0 <= code <= 255:
        raise ValueError(f"guest exit code {code} is outside 0-255 (one byte to the port)")


def verdict(status: int | None, announced: int | None) -> ExitVerdict:
    """Map QEMU's exit ``status`` and the code the guest ``announced`` (its nonce marker).

    Pure. ``status`` None means QEMU still runs; negative means it died of a signal.
    """
    if status is None:
        return ExitVerdict(Outcome.BOOT_TIMEOUT, None, "QEMU did not exit")
    if status < 0:
        return ExitVerdict(Outcome.INFRA_ERROR, None, f"QEMU was killed by signal {-status}")
    if status % 2 == 0:
        what = "powered off" if status == 0 else f"exit status {status}"
        return ExitVerdict(
            Outcome.TEST_FAIL if status == 0 else Outcome.INFRA_ERROR,
            None,
            f"QEMU exited without a guest exit code ({what})",
        )
    code = status >> 1
    if announced is not None and announced != code:
        return ExitVerdict(
            Outcome.INFRA_ERROR,
            code,
            f"the guest announced exit code {announced} but QEMU exited with status {status}",
        )
    if code != 0:
        note = "" if announced is not None else " (not announced by a marker)"
        return ExitVerdict(Outcome.TEST_FAIL, code, f"the guest exited with code {code}{note}")
    if announced is None:
        # Status 1 is also QEMU's own error exit: only the guest's marker makes it a PASS.
        return ExitVerdict(
            Outcome.INFRA_ERROR, None, "QEMU exited with status 1 and the guest announced no code"
        )
    return ExitVerdict(Outcome.PASS, 0, "the guest exited with code 0")


def has_debug_exit(vm: Guest) -> bool:
    devices = [*vm.spec.devices, *vm.spec.extra_args]
    return any(str(d).startswith("isa-debug-exit") for d in devices)


def wait_exit_code(vm: Guest, *, timeout: float | None = None, check: bool = True) -> int:
    """Wait for QEMU to exit and return the guest's exit code.

    ``timeout`` defaults to the ``shutdown`` deadline, counted from now.

    Raises:
        ConfigError: the VM has no isa-debug-exit device (add DEBUG_EXIT_DEVICE to devices).
        GuestExitError: with ``check``, a non-zero code (TEST_FAIL, ``.code`` holds it).
        TestFailure: the guest powered off without a code.
        BootTimeout: QEMU still runs at the deadline.
        InfraError: QEMU died, or its status contradicts the guest's marker.
        KernelFault: the kernel faulted before the end.
    """
    if not has_debug_exit(vm):
        raise ConfigError(
            "wait_exit_code: this VM has no isa-debug-exit device, so QEMU's exit status is no "
            f"verdict; boot it with devices=[harness.vm.exitcode.DEBUG_EXIT_DEVICE] "
            f"({DEBUG_EXIT_DEVICE!r})"
        )
    limit = vm.deadlines.of("shutdown") if timeout is None else timeout
    closed = vm.machine.console.drain(limit)
    if closed:  # the scanner takes no more text after a flush: only at the very end
        vm.machine.console.recorder.scanner.flush()
    vm.check_faults("shutdown")
    status = vm.machine.wait(5.0) if closed else None
    result = verdict(status, _announced(vm))
    log.info("guest exit: status %s -> %s", status, result)
    evidence = vm.evidence("shutdown")
    if result.outcome is Outcome.PASS:
        return 0
    if result.outcome is Outcome.TEST_FAIL and result.code is not None:
        if check:
            raise GuestExitError(result.reason, evidence, code=result.code)
        return result.code
    if result.outcome is Outcome.TEST_FAIL:
        raise TestFailure(result.reason, evidence)
    if result.outcome is Outcome.BOOT_TIMEOUT:
        raise BootTimeout(f"{result.reason} while waiting for the guest's exit code", evidence)
    raise InfraError(result.reason, evidence)


def _announced(vm: Guest) -> int | None:
    marks = [m for m in vm.machine.console.recorder.marks if m.name == EXIT_MARKER]
    if not marks:
        return None
    try:
        return int(marks[-1].detail.split()[0])
    except (ValueError, IndexError):
        return None


__all__: Sequence[str] = (
    "DEBUG_EXIT_DEVICE",
    "ExitVerdict",
    "GuestExitError",
    "guest_exit_line",
    "verdict",
    "wait_exit_code",
)
