"""The kernel warnings policy: what a WARN, a lockdep splat or a stall does to a test.

Kernel warnings are faults of their own class (severity WARNING in :mod:`harness.vm.faults`):
``WARNING:`` blocks (``WARN_ON``), lockdep reports, "BUG: sleeping function called from
invalid context", RCU stalls and hung tasks. The kernel goes on after them, so they are not
a KERNEL_FAULT by themselves; what they do is the run's choice:

* ``report`` (the default): the boot's outcome is unchanged; each warning is listed on the
  test, in every report and in the junit property ``kernel_warnings``;
* ``fail``: a warning fails the boot as a KERNEL_FAULT, as an oops would;
* ``ignore``: warnings are neither listed nor judged.

An allowlist (a TOML file of ``[[warning]]`` tables with a ``regex`` and a ``reason``) names
known warnings: an allowed warning never fails a boot and is listed apart, so a nightly run
with ``fail`` fails on new warnings only. A regex is searched in the warning's whole report
(its line, registers and call trace), so it may name the function that warned.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.outcome import ConfigError
from harness.vm.faults import Fault, Severity

FAIL, REPORT, IGNORE = "fail", "report", "ignore"
MODES = (FAIL, REPORT, IGNORE)
DEFAULT_MODE = REPORT
_EXAMPLE = '[[warning]]\nregex = "lkdtm_WARNING"\nreason = "provoked on purpose by a test"'


@dataclass(frozen=True)
class Allowed:
    """One allowlist entry: warnings whose report matches ``regex`` are known."""

    regex: str
    reason: str

    def matches(self, fault: Fault) -> bool:
        return re.search(self.regex, fault.excerpt or fault.line, re.M) is not None


@dataclass(frozen=True)
class WarningPolicy:
    """What kernel warnings do to a boot (see the module docstring)."""

    mode: str = DEFAULT_MODE
    allowlist: tuple[Allowed, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"kernel warnings policy {self.mode!r}: use one of {', '.join(MODES)}"
            )

    def allowed_by(self, fault: Fault) -> Allowed | None:
        """The allowlist entry that knows ``fault``, if any."""
        return next((entry for entry in self.allowlist if entry.matches(fault)), None)

    def reported(self, faults: Iterable[Fault]) -> list[Fault]:
        """The warnings to list: every warning not on the allowlist (none under ``ignore``)."""
        if self.mode == IGNORE:
            return []
        return [f for f in warnings_of(faults) if self.allowed_by(f) is None]

    def known(self, faults: Iterable[Fault]) -> list[tuple[Fault, Allowed]]:
        """The warnings the allowlist knows, each with its entry (none under ``ignore``)."""
        if self.mode == IGNORE:
            return []
        pairs = []
        for fault in warnings_of(faults):
            entry = self.allowed_by(fault)
            if entry is not None:
                pairs.append((fault, entry))
        return pairs

    def failing(self, faults: Iterable[Fault]) -> list[Fault]:
        """The warnings that fail the boot: the reported ones, under ``fail`` only."""
        return self.reported(faults) if self.mode == FAIL else []


def warnings_of(faults: Iterable[Fault]) -> list[Fault]:
    return [f for f in faults if f.severity is Severity.WARNING]


def summary(fault: Fault) -> str:
    """A warning's line without the printk time stamp: what lists and junit show."""
    return re.sub(r"^.*?\[ *\d+\.\d{6}\](?:\[ *[TC]\d+\])? ?", "", fault.line).strip()


def load_allowlist(path: Path) -> tuple[Allowed, ...]:
    """Read an allowlist file.

    Raises:
        ConfigError: the file is unreadable, not TOML, or an entry has no valid ``regex``
            or no ``reason``; every problem is named.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"kernel warnings allowlist {path}: cannot read it: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"kernel warnings allowlist {path}: invalid TOML: {error}") from None
    entries = data.get("warning", [])
    problems: list[str] = []
    unknown = sorted(set(data) - {"warning"})
    if unknown:
        problems.append(f"unknown top-level keys {unknown}; write entries as:\n{_EXAMPLE}")
    if not isinstance(entries, list):
        problems.append(f"'warning' must be an array of tables; write:\n{_EXAMPLE}")
        entries = []
    allowed = []
    for number, entry in enumerate(entries, 1):
        where = f"entry {number}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not a table")
            continue
        regex, reason = entry.get("regex"), entry.get("reason")
        extra = sorted(set(entry) - {"regex", "reason"})
        if extra:
            problems.append(f"{where}: unknown keys {extra} (only regex and reason)")
        if not isinstance(regex, str) or not regex:
            problems.append(f"{where}: regex must be a non-empty string")
            continue
        try:
            re.compile(regex)
        except re.error as error:
            problems.append(f"{where}: regex {regex!r} does not compile: {error}")
            continue
        if not isinstance(reason, str) or not reason.strip():
            problems.append(f"{where}: reason must say why the warning {regex!r} is known")
            continue
        allowed.append(Allowed(regex, reason.strip()))
    if problems:
        raise ConfigError(
            f"kernel warnings allowlist {path}: " + "; ".join(problems).replace("\n", " ")
        )
    return tuple(allowed)


def policy(mode: str = DEFAULT_MODE, allowlist: Sequence[Path] = ()) -> WarningPolicy:
    """The policy for ``mode`` with the entries of every allowlist file.

    Raises:
        ConfigError: a bad mode or allowlist file.
    """
    entries: list[Allowed] = []
    for path in allowlist:
        entries += load_allowlist(path)
    return WarningPolicy(mode, tuple(entries))
