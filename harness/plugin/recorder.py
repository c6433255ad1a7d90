"""pytest hooks where tests run: each attempt's outcome, INFRA_ERROR retries, records, bundles.

* Every phase report is folded into the attempt's :class:`~harness.report.model.AttemptState`.
* At teardown (the VMs have stopped) the test's :class:`~harness.report.model.TestRecord` is
  attached to the teardown report for the controller to collect, its junit properties are
  added, and a failed test that booted leaves a reproduction bundle (:mod:`harness.report.bundle`).
* Retries: a test whose attempt ended in INFRA_ERROR (QEMU would not start or crashed, a tool
  was missing) runs again, up to ``--infra-retries`` times. Nothing else is ever retried: a
  verdict on the guest (a kernel fault, a timeout, a failed check) ends the test at once, so
  a kernel fault seen in any attempt is the test's outcome, and an unknown exception is a
  harness bug that must be seen, not hidden by a second try. Only the last attempt's reports
  reach pytest (one junit testcase per test); they say which attempts came before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

from harness.outcome import HarnessError, Outcome
from harness.plugin import collector
from harness.plugin.settings import MatrixSettings, vms_key
from harness.report import bundle
from harness.report import model as results

log = logging.getLogger(__name__)

state_key = pytest.StashKey[collector.AttemptState]()
earlier_key = pytest.StashKey[list[str]]()  # "OUTCOME: message" of each earlier attempt
RETRIED_ATTRIBUTE = "bootharness_retried"


class Recorder:
    """Registered in every process that runs tests (the single process or each worker)."""

    def __init__(self, settings: MatrixSettings) -> None:
        self.settings = settings
        self.retried: list[tuple[str, list[str], str]] = []  # seen by the controller

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        retries = self.settings.infra_retries
        if retries <= 0:
            return None
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        baseline = list(item.user_properties)
        earlier: list[str] = []
        while True:
            item.user_properties = list(baseline)
            item.stash[earlier_key] = list(earlier)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            state = item.stash.get(state_key, None)
            if state is None or state.outcome != Outcome.INFRA_ERROR.name:
                break
            if len(earlier) >= retries:
                break
            earlier.append(f"{state.outcome}: {state.message}")
            log.warning("%s: INFRA_ERROR, running it again: %s", item.nodeid, state.message)
        if earlier:
            lines = [f"attempt {n}: {text}" for n, text in enumerate(earlier, 1)]
            for report in reports:
                setattr(report, RETRIED_ATTRIBUTE, [e.split(":", 1)[0] for e in earlier])
                if report.when == "teardown" or report.failed:
                    report.sections.append(("bootharness retries", "\n".join(lines)))
        for report in reports:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if call.when == "setup":
            item.stash[state_key] = collector.AttemptState(started=call.start)
        state = item.stash.setdefault(state_key, collector.AttemptState(started=call.start))
        error = call.excinfo.value if call.excinfo is not None else None
        state.note(call.when, report, error)
        if call.when == "teardown" and _in_matrix(item):
            self._finish(item, report, state, call)

    def _finish(
        self,
        item: pytest.Item,
        report: pytest.TestReport,
        state: collector.AttemptState,
        call: pytest.CallInfo[None],
    ) -> None:
        vms = item.stash.get(vms_key, [])
        earlier = item.stash.get(earlier_key, [])
        failed = state.outcome not in (Outcome.PASS.name, results.SKIPPED)
        where = self._bundle(item, vms, state, attempt=len(earlier) + 1) if failed else None
        record = collector.build_record(
            item, state, vms, duration=call.stop - state.started, bundle=where
        )
        record.attempts = len(earlier) + 1
        record.retried = [e.split(":", 1)[0] for e in earlier]
        setattr(report, collector.REPORT_ATTRIBUTE, record.to_dict())
        written = {name for name, _ in report.user_properties}
        extra = [(n, v) for n, v in results.junit_properties(record) if n not in written]
        report.user_properties = [*report.user_properties, *extra]
        if where is not None:
            report.sections.append(
                ("bootharness bundle", f"{where}\nreplay: bootharness replay {where}")
            )

    def _bundle(
        self, item: pytest.Item, vms: list[Any], state: collector.AttemptState, attempt: int
    ) -> Path | None:
        if not vms or vms[-1].machine.process is None:
            return None  # nothing was booted: nothing to reproduce
        vm = vms[-1]
        name = results.safe_name(item.nodeid) + (f"-attempt{attempt}" if attempt > 1 else "")
        if self.settings.bundles_dir is not None:
            target = self.settings.bundles_dir / name
        else:
            target = Path(vm.machine.workdir).parent / "bundle"
        params = getattr(getattr(item, "callspec", None), "params", {})
        entry = params.get("kernel")
        source = getattr(getattr(entry, "source", None), "package", None) or str(
            getattr(getattr(entry, "source", None), "vmlinuz", "")
        )
        started = time.monotonic()
        try:
            bundle.write(
                target,
                vm,
                test=item.nodeid,
                outcome=state.outcome,
                message=state.message,
                kernel_source=source,
            )
        except (OSError, ValueError, KeyError, HarnessError) as error:
            # A bundle that cannot be written must not hide the test's own outcome.
            log.warning("%s: cannot write the reproduction bundle: %s", item.nodeid, error)
            return None
        log.debug("bundle of %s written in %.2f s", item.nodeid, time.monotonic() - started)
        return target

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # In the controller (or the single process): remember retried tests for the summary.
        retried = getattr(report, RETRIED_ATTRIBUTE, None)
        if retried and report.when == "teardown":
            data = getattr(report, collector.REPORT_ATTRIBUTE, None)
            final = data["outcome"] if isinstance(data, dict) else report.outcome
            self.retried.append((report.nodeid, list(retried), str(final)))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.retried:
            return
        terminalreporter.section("bootharness retries")
        for nodeid, earlier, final in self.retried:
            terminalreporter.write_line(f"{nodeid}: {' -> '.join([*earlier, final])} (retried)")


def _in_matrix(item: pytest.Item) -> bool:
    """Tests that take part in the matrix: they use a kernel (and so may boot)."""
    return "kernel" in getattr(item, "fixturenames", ())
