"""The outcome taxonomy and the typed errors that carry a boot's evidence.

Every boot ends in exactly one :class:`Outcome`. pytest, the CLI's exit code, junit and
bisect all map from it, so the mapping lives here and nowhere else (see docs/architecture.md).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class Outcome(enum.Enum):
    """How one boot ended."""

    PASS = "pass"
    TEST_FAIL = "test-fail"
    BOOT_TIMEOUT = "boot-timeout"
    KERNEL_FAULT = "kernel-fault"
    INFRA_ERROR = "infra-error"
    CONFIG_ERROR = "config-error"

    @property
    def cli_exit(self) -> int:
        """Exit code of the ``bootharness`` command for this outcome."""
        return _CLI_EXIT[self]

    @property
    def bisect_code(self) -> int:
        """Exit code for ``git bisect run``: 0 good, 1 bad, 125 skip, 128 abort."""
        return _BISECT_CODE[self]

    @property
    def retryable(self) -> bool:
        """Only infrastructure failures may be retried; a verdict on the guest never is."""
        return self is Outcome.INFRA_ERROR


_CLI_EXIT = {
    Outcome.PASS: 0,
    Outcome.TEST_FAIL: 1,
    Outcome.KERNEL_FAULT: 2,
    Outcome.BOOT_TIMEOUT: 3,
    Outcome.INFRA_ERROR: 4,
    Outcome.CONFIG_ERROR: 5,
}
_BISECT_CODE = {
    Outcome.PASS: 0,
    Outcome.TEST_FAIL: 1,
    Outcome.KERNEL_FAULT: 1,
    Outcome.BOOT_TIMEOUT: 1,
    Outcome.INFRA_ERROR: 125,
    Outcome.CONFIG_ERROR: 128,
}


@dataclass(frozen=True)
class Evidence:
    """What a person needs to understand a failed boot without re-running it."""

    phase: str = ""
    deadline: float | None = None
    console_tail: str = ""
    log_path: Path | None = None
    argv: Sequence[str] = ()
    stderr: str = ""
    excerpt: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    trace: str = ""  # the fault's stack trace symbolised (file:line or symbol+offset)

    def render(self) -> str:
        """A multi-line human-readable form, for error messages and pytest reports."""
        lines: list[str] = []
        if self.phase:
            deadline = f" (deadline {self.deadline:.1f} s)" if self.deadline is not None else ""
            lines.append(f"phase: {self.phase}{deadline}")
        if self.log_path is not None:
            lines.append(f"console log: {self.log_path}")
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        if self.argv:
            lines.append("qemu command: " + " ".join(self.argv))
        if self.stderr.strip():
            lines.append("qemu stderr:\n" + _indent(self.stderr.strip()))
        if self.excerpt.strip():
            lines.append("fault excerpt:\n" + _indent(self.excerpt.rstrip()))
        if self.trace.strip():
            lines.append("symbolised trace:\n" + _indent(self.trace.rstrip()))
        if self.console_tail.strip():
            lines.append("console tail:\n" + _indent(self.console_tail.rstrip()))
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


class HarnessError(Exception):
    """Base of every error the harness raises on purpose; carries an outcome."""

    outcome: Outcome = Outcome.INFRA_ERROR

    def __init__(self, message: str, evidence: Evidence | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.evidence = evidence or Evidence()

    def __str__(self) -> str:
        details = self.evidence.render()
        return f"{self.message}\n{details}" if details else self.message


class ConfigError(HarnessError):
    """Bad input: kernels.toml, a template, a missing kernel file. Never retried."""

    outcome = Outcome.CONFIG_ERROR


class InfraError(HarnessError):
    """QEMU would not start or crashed, QMP never came up, a tool is missing. Retryable."""

    outcome = Outcome.INFRA_ERROR


class MissingToolError(InfraError):
    """A host program is missing; the message names the Debian package that provides it."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"required program {tool!r} was not found on PATH; "
            f"install it with: apt-get install {package}"
        )
        self.tool = tool
        self.package = package


class BootFailure(HarnessError):
    """The guest ran but did not reach its success marker; subclasses name how."""


class TestFailure(BootFailure):
    """The guest ran and a check in it (or an assertion on it) failed."""

    __test__ = False  # not a pytest test class, despite the name
    outcome = Outcome.TEST_FAIL


class KernelFault(BootFailure):
    """Panic, oops, BUG, or init died. Wins over every other outcome of the same boot."""

    outcome = Outcome.KERNEL_FAULT


class BootTimeout(BootFailure):
    """No progress before the phase deadline while QEMU was still alive."""

    outcome = Outcome.BOOT_TIMEOUT
