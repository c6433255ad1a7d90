"""Since when: each test's outcome tonight against the results of earlier runs.

The earlier runs are results files (:meth:`harness.report.model.Results.to_json`) of earlier
nights, given as files or folders. For every test of tonight's run, :func:`compare` walks
back through the runs that have a verdict on that test (a run that did not run it, or skipped
it, says nothing and is passed over) and tells:

* a failing test: ``NEW`` when it passed the last time it ran, otherwise ``FAILING`` since the
  first run of its unbroken series of failures (``complete`` is False when the history runs
  out before a pass, so the failure is at least that old);
* a passing test: ``FIXED`` when it failed the last time it ran, otherwise ``PASSING``;
* ``UNKNOWN`` when no earlier run has a verdict on it.

Tests are matched by node id first. A test whose node id changed (a new matrix dimension,
such as a boot path, now appears in the ids) is matched by its
:meth:`~harness.report.model.TestRecord.history_key`: the test function, the kernel, the
dimensions of its boot and the rest of its parameter id. Pure functions, apart from
:func:`load_runs`, which reads the files.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.outcome import ConfigError, Outcome
from harness.report.model import SKIPPED, Results, TestRecord

log = logging.getLogger(__name__)

NEW = "NEW"
FAILING = "FAILING"
FIXED = "FIXED"
PASSING = "PASSING"
UNKNOWN = "UNKNOWN"


@dataclass(frozen=True)
class Run:
    """An earlier run: its results and the file they were read from."""

    results: Results
    source: str = ""  # the file name, shown next to the date

    @property
    def label(self) -> str:
        """How the page names the run: its date (UTC, to the minute) and file."""
        when = _when(self.results.created)
        stamp = when.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC") if when else ""
        stamp = stamp or self.results.created or "undated run"
        return f"{stamp} [{self.source}]" if self.source else stamp


@dataclass(frozen=True)
class Streak:
    """What a test's history says about its outcome tonight."""

    status: str  # NEW, FAILING, FIXED, PASSING or UNKNOWN
    since: str = ""  # label of the first failing run of the series ("" for NEW: tonight)
    runs: int = 0  # failing runs in the series, tonight included (FIXED: the ended series)
    last_outcome: str = ""  # outcome the last time the test ran
    last_run: str = ""  # label of that run
    complete: bool = True  # False: every earlier run failed it too, the series may be older

    def text(self) -> str:
        """One line for the report, e.g. ``failing since 2025-06-01 02:17 UTC (3 runs)``."""
        if self.status == NEW:
            return f"new tonight (passed {self.last_run})"
        if self.status == FAILING:
            oldest = "" if self.complete else "at least "
            return f"failing since {oldest}{self.since} ({self.runs} runs)"
        if self.status == FIXED:
            return f"fixed tonight (was {self.last_outcome} {self.last_run})"
        if self.status == PASSING:
            return "passing"
        return "no earlier result"


def verdict(record: TestRecord) -> bool | None:
    """True: it failed; False: it passed; None: no verdict (skipped)."""
    if record.outcome == SKIPPED:
        return None
    return record.outcome != Outcome.PASS.name


def order(runs: Iterable[Run]) -> list[Run]:
    """Oldest first, by their ``created`` time; the same run given twice counts once."""
    unique: dict[tuple[object, ...], Run] = {}
    for run in runs:
        unique.setdefault(_identity(run.results), run)
    epoch = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    return sorted(unique.values(), key=lambda r: _when(r.results.created) or epoch)


def compare(tonight: Results, history: Sequence[Run]) -> dict[str, Streak]:
    """Each test of ``tonight`` (node id) -> its :class:`Streak` against ``history``.

    Runs of ``history`` that are tonight's own (same time, host and outcomes) or newer than
    it are ignored, so a history folder may already hold tonight's file.
    """
    now = _when(tonight.created)
    earlier = [
        run
        for run in order(history)
        if _identity(run.results) != _identity(tonight)
        and not (now and (when := _when(run.results.created)) and when > now)
    ]
    indexes = [(_Index(run.results.records), run.label) for run in earlier]
    streaks: dict[str, Streak] = {}
    for record in tonight.records:
        # Newest first: the runs that have a verdict on this test.
        seen = [
            (found, label)
            for index, label in reversed(indexes)
            if (found := index.find(record)) is not None and verdict(found) is not None
        ]
        streaks[record.nodeid] = streak(record, seen)
    return streaks


class _Index:
    """One earlier run's records by node id and by history key (a key two of its records
    share finds neither: a guess is worse than no history)."""

    def __init__(self, records: Iterable[TestRecord]) -> None:
        self.by_id: dict[str, TestRecord] = {}
        self.by_key: dict[tuple[str, ...], TestRecord | None] = {}
        for record in records:
            self.by_id[record.nodeid] = record
            key = record.history_key()
            self.by_key[key] = None if key in self.by_key else record

    def find(self, record: TestRecord) -> TestRecord | None:
        found = self.by_id.get(record.nodeid)
        return found if found is not None else self.by_key.get(record.history_key())


def streak(record: TestRecord, seen: Sequence[tuple[TestRecord, str]]) -> Streak:
    """The streak of ``record`` given its earlier verdicts, newest first, with run labels."""
    failed = verdict(record)
    if failed is None or not seen:
        return Streak(UNKNOWN)
    last, last_run = seen[0]
    series = 0
    for earlier, _ in seen:
        if not verdict(earlier):
            break
        series += 1
    if failed:
        if series == 0:
            return Streak(NEW, runs=1, last_outcome=last.outcome, last_run=last_run)
        return Streak(
            FAILING,
            since=seen[series - 1][1],
            runs=series + 1,
            last_outcome=last.outcome,
            last_run=last_run,
            complete=series < len(seen),
        )
    if series:
        return Streak(
            FIXED,
            since=seen[series - 1][1],
            runs=series,
            last_outcome=last.outcome,
            last_run=last_run,
            complete=series < len(seen),
        )
    return Streak(PASSING, last_outcome=last.outcome, last_run=last_run)


def counts(streaks: Mapping[str, Streak]) -> dict[str, int]:
    """Number of tests per status."""
    total: dict[str, int] = {}
    for value in streaks.values():
        total[value.status] = total.get(value.status, 0) + 1
    return total


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Read earlier results: files, or folders whose ``*.json`` files are read.

    Files that are not bootharness results, or cannot be read (truncated by a full disk, cut
    short by a killed copy), are skipped with a :class:`HistorySkipped` warning naming them,
    named on their own or found in a folder: one bad file never loses the morning's report.

    Raises:
        ConfigError: a path does not exist (a typo, not a damaged file).
    """
    runs: list[Run] = []
    for path in paths:
        if path.is_dir() or path.is_file():
            for file in sorted(path.glob("*.json")) if path.is_dir() else [path]:
                try:
                    runs.append(_load(file))
                except ConfigError as error:
                    log.warning("history: skipping %s", error.message)
                    warnings.warn(
                        HistorySkipped(f"history: skipping {error.message}"), stacklevel=2
                    )
        else:
            raise ConfigError(
                f"history {path}: no such file or folder; give earlier runs' results JSON "
                "files (--bootharness-json) or folders holding them"
            )
    return order(runs)


class HistorySkipped(UserWarning):
    """An earlier run's results file could not be read and was left out of the history."""


def _load(path: Path) -> Run:
    try:
        results = Results.load(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        # json.JSONDecodeError is a ValueError; a file of another format raises ValueError.
        raise ConfigError(
            f"{path}: not a readable bootharness results file ({error}); "
            "give results JSON files written by --bootharness-json or `bootharness report merge`"
        ) from error
    return Run(results, path.name)


def _identity(results: Results) -> tuple[object, ...]:
    """What makes two results files the same run (paths inside may have been rewritten)."""
    tests = tuple((r.nodeid, r.outcome) for r in results.records)
    return (results.created, results.host, tests)


def _when(created: str) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(created)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
