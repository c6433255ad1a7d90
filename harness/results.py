"""One record per test of the matrix: built where the test ran, collected where files are written.

Under pytest-xdist a test runs in a worker process, but files (the JSON results, the HTML
report, the copied console logs) must be written once, by the controller. So the worker turns
what it knows (parameters, the VMs it booted, the outcome) into a plain :class:`TestRecord`
dict and attaches it to the test's teardown report as the ``bootharness`` attribute; xdist
serializes reports with their extra attributes, and :class:`ResultsCollector`, registered only
in the controller (or the single process), receives every record through
``pytest_runtest_logreport`` and writes the files when the session ends.

The record is built at teardown because only then have the test's VMs stopped: the console
log is complete and a failure's reproduction bundle can be written.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.outcome import HarnessError, Outcome

if TYPE_CHECKING:
    from harness.history import Run

log = logging.getLogger(__name__)

FORMAT = "bootharness-results-1"
REPORT_ATTRIBUTE = "bootharness"
# Outcomes beyond the DESIGN.md taxonomy, for tests that never reached a verdict on a guest.
SKIPPED = "SKIPPED"
ERROR = "ERROR"  # a fixture or harness bug (not a HarnessError): never retried
# Points of progress whose time goes into junit properties and the phase chart.
PHASE_MARKS = ("first-byte", "kernel-banner", "INIT-START", "PASS", "shutdown")
# Phases of the chart: (name, from mark, to mark).
PHASES = (
    ("firmware", "qemu-started", "first-byte"),
    ("kernel", "first-byte", "INIT-START"),
    ("init", "INIT-START", "PASS"),
    ("shutdown", "PASS", "shutdown"),
)
EXCERPT_LINES = 25


@dataclass
class AttemptState:
    """What the current attempt of a test has shown so far (kept in the item's stash)."""

    outcome: str = Outcome.PASS.name
    message: str = ""
    excerpt: str = ""
    started: float = field(default_factory=time.time)
    judged: bool = False  # a call phase (or a failing setup) gave a verdict

    def note(self, when: str, report: pytest.TestReport, error: BaseException | None) -> None:
        """Fold one phase's report into the attempt's outcome."""
        if report.skipped and not self.judged:
            self.outcome, self.judged = SKIPPED, True
            self.message = _skip_reason(report)
            return
        if report.passed:
            if when == "call":
                self.judged = True
            return
        # A failure: the first verdict stands, except that a harness error seen in teardown
        # (a kernel fault while shutting down) still outranks a pass.
        if self.judged and self.outcome != Outcome.PASS.name:
            return
        self.judged = True
        if isinstance(error, HarnessError):
            self.outcome = error.outcome.name
            self.message = error.message
            evidence = error.evidence
            self.excerpt = evidence.excerpt.rstrip() or _last_lines(evidence.console_tail)
        elif when == "call":
            self.outcome = Outcome.TEST_FAIL.name
            self.message = _first_line(error) or "the test failed"
        else:
            self.outcome = ERROR
            self.message = f"{when}: {_first_line(error) or 'error'}"


@dataclass
class TestRecord:
    """Everything the reports say about one test; plain data, JSON-ready."""

    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    test: str  # the test function's name, without parameters
    kernel: str = ""
    release: str = ""
    controller: str = ""
    template: str = ""
    outcome: str = Outcome.PASS.name
    message: str = ""
    excerpt: str = ""
    duration: float = 0.0
    started: float = 0.0  # seconds since the epoch
    phases: dict[str, float] = field(default_factory=dict)  # mark -> s since QEMU start
    console_logs: list[str] = field(default_factory=list)  # one per VM, in boot order
    bundle: str = ""
    qemu_version: str = ""
    accelerator: str = ""
    boot_mechanism: str = ""  # cold, or how a snapshot restored the VM
    load_factor: float = 1.0
    attempts: int = 1
    retried: list[str] = field(default_factory=list)  # outcomes of the earlier attempts

    @property
    def failed(self) -> bool:
        return self.outcome not in (Outcome.PASS.name, SKIPPED)

    @property
    def console_log(self) -> str:
        """The log of the last VM the test booted (the one the outcome is about)."""
        return self.console_logs[-1] if self.console_logs else ""

    def phase_split(self) -> dict[str, float]:
        """Seconds spent in each phase of :data:`PHASES` that both ends of were reached."""
        return phase_split(self.phases)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TestRecord:
        """Rebuild a record; unknown keys (from a newer writer) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def phase_split(phases: Mapping[str, float]) -> dict[str, float]:
    """Durations of the phases whose start and end marks are both present."""
    marks = {"qemu-started": 0.0, **phases}
    split: dict[str, float] = {}
    for name, start, end in PHASES:
        if start in marks and end in marks:
            split[name] = max(0.0, round(marks[end] - marks[start], 3))
    return split


def param_name(value: object) -> str:
    """How a parameter (KernelEntry, Controller, template name) is named in reports."""
    name = getattr(value, "name", value)
    return "" if name is None else str(name)


def build_record(
    item: pytest.Item,
    state: AttemptState,
    vms: Sequence[Any],
    *,
    duration: float,
    bundle: Path | None = None,
) -> TestRecord:
    """The record of one test attempt from its parameters, its VMs and its outcome."""
    params: Mapping[str, object] = getattr(getattr(item, "callspec", None), "params", {})
    record = TestRecord(
        nodeid=item.nodeid,
        test=getattr(item, "originalname", item.name),
        kernel=param_name(params.get("kernel")),
        controller=param_name(params.get("controller")),
        template=template_id(param_name(params.get("template"))),
        outcome=state.outcome,
        message=state.message,
        excerpt=state.excerpt,
        duration=round(duration, 3),
        started=state.started,
        bundle=str(bundle) if bundle else "",
    )
    if vms:
        vm = vms[-1]
        from harness.boot import qemu_version

        kernel = vm.kernel
        record.kernel = record.kernel or param_name(kernel)
        record.release = str(getattr(kernel, "release", ""))
        record.qemu_version = qemu_version(vm.spec.qemu)
        record.accelerator = vm.spec.accel
        record.boot_mechanism = vm.boot_mechanism
        record.load_factor = float(vm.load_factor)
        record.phases = first_marks(vm.marks)
        record.console_logs = [str(v.machine.console_log) for v in vms]
    return record


def first_marks(marks: Iterable[Any]) -> dict[str, float]:
    """Mark name -> time of its first occurrence (later repeats are a second boot's)."""
    seen: dict[str, float] = {}
    for mark in marks:
        seen.setdefault(mark.name, round(float(mark.at), 3))
    return seen


def template_id(template: str) -> str:
    """``init.sh.j2`` -> ``init.sh``: the form used in test ids and report columns."""
    return template.removesuffix(".j2")


def junit_properties(record: TestRecord) -> list[tuple[str, str]]:
    """The record's junit ``<property>`` pairs (callers skip names already written)."""
    pairs = [
        ("kernel", record.kernel),
        ("kernel_release", record.release),
        ("outcome", record.outcome),
        ("qemu_version", record.qemu_version),
        ("accelerator", record.accelerator),
        ("boot_mechanism", record.boot_mechanism),
        ("controller", record.controller),
        ("template", record.template),
        ("load_factor", f"{record.load_factor:g}"),
        ("attempts", str(record.attempts)),
    ]
    if record.retried:
        pairs.append(("retried", ",".join(record.retried)))
    boot_time = record.phases.get("PASS", record.phases.get("INIT-START"))
    if boot_time is not None:
        pairs.append(("boot_time", f"{boot_time:.3f}"))
    for name in PHASE_MARKS:
        if name in record.phases:
            pairs.append((f"time_{name}", f"{record.phases[name]:.3f}"))
    for name, seconds in record.phase_split().items():
        pairs.append((f"phase_{name}", f"{seconds:.3f}"))
    if record.bundle:
        pairs.append(("bundle", record.bundle))
    return [(name, value) for name, value in pairs if value]


@dataclass
class Results:
    """A whole run: its records and when and where it ran."""

    records: list[TestRecord]
    created: str = ""
    host: str = ""
    duration: float = 0.0

    def summary(self) -> dict[str, int]:
        """Count of tests per outcome."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.outcome] = counts.get(record.outcome, 0) + 1
        return counts

    def to_json(self, logs: Mapping[str, str] | None = None) -> str:
        """The results file; ``logs`` adds each test's published console log (nodeid -> path)."""
        tests = [r.to_dict() for r in self.records]
        for test in tests:
            test["log"] = (logs or {}).get(test["nodeid"], "")
        data = {
            "format": FORMAT,
            "created": self.created,
            "host": self.host,
            "duration": round(self.duration, 3),
            "summary": self.summary(),
            "tests": tests,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Results:
        """Read a results file written by :meth:`to_json`.

        Raises:
            ValueError: not a bootharness results file (the message names it).
        """
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a bootharness results file ({FORMAT})")
        return cls(
            records=[TestRecord.from_dict(t) for t in data["tests"]],
            created=str(data.get("created", "")),
            host=str(data.get("host", "")),
            duration=float(data.get("duration", 0.0)),
        )


def safe_name(nodeid: str) -> str:
    """A file name for a test id: readable, unique enough, no path separators."""
    name = nodeid.split("::", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")[:120] or "test"


class ResultsCollector:
    """Collects records in the controller and writes the JSON results and the HTML report.

    Console logs are copied into ``<report stem>-logs/`` next to the HTML report (or the
    JSON file), so the report's links are relative and the folder can be published as is.
    """

    def __init__(
        self, json_path: Path | None, html_path: Path | None, history: Sequence[Run] = ()
    ) -> None:
        self.json_path = json_path
        self.html_path = html_path
        self.history = list(history)  # earlier runs: the report says since when
        self.records: dict[str, TestRecord] = {}
        self.started = time.time()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, REPORT_ATTRIBUTE, None)
        if isinstance(data, dict):
            record = TestRecord.from_dict(data)
            self.records[record.nodeid] = record

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        results = Results(
            records=sorted(self.records.values(), key=lambda r: r.started),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            host=platform.node(),
            duration=time.time() - self.started,
        )
        links = self._copy_logs(results.records)
        if self.json_path is not None:
            logs = _relative(links, self.json_path.parent)
            _write(self.json_path, results.to_json(logs))
        if self.html_path is not None:
            from harness import history, html_report

            streaks = history.compare(results, self.history) if self.history else None
            page = html_report.render(results, _relative(links, self.html_path.parent), streaks)
            _write(self.html_path, page)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for path in (self.json_path, self.html_path):
            if path is not None:
                terminalreporter.write_line(f"bootharness report: {path}")

    def _log_dir(self) -> Path:
        main = self.html_path or self.json_path
        assert main is not None
        return main.parent / f"{main.name.split('.')[0]}-logs"

    def _copy_logs(self, records: Sequence[TestRecord]) -> dict[str, Path]:
        """Copy each test's last console log; nodeid -> the copy."""
        target_dir = self._log_dir()
        shutil.rmtree(target_dir, ignore_errors=True)
        copies: dict[str, Path] = {}
        for record in records:
            if not record.console_log:
                continue
            source = Path(record.console_log)
            target = target_dir / f"{safe_name(record.nodeid)}.log"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as error:
                # A missing log must not lose the whole report; the cell says so.
                log.warning("cannot copy console log of %s: %s", record.nodeid, error)
                continue
            copies[record.nodeid] = target
        return copies


def _relative(links: Mapping[str, Path], base: Path) -> dict[str, str]:
    return {nodeid: Path(os.path.relpath(path, base)).as_posix() for nodeid, path in links.items()}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return ""


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _last_lines(text: str, count: int = EXCERPT_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-count:])
