"""Find the first bad candidate in an ordered list, with as few verdicts as the math allows.

The algorithm is pure: it knows candidates only by name and asks an *oracle* for a verdict on
each. It first verifies both ends (the good end must be good, the bad end bad), then halves the
range between the last good and the first bad candidate: about ``log2(n)`` more verdicts.

Outcomes map to verdicts as in docs/architecture.md (:attr:`Outcome.bisect_code`): PASS is good;
TEST_FAIL, KERNEL_FAULT and BOOT_TIMEOUT are bad; INFRA_ERROR means the candidate could not
be judged, so it is *skipped* (never called bad) and a neighbour is probed instead, like
``git bisect skip``; CONFIG_ERROR aborts the bisection. When skipped candidates sit between
the last good and the first bad one, the answer is a range (:attr:`Status.AMBIGUOUS`).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.outcome import HarnessError, Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """What an oracle says about one candidate."""

    outcome: Outcome
    log_path: Path | None = None  # the console log (or other evidence) of the verdict
    message: str = ""
    cached: bool = False  # True when the verdict came from the verdict cache, not a boot


class Verdict(enum.Enum):
    """What an outcome means to a bisection."""

    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"
    ABORT = "abort"

    @classmethod
    def of(cls, outcome: Outcome) -> Verdict:
        code = outcome.bisect_code
        if code == 0:
            return cls.GOOD
        if code == 125:
            return cls.SKIP
        if code >= 128:
            return cls.ABORT
        return cls.BAD


@dataclass(frozen=True)
class Step:
    """One verdict of a bisection: the candidate, what the oracle said, and how long it took."""

    candidate: str
    observation: Observation
    seconds: float
    role: str = "middle"  # "good end", "bad end" or "middle"

    @property
    def outcome(self) -> Outcome:
        return self.observation.outcome

    @property
    def verdict(self) -> Verdict:
        return Verdict.of(self.observation.outcome)

    def render(self) -> str:
        """One log line: candidate, outcome, seconds, cached or booted."""
        if self.observation.cached:
            how = "cached"
        else:  # an INFRA_ERROR was an attempt: QEMU may never have started
            how = "attempted" if self.verdict is Verdict.SKIP else "booted"
        line = (
            f"{self.candidate}: {self.outcome.name} -> {self.verdict.value} "
            f"({self.seconds:.1f} s, {how}, {self.role})"
        )
        if self.observation.message and self.verdict is not Verdict.GOOD:
            reason = self.observation.message.splitlines()[0]
            line += ": " + (reason if len(reason) <= 120 else reason[:117] + "...")
        return line


class Status(enum.Enum):
    """How a bisection ended; each has the exit code of ``bootharness bisect``."""

    FOUND = 0  # first bad and last good are adjacent among the testable candidates
    AMBIGUOUS = 1  # skipped candidates left a range that holds the first bad one
    ENDS_DISAGREE = 2  # the good end is bad, or the bad end is good: nothing to bisect
    UNTESTABLE_END = 4  # an end could not be judged (INFRA_ERROR), as the CLI's infra exit
    ABORTED = 5  # a CONFIG_ERROR: the oracle itself is wrong, as the CLI's usage exit

    @property
    def exit_code(self) -> int:
        return self.value


@dataclass
class BisectResult:
    """The answer of a bisection and every step that led to it."""

    status: Status
    candidates: tuple[str, ...]
    steps: list[Step] = field(default_factory=list)
    last_good: str | None = None
    first_bad: str | None = None
    # The candidates that may be the first bad one: just first_bad when FOUND; with skips,
    # the skipped candidates after last_good and then first_bad.
    suspects: tuple[str, ...] = ()
    message: str = ""

    @property
    def boots(self) -> int:
        """How many verdicts were not taken from the cache (boots and attempts)."""
        return sum(1 for step in self.steps if not step.observation.cached)

    @property
    def cached(self) -> int:
        """How many verdicts came from the verdict cache."""
        return len(self.steps) - self.boots

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(s.candidate for s in self.steps if s.verdict is Verdict.SKIP)

    def step_of(self, candidate: str | None) -> Step | None:
        """The last step that judged ``candidate``."""
        return next((s for s in reversed(self.steps) if s.candidate == candidate), None)

    def render(self) -> str:
        """The summary lines printed at the end of a bisection."""
        lines = [f"status:      {self.status.name}" + (f": {self.message}" if self.message else "")]
        if self.first_bad is not None:
            lines.append(f"first bad:   {self.first_bad}")
        if self.status is Status.AMBIGUOUS:
            lines.append("could be:    " + ", ".join(self.suspects))
        if self.last_good is not None:
            lines.append(f"last good:   {self.last_good}")
        bad = self.step_of(self.first_bad)
        if bad is not None and bad.observation.log_path is not None:
            lines.append(f"failing log: {bad.observation.log_path}")
        if self.skipped:
            lines.append("skipped:     " + ", ".join(self.skipped))
        lines.append(f"verdicts:    {len(self.steps)} ({self.cached} from the cache)")
        return "\n".join(lines)


Oracle = Callable[[str], Observation]


class _Stop(Exception):
    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bisect(
    candidates: Sequence[str],
    oracle: Oracle,
    *,
    end_retries: int = 1,
    on_step: Callable[[Step], None] | None = None,
) -> BisectResult:
    """Find the first bad candidate; ``candidates`` run from the good end to the bad end.

    ``oracle(candidate)`` returns an :class:`Observation`, or raises a
    :class:`~harness.outcome.HarnessError`, which counts as that error's outcome. Any other
    exception is a harness bug and propagates. An INFRA_ERROR at an end is retried up to
    ``end_retries`` times (only INFRA_ERROR may be retried); an end can't be skipped.
    ``on_step`` sees each step as soon as it is taken (for a live log).

    Raises:
        ValueError: fewer than two candidates, or a candidate listed twice.
    """
    names = tuple(candidates)
    if len(names) < 2:
        raise ValueError(f"bisect needs a good and a bad end, got {len(names)} candidate(s)")
    if len(set(names)) != len(names):
        raise ValueError(f"a candidate is listed twice: {', '.join(names)}")
    result = BisectResult(Status.FOUND, names)

    def judge(index: int, role: str) -> Verdict:
        candidate = names[index]
        started = time.monotonic()
        try:
            observation = oracle(candidate)
        except HarnessError as error:
            observation = Observation(error.outcome, error.evidence.log_path, error.message)
        step = Step(candidate, observation, time.monotonic() - started, role)
        result.steps.append(step)
        log.info("bisect step: %s", step.render())
        if on_step is not None:
            on_step(step)
        if step.verdict is Verdict.ABORT:
            raise _Stop(Status.ABORTED, f"{candidate}: {observation.message or 'CONFIG_ERROR'}")
        return step.verdict

    def judge_end(index: int, role: str, expected: Verdict) -> None:
        for _ in range(end_retries + 1):
            verdict = judge(index, role)
            if verdict is not Verdict.SKIP:
                break
        if verdict is Verdict.SKIP:
            raise _Stop(Status.UNTESTABLE_END, f"the {role} {names[index]} could not be judged")
        if verdict is not expected:
            raise _Stop(
                Status.ENDS_DISAGREE,
                f"the {role} {names[index]} is {verdict.value}, not {expected.value}: "
                "no regression between the ends; check --good and --bad",
            )

    try:
        judge_end(0, "good end", Verdict.GOOD)
        judge_end(len(names) - 1, "bad end", Verdict.BAD)
        good, bad = 0, len(names) - 1
        skipped: set[int] = set()
        while (probe := _next_probe(good, bad, skipped)) is not None:
            verdict = judge(probe, "middle")
            if verdict is Verdict.GOOD:
                good = probe
            elif verdict is Verdict.BAD:
                bad = probe
            else:
                skipped.add(probe)
    except _Stop as stop:
        result.status, result.message = stop.status, stop.message
        return result

    result.last_good, result.first_bad = names[good], names[bad]
    between = [names[i] for i in range(good + 1, bad) if i in skipped]
    result.suspects = (*between, names[bad])
    if between:
        result.status = Status.AMBIGUOUS
        result.message = (
            f"skipped candidates sit between the last good and the first bad one: "
            f"the first bad one is one of {', '.join(result.suspects)}"
        )
    return result


def _next_probe(good: int, bad: int, skipped: set[int]) -> int | None:
    """The untested candidate nearest the middle of (good, bad), or None when none is left.

    Probing a skipped candidate's neighbour keeps the halving nearly as effective.
    """
    open_ = [i for i in range(good + 1, bad) if i not in skipped]
    if not open_:
        return None
    middle = (good + bad) / 2
    # Ties go to the lower index, so the choice is deterministic.
    return min(open_, key=lambda i: (abs(i - middle), i))


def max_verdicts(count: int) -> int:
    """The most verdicts a bisection of ``count`` candidates needs without skips or retries:
    the two ends plus ``ceil(log2(count - 1))`` halvings of the ``count - 1`` gaps."""
    if count < 2:
        raise ValueError("bisect needs at least two candidates")
    return 2 + (count - 2).bit_length()
