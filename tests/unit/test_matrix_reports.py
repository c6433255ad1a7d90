"""Pure parts of the nightly matrix: load scaling, records, the HTML page, CI fan-out, bundles."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from harness.cli import fanout
from harness.image import templates
from harness.kernel.catalogue import load_catalogue
from harness.outcome import ConfigError, InfraError, KernelFault, Outcome
from harness.plugin.collector import AttemptState
from harness.report import bundle, view
from harness.report import html as html_report
from harness.report import model as results
from harness.report.model import Results, TestRecord
from harness.report.replay import _swap_file
from harness.storage import controllers
from harness.vm import loadscale

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("loadavg", "cpus", "expected"),
    [(0.5, 2, 1.0), (2.0, 2, 1.0), (3.0, 2, 1.5), (7.0, 2, 3.5), (50.0, 2, loadscale.MAX_FACTOR)],
)
def test_load_factor_is_load_per_cpu_at_least_one_and_bounded(
    loadavg: float, cpus: int, expected: float
) -> None:
    assert loadscale.load_factor(loadavg, cpus) == pytest.approx(expected)


def test_load_factor_of_this_machine_follows_proc_loadavg() -> None:
    """The factor on this machine is the one /proc/loadavg and the CPU count give, read here
    independently (before and after: the kernel may update the average in between)."""

    def one_minute() -> float:
        return float(Path("/proc/loadavg").read_text().split()[0])

    cpus = len(os.sched_getaffinity(0))
    before = one_minute()
    factor = loadscale.load_factor()
    after = one_minute()
    # /proc/loadavg shows two decimals; the harness reads the full value (os.getloadavg).
    expected = [min(4.0, max(1.0, load / cpus)) for load in (before, after)]
    assert any(abs(factor - e) <= 0.006 / cpus + 0.001 for e in expected), (factor, expected)


def _report(when: str, outcome: str, longrepr: object = None) -> pytest.TestReport:
    return pytest.TestReport("t.py::x", ("t.py", 1, "x"), {}, outcome, longrepr, when)  # type: ignore[arg-type]


def test_attempt_state_takes_the_outcome_of_the_harness_error() -> None:
    state = AttemptState()
    state.note("setup", _report("setup", "passed"), None)
    fault = KernelFault("kernel fault: panic", None)
    state.note("call", _report("call", "failed"), fault)
    state.note("teardown", _report("teardown", "passed"), None)
    assert (state.outcome, state.message) == ("KERNEL_FAULT", "kernel fault: panic")


def test_attempt_state_plain_assertion_is_test_fail_and_setup_bug_is_error() -> None:
    state = AttemptState()
    state.note("call", _report("call", "failed"), AssertionError("boom"))
    assert state.outcome == "TEST_FAIL" and "boom" in state.message
    state = AttemptState()
    state.note("setup", _report("setup", "failed"), RuntimeError("bug"))
    assert state.outcome == results.ERROR


def test_attempt_state_teardown_fault_outranks_a_pass_but_not_an_earlier_verdict() -> None:
    state = AttemptState()
    state.note("call", _report("call", "passed"), None)
    state.note("teardown", _report("teardown", "failed"), InfraError("QEMU crashed"))
    assert state.outcome == "INFRA_ERROR"
    state = AttemptState()
    state.note("call", _report("call", "failed"), KernelFault("oops"))
    state.note("teardown", _report("teardown", "failed"), InfraError("QEMU crashed"))
    assert state.outcome == "KERNEL_FAULT"


def test_attempt_state_skip() -> None:
    state = AttemptState()
    state.note("setup", _report("setup", "skipped", ("f", 1, "Skipped: no ahci")), None)
    assert (state.outcome, state.message) == (results.SKIPPED, "no ahci")


def test_phase_split_uses_only_phases_with_both_ends() -> None:
    phases = {"first-byte": 0.5, "INIT-START": 2.0, "PASS": 2.25}
    assert results.phase_split(phases) == {"firmware": 0.5, "kernel": 1.5, "init": 0.25}


def _record(kernel: str, controller: str, outcome: str = "PASS", **extra: object) -> TestRecord:
    return TestRecord(
        nodeid=f"t.py::test_root[{kernel}-{controller}]",
        test="test_root",
        kernel=kernel,
        release=f"{kernel}-release",
        controller=controller,
        template="init.sh",
        outcome=outcome,
        phases={"first-byte": 0.4, "INIT-START": 2.0, "PASS": 2.5, "shutdown": 2.6},
        **extra,  # type: ignore[arg-type]
    )


def test_results_json_round_trips(tmp_path: Path) -> None:
    run = Results([_record("k1", "ahci"), _record("k2", "nvme", "KERNEL_FAULT")], "now", "h", 3.0)
    path = tmp_path / "r.json"
    path.write_text(run.to_json({run.records[0].nodeid: "logs/a.log"}))
    data = json.loads(path.read_text())
    assert data["summary"] == {"PASS": 1, "KERNEL_FAULT": 1}
    assert data["tests"][0]["log"] == "logs/a.log" and data["tests"][1]["log"] == ""
    again = Results.load(path)
    assert again.records == run.records


class _Cells(HTMLParser):
    """Collects the matrix cells (attributes) and the links inside each."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str | None]] = []
        self.links: dict[int, list[str]] = {}
        self.pres: list[str] = []
        self._in_pre = False
        self._in_cell = False

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "td" and "cell" in (attributes.get("class") or ""):
            self.cells.append(attributes)
            self._in_cell = True
        if tag == "a" and self._in_cell:
            self.links.setdefault(len(self.cells) - 1, []).append(attributes["href"] or "")
        self._in_pre = tag == "pre"

    def handle_data(self, data: str) -> None:
        if self._in_pre:
            self.pres.append(data)


def test_html_matrix_has_kernel_rows_controller_columns_and_the_failure() -> None:
    excerpt = "[    1.0] Kernel panic - not syncing: <script>alert(1)</script>"
    records = [
        _record("k1", "ahci"),
        _record("k1", "nvme"),
        _record("k2", "ahci"),
        _record("k2", "nvme", "KERNEL_FAULT", excerpt=excerpt, message="kernel fault: panic"),
    ]
    logs = {r.nodeid: f"logs/{r.kernel}-{r.controller}.log" for r in records}
    page = html_report.render(Results(records, "now", "host", 1.0), logs)
    parser = _Cells()
    parser.feed(page)
    assert [(c["data-kernel"], c["data-column"]) for c in parser.cells] == [
        ("k1", "ahci"),
        ("k1", "nvme"),
        ("k2", "ahci"),
        ("k2", "nvme"),
    ]
    failing = [i for i, c in enumerate(parser.cells) if "fail" in (c["class"] or "")]
    assert failing == [3]
    assert parser.cells[3]["data-outcome"] == "KERNEL_FAULT"
    assert parser.links[3] == ["logs/k2-nvme.log"]
    assert "<script>" not in page  # the excerpt is text, never markup
    assert any("Kernel panic - not syncing: <script>" in p for p in parser.pres)
    # One chart bar per kernel and phase, no external resources.
    assert len(re.findall(r'<rect class="phase" data-kernel="k1"', page)) == 4
    assert not re.search(r"(src|href)=\"https?:", page)


def test_html_cell_shows_its_worst_outcome_and_retries() -> None:
    records = [
        _record("k1", "ahci", "PASS", retried=["INFRA_ERROR"], attempts=2),
        TestRecord(**{**_record("k1", "ahci", "BOOT_TIMEOUT").to_dict(), "test": "test_b"}),
    ]
    records[1].nodeid += "b"
    page = html_report.render(Results(records), {})
    assert 'data-outcome="BOOT_TIMEOUT"' in page
    assert "retried after INFRA_ERROR (attempt 2)" in page


def test_worst_outcome_order() -> None:
    assert view.worst(["PASS", "INFRA_ERROR", "KERNEL_FAULT"]) == "KERNEL_FAULT"
    assert view.worst(["PASS", "SKIPPED"]) == "PASS"


def test_controller_and_template_selection() -> None:
    assert [c.name for c in controllers.select([])] == [controllers.DEFAULT_CONTROLLER]
    assert len(controllers.select(["all"])) >= 7
    assert [c.name for c in controllers.select(["nvme", "ahci"])] == ["ahci", "nvme"]
    with pytest.raises(ConfigError, match=r"'scsi9'.*ahci"):
        controllers.select(["scsi9", "ahci"])
    assert templates.select(["init.sh"]) == ["init.sh.j2"]
    with pytest.raises(ConfigError, match=r"nope\.sh\.j2"):
        templates.select(["nope.sh"])


def test_fanout_formats_follow_kernels_toml() -> None:
    catalogue = load_catalogue(REPO / "kernels.toml")
    nightly = [k.name for k in catalogue.select(["tag:nightly"])]
    jobs = fanout.entries(catalogue, ["tag:nightly"])
    github = json.loads(fanout.render(jobs, "github"))
    assert [j["kernel"] for j in github["include"]] == nightly
    split = fanout.entries(catalogue, ["tag:nightly"], ["ahci", "nvme"])
    assert len(split) == 2 * len(nightly)
    child = yaml.safe_load(fanout.render(split, "gitlab", gitlab_include="x.yml"))
    assert child.pop("include") == [{"local": "x.yml"}]
    assert len(child) == len(split)
    assert {(v["variables"]["KERNEL"], v["variables"]["CONTROLLER"]) for v in child.values()} == {
        (k, c) for k in nightly for c in ("ahci", "nvme")
    }
    assert all(v["extends"] == fanout.GITLAB_TEMPLATE for v in child.values())
    assert fanout.render(split, "names").splitlines()[0] == f"{nightly[0]} ahci"


def test_drive_options_parse_qemu_escapes_and_swap_files() -> None:
    args = ["-drive", "if=none,id=d0,file=/a,,b.qcow2,format=qcow2", "-device", "x"]
    assert bundle.drive_options(args) == [
        {"if": "none", "id": "d0", "file": "/a,b.qcow2", "format": "qcow2"}
    ]
    swapped = _swap_file(args, "/a,b.qcow2", "/new,x.qcow2")
    assert swapped[1] == "if=none,id=d0,file=/new,,x.qcow2,format=qcow2"
    # A file name that merely starts like the old one is left alone.
    assert _swap_file(["-drive", "file=/a.qcow2x"], "/a.qcow2", "/b")[1] == "file=/a.qcow2x"


def test_load_bundle_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}: no bundle.json"):
        bundle.load(tmp_path)
    (tmp_path / "bundle.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a bootharness-bundle-1"):
        bundle.load(tmp_path)


def test_junit_properties_carry_matrix_and_phases() -> None:
    record = _record("k1", "ahci", retried=["INFRA_ERROR"], attempts=2, load_factor=1.5)
    props = dict(results.junit_properties(record))
    assert props["controller"] == "ahci" and props["template"] == "init.sh"
    assert props["attempts"] == "2" and props["retried"] == "INFRA_ERROR"
    assert props["load_factor"] == "1.5"
    assert props["phase_kernel"] == "1.600" and props["time_PASS"] == "2.500"
    assert Outcome.INFRA_ERROR.retryable and not Outcome.KERNEL_FAULT.retryable
