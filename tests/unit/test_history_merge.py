"""Since when (harness.report.history) and one page from many CI jobs (report.merge), no boots.

Results files are written the way a run writes them (:meth:`Results.to_json` next to a
``report-logs/`` folder and a ``bundles/`` folder), laid out like downloaded CI artifacts.
"""

from __future__ import annotations

import json
import logging
import shlex
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.cli.main import main
from harness.outcome import ConfigError
from harness.report import history, merge
from harness.report.model import Results, TestRecord, safe_name

RUNNER = "/home/runner/work/repo/repo/reports"  # where the CI job wrote, gone here


def _nodeid(kernel: str, controller: str) -> str:
    return f"tests/boot/test_root.py::test_root_switch[{kernel}-{controller}-init.sh]"


def _record(kernel: str, controller: str, outcome: str = "PASS") -> TestRecord:
    return TestRecord(
        nodeid=_nodeid(kernel, controller),
        test="test_root_switch",
        kernel=kernel,
        release=f"{kernel}-rel",
        controller=controller,
        template="init.sh",
        outcome=outcome,
        message="" if outcome == "PASS" else f"{outcome.lower()}: it broke",
    )


def _run(created: str, cells: dict[tuple[str, str], str], host: str = "h") -> Results:
    return Results([_record(k, c, o) for (k, c), o in cells.items()], created, host, 1.0)


def _history(*runs: Results) -> list[history.Run]:
    return [history.Run(run, f"night{n}.json") for n, run in enumerate(runs, 1)]


CELL = ("k1", "ahci")
ID = _nodeid(*CELL)


def test_new_tonight_when_it_passed_last_time() -> None:
    runs = _history(_run("2025-06-01T02:00:00+00:00", {CELL: "PASS"}))
    tonight = _run("2025-06-02T02:00:00+00:00", {CELL: "KERNEL_FAULT"})
    streak = history.compare(tonight, runs)[ID]
    assert streak.status == history.NEW
    assert streak.text() == "new tonight (passed 2025-06-01 02:00 UTC [night1.json])"


def test_failing_since_the_first_failure_of_the_unbroken_series() -> None:
    # Skipped runs and runs without the test say nothing and do not break the series.
    runs = _history(
        _run("2025-06-01T02:00:00+00:00", {CELL: "TEST_FAIL"}),
        _run("2025-06-02T02:00:00+00:00", {CELL: "PASS"}),
        _run("2025-06-03T02:00:00+00:00", {CELL: "BOOT_TIMEOUT"}),
        _run("2025-06-04T02:00:00+00:00", {CELL: "SKIPPED"}),
        _run("2025-06-05T02:00:00+00:00", {("k2", "ahci"): "PASS"}),
        _run("2025-06-06T02:00:00+00:00", {CELL: "KERNEL_FAULT"}),
    )
    tonight = _run("2025-06-07T02:00:00+00:00", {CELL: "KERNEL_FAULT"})
    streak = history.compare(tonight, list(reversed(runs)))[ID]  # given in any order
    assert (streak.status, streak.runs, streak.complete) == (history.FAILING, 3, True)
    assert streak.since == "2025-06-03 02:00 UTC [night3.json]"
    assert streak.last_outcome == "KERNEL_FAULT"
    assert streak.text() == "failing since 2025-06-03 02:00 UTC [night3.json] (3 runs)"


def test_failing_in_every_run_on_record_is_at_least_that_old() -> None:
    runs = _history(
        _run("2025-06-01T02:00:00+00:00", {CELL: "TEST_FAIL"}),
        _run("2025-06-02T02:00:00+00:00", {CELL: "TEST_FAIL"}),
    )
    streak = history.compare(_run("2025-06-03T02:00:00+00:00", {CELL: "TEST_FAIL"}), runs)[ID]
    assert (streak.status, streak.runs, streak.complete) == (history.FAILING, 3, False)
    assert "failing since at least 2025-06-01 02:00 UTC" in streak.text()


def test_fixed_tonight_passing_and_unknown() -> None:
    other = ("k2", "nvme")
    runs = _history(_run("2025-06-01T02:00:00+00:00", {CELL: "BOOT_TIMEOUT", other: "PASS"}))
    tonight = _run(
        "2025-06-02T02:00:00+00:00", {CELL: "PASS", other: "PASS", ("k3", "ide"): "TEST_FAIL"}
    )
    streaks = history.compare(tonight, runs)
    assert streaks[ID].status == history.FIXED
    assert (
        streaks[ID].text() == "fixed tonight (was BOOT_TIMEOUT 2025-06-01 02:00 UTC [night1.json])"
    )
    assert streaks[_nodeid(*other)].status == history.PASSING
    assert streaks[_nodeid("k3", "ide")].status == history.UNKNOWN
    assert history.counts(streaks) == {"FIXED": 1, "PASSING": 1, "UNKNOWN": 1}


def test_tonights_own_file_and_newer_runs_in_the_history_are_ignored() -> None:
    tonight = _run("2025-06-02T02:00:00+00:00", {CELL: "KERNEL_FAULT"})
    runs = _history(
        _run("2025-06-01T02:00:00+00:00", {CELL: "PASS"}),
        tonight,
        _run("2025-06-03T02:00:00+00:00", {CELL: "KERNEL_FAULT"}),
    )
    assert history.compare(tonight, runs)[ID].status == history.NEW


def test_the_same_run_given_twice_counts_once() -> None:
    night = _run("2025-06-01T02:00:00+00:00", {CELL: "TEST_FAIL"})
    runs = [history.Run(night, "a.json"), history.Run(night, "copy.json")]
    assert len(history.order(runs)) == 1
    streak = history.compare(_run("2025-06-02T02:00:00+00:00", {CELL: "TEST_FAIL"}), runs)[ID]
    assert streak.runs == 2


def test_load_runs_reads_folders_skips_strays_and_names_bad_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "history"
    folder.mkdir()
    (folder / "b.json").write_text(_run("2025-06-02T02:00:00+00:00", {CELL: "PASS"}).to_json())
    (folder / "a.json").write_text(_run("2025-06-01T02:00:00+00:00", {CELL: "PASS"}).to_json())
    (folder / "stray.json").write_text('{"format": "something-else"}')
    (folder / "notes.txt").write_text("not json")
    with (
        caplog.at_level(logging.WARNING, logger="harness.report.history"),
        pytest.warns(history.HistorySkipped, match="stray.json"),
    ):
        runs = history.load_runs([folder])
    assert [r.source for r in runs] == ["a.json", "b.json"]  # oldest first
    assert "stray.json" in caplog.text
    # Named on its own, a damaged file is skipped too: it must not lose the night's report.
    with pytest.warns(history.HistorySkipped, match=r"stray\.json: not a readable bootharness"):
        assert history.load_runs([folder / "stray.json"]) == []
    with pytest.raises(ConfigError, match=r"history .*nope: no such file or folder"):
        history.load_runs([tmp_path / "nope"])


def write_job(
    folder: Path, kernel: str, cells: dict[str, str], created: str = "2025-06-02T02:10:00+00:00"
) -> Path:
    """A CI job's artifact as downloaded: results.json, report-logs/, bundles/ of failures."""
    records, logs = [], {}
    for controller, outcome in cells.items():
        record = _record(kernel, controller, outcome)
        log = folder / "report-logs" / f"{safe_name(record.nodeid)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"console of {kernel} on {controller}\n")
        logs[record.nodeid] = f"report-logs/{log.name}"
        if record.failed:
            name = safe_name(record.nodeid)
            (folder / "bundles" / name).mkdir(parents=True)
            (folder / "bundles" / name / "bundle.json").write_text("{}")
            record.bundle = f"{RUNNER}/bundles/{name}"
        records.append(record)
    path = folder / "results.json"
    path.write_text(Results(records, created, f"runner-{kernel}", 30.0).to_json(logs))
    return path


class _Page(HTMLParser):
    """Matrix cells with their log link, history line and reproduce commands."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str]] = []
        self.changes: dict[str, str] = {}
        self._cell: dict[str, str] | None = None
        self._into = ""
        self._status = ""
        self._in_changes = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        classes = found.get("class", "").split()
        if tag == "p":
            self._in_changes = "changes" in classes
        if tag == "td" and "cell" in classes:
            self._cell = dict(found)
            self.cells.append(self._cell)
        elif self._cell is not None and tag == "a" and "log" in classes:
            self._cell.setdefault("log", found["href"])
        elif self._cell is not None and "since" in classes:
            self._into = "since"
        elif self._cell is not None and tag == "pre" and "commands" in classes:
            self._into = "commands"
        elif self._in_changes and "since" in classes:
            self._into, self._status = "change", found["data-status"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        self._into = ""

    def handle_data(self, data: str) -> None:
        if self._into == "change":
            self.changes[self._status] = data
        elif self._into and self._cell is not None:
            self._cell[self._into] = self._cell.get(self._into, "") + data


def test_merge_makes_one_page_from_per_kernel_jobs_with_history_and_commands(
    tmp_path: Path,
) -> None:
    nightly = tmp_path / "nightly"  # as actions/download-artifact lays artifacts out
    inputs = [
        write_job(nightly / "bootharness-k1", "k1", {"ahci": "PASS", "nvme": "BOOT_TIMEOUT"}),
        write_job(nightly / "bootharness-k2", "k2", {"ahci": "PASS", "nvme": "KERNEL_FAULT"}),
    ]
    earlier = tmp_path / "history" / "run-1.json"
    earlier.parent.mkdir()
    earlier.write_text(
        _run(
            "2025-06-01T02:00:00+00:00",
            {("k1", "ahci"): "TEST_FAIL", ("k1", "nvme"): "PASS", ("k2", "nvme"): "KERNEL_FAULT"},
        ).to_json()
    )
    page = nightly / "index.html"
    merged = merge.merge(inputs, nightly / "index-logs")
    assert merged.missing == []
    merge.write(merged, page, nightly / "results.json", history.load_runs([earlier.parent]))

    dom = _Page()
    dom.feed(page.read_text())
    cells = {(c["data-kernel"], c["data-column"]): c for c in dom.cells}
    assert {k: c["data-outcome"] for k, c in cells.items()} == {
        ("k1", "ahci"): "PASS",
        ("k1", "nvme"): "BOOT_TIMEOUT",
        ("k2", "ahci"): "PASS",
        ("k2", "nvme"): "KERNEL_FAULT",
    }
    for (kernel, column), cell in cells.items():
        log = page.parent / cell["log"]  # relative to the page, copied next to it
        assert not cell["log"].startswith("/") and log.is_relative_to(nightly / "index-logs")
        assert log.read_text() == f"console of {kernel} on {column}\n"
    assert cells[("k1", "nvme")]["since"].startswith("new tonight")
    assert cells[("k2", "nvme")]["since"].startswith("failing since at least 2025-06-01 02:00")
    assert cells[("k1", "ahci")]["since"].startswith("fixed tonight (was TEST_FAIL")
    assert "since" not in cells[("k2", "ahci")]  # no history there: nothing to say
    assert dom.changes == {
        "NEW": "1 new tonight",
        "FAILING": "1 still failing",
        "FIXED": "1 fixed tonight",
    }

    replay, rerun = cells[("k2", "nvme")]["commands"].splitlines()
    argv = shlex.split(replay)
    assert argv[:2] == ["bootharness", "replay"]
    assert (page.parent / argv[2] / "bundle.json").is_file()  # the downloaded bundle, found
    assert argv[2].startswith("bootharness-k2/bundles/")
    assert shlex.split(rerun) == [
        "pytest",
        _nodeid("k2", "nvme"),
        "--kernel",
        "k2",
        "--controller",
        "nvme",
        "--template",
        "init.sh",
    ]
    assert "commands" not in cells[("k1", "ahci")]  # passing cells: no reproduce

    again = Results.load(nightly / "results.json")
    assert again.summary() == {"PASS": 2, "BOOT_TIMEOUT": 1, "KERNEL_FAULT": 1}
    assert again.host == "runner-k1, runner-k2"
    data = json.loads((nightly / "results.json").read_text())
    assert all((nightly / t["log"]).is_file() for t in data["tests"])


def test_merge_keeps_the_worse_outcome_of_a_test_in_two_inputs(tmp_path: Path) -> None:
    first = write_job(tmp_path / "a", "k1", {"ahci": "PASS"})
    second = write_job(tmp_path / "b", "k1", {"ahci": "KERNEL_FAULT"})
    for inputs in ([first, second], [second, first]):
        merged = merge.merge(inputs, tmp_path / f"logs-{len(inputs)}")
        assert [r.outcome for r in merged.results.records] == ["KERNEL_FAULT"]
        assert merged.bundles[ID] == tmp_path / "b" / "bundles" / safe_name(ID)


def test_merge_reports_what_it_cannot_find_and_rejects_other_files(tmp_path: Path) -> None:
    path = write_job(tmp_path / "job", "k1", {"ahci": "TEST_FAIL"})
    for folder in ("bundles", "report-logs"):
        for item in (tmp_path / "job" / folder).iterdir():
            (item / "bundle.json").unlink() if item.is_dir() else item.unlink()
    merged = merge.merge([path], tmp_path / "logs")
    assert len(merged.missing) == 2 and all(ID in m for m in merged.missing)
    assert merged.logs == {} and merged.bundles == {}
    bogus = tmp_path / "other.json"
    bogus.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"other\.json: not a readable bootharness results"):
        merge.merge([bogus], tmp_path / "logs")


def test_find_bundle_tries_the_recorded_path_then_its_tails_under_the_folder(
    tmp_path: Path,
) -> None:
    here = tmp_path / "bundles" / "x"
    here.mkdir(parents=True)
    (here / "bundle.json").write_text("{}")
    assert merge.find_bundle(str(here), tmp_path / "elsewhere") == here
    assert merge.find_bundle("/gone/reports/bundles/x", tmp_path) == here
    assert merge.find_bundle("bundles/x", tmp_path) == here
    assert merge.find_bundle("/gone/reports/bundles/y", tmp_path) is None


def test_cli_report_merge_copies_bundles_and_needs_an_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_job(tmp_path / "jobs" / "k1", "k1", {"ahci": "KERNEL_FAULT", "nvme": "PASS"})
    out = tmp_path / "site" / "report.html"
    code = main(["report", "merge", str(path), "-o", str(out), "--copy-bundles"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "merged 2 tests from 1 files (1 KERNEL_FAULT, 1 PASS), 0 earlier runs" in printed
    copy = out.parent / "report-bundles" / safe_name(ID)
    assert (copy / "bundle.json").is_file()
    assert f"bootharness replay report-bundles/{safe_name(ID)}" in out.read_text()
    assert len(list((out.parent / "report-logs").iterdir())) == 2
    assert main(["report", "merge", str(path)]) == ConfigError("x").outcome.cli_exit
    assert "-o report.html and/or --json" in capsys.readouterr().err
