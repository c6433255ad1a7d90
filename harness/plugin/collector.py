"""Where tests run, each attempt becomes a record; where files are written, records are collected.

Under pytest-xdist a test runs in a worker process, but files (the JSON results, the HTML
report, the copied console logs) must be written once, by the controller. So the worker turns
what it knows (parameters, the VMs it booted, the outcome) into a plain
:class:`~harness.report.model.TestRecord` dict and attaches it to the test's teardown report as
the ``bootharness`` attribute; xdist serializes reports with their extra attributes, and
:class:`ResultsCollector`, registered only in the controller (or the single process), receives
every record through ``pytest_runtest_logreport`` and writes the files when the session ends.
"""

from __future__ import annotations

import datetime
import logging
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.outcome import HarnessError, Outcome
from harness.report import history, html
from harness.report.history import Run
from harness.report.model import (
    ERROR,
    EXCERPT_LINES,
    SKIPPED,
    Results,
    TestRecord,
    first_marks,
    param_name,
    relative_paths,
    safe_name,
    template_id,
    write_atomic,
)
from harness.vm.boot import Vm, qemu_version
from harness.vm.dimensions import DEFAULT_BOOT_PATH

log = logging.getLogger(__name__)

REPORT_ATTRIBUTE = "bootharness"


@dataclass
class AttemptState:
    """What the current attempt of a test has shown so far (kept in the item's stash)."""

    outcome: str = Outcome.PASS.name
    message: str = ""
    excerpt: str = ""
    trace: str = ""  # the fault's symbolised call trace, when there is one
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
            self.trace = evidence.trace.rstrip()
        elif when == "call":
            self.outcome = Outcome.TEST_FAIL.name
            self.message = _first_line(error) or "the test failed"
        else:
            self.outcome = ERROR
            self.message = f"{when}: {_first_line(error) or 'error'}"


def build_record(
    item: pytest.Item,
    state: AttemptState,
    vms: Sequence[Vm],
    *,
    duration: float,
    bundle: Path | None = None,
) -> TestRecord:
    """The record of one test attempt from its VMs, its outcome and (when it booted nothing)
    its parameters.

    The dimensions are those of the last VM the test booted (the one its outcome is about),
    whatever the test's own parametrization: a test that boots lsi through a parameter of its
    own is recorded with ``controller="lsi"``. Only a test that booted nothing keeps the
    kernel, controller and template of its ``kernel``/``controller``/``template`` parameters.
    """
    callspec = getattr(item, "callspec", None)
    params: Mapping[str, object] = getattr(callspec, "params", {})
    record = TestRecord(
        nodeid=item.nodeid,
        test=getattr(item, "originalname", item.name),
        kernel=param_name(params.get("kernel")),
        controller=param_name(params.get("controller")),
        boot_path=param_name(params.get("boot_path")) or DEFAULT_BOOT_PATH,
        template=template_id(param_name(params.get("template"))),
        params=str(getattr(callspec, "id", "")),
        outcome=state.outcome,
        message=state.message,
        excerpt=state.excerpt,
        trace=state.trace,
        duration=round(duration, 3),
        started=state.started,
        bundle=str(bundle) if bundle else "",
    )
    if vms:
        vm = vms[-1]
        record.set_dimensions(vm.dimensions())
        record.kernel = record.kernel or param_name(params.get("kernel"))
        record.qemu_version = qemu_version(vm.spec.qemu)
        record.accelerator = vm.spec.accel
        record.boot_mechanism = vm.boot_mechanism
        record.load_factor = float(vm.load_factor)
        record.phases = first_marks(vm.marks)
        record.boot_entry = vm.boot_entry
        record.console_logs = [str(v.machine.console_log) for v in vms]
    return record


class ResultsCollector:
    """Collects records in the controller and writes the JSON results and the HTML report.

    Console logs are copied into ``<report stem>-logs/`` next to the HTML report (or the
    JSON file), so the report's links are relative and the folder can be published as is.
    """

    def __init__(
        self,
        json_path: Path | None,
        html_path: Path | None,
        history: Sequence[Run] = (),
        *,
        columns: str | None = None,
    ) -> None:
        self.json_path = json_path
        self.html_path = html_path
        self.columns = columns  # the dimension the page's columns follow (None: most varied)
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
            logs = relative_paths(links, self.json_path.parent)
            write_atomic(self.json_path, results.to_json(logs))
        if self.html_path is not None:
            streaks = history.compare(results, self.history) if self.history else None
            page = html.render(
                results, relative_paths(links, self.html_path.parent), streaks, self.columns
            )
            write_atomic(self.html_path, page)

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
