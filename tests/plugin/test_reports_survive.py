"""Reports survive: results JSON, junit, HTML and bundles are written whole or not at all, and
a truncated or corrupt history file is skipped with a warning instead of losing the report.

No VM boots: fake local kernels, plain asserts. The full-disk cases use a real tiny tmpfs
(root only).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from harness.report import history
from harness.report.model import write_atomic
from tests.fakes import local_catalogue

PASSING = "def test_ok(kernel):\n    assert kernel.name\n"


@pytest.fixture
def catalogue(pytester: pytest.Pytester) -> str:
    return f"--kernels={local_catalogue(pytester.path, {'a': []})}"


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with no room left (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "full"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (where / "old.json").write_text('{"whole": true}\n')
        fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\1" * 4096)
        finally:
            os.close(fd)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_write_atomic_on_a_full_disk_keeps_the_old_file_whole(full_disk: Path) -> None:
    target = full_disk / "old.json"
    with pytest.raises(OSError):
        write_atomic(target, json.dumps({"new": "x" * 200_000}))
    assert json.loads(target.read_text()) == {"whole": True}
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.json"]


def test_junit_json_and_html_are_whole_and_no_temporary_file_stays(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(test_ok=PASSING)
    (pytester.path / "out").mkdir()
    (pytester.path / "out" / "junit.xml").write_text("<old/>")
    result = pytester.runpytest(
        catalogue,
        "--junitxml=out/junit.xml",
        "--bootharness-json=out/results.json",
        "--bootharness-html=out/report.html",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*generated xml file: {pytester.path / 'out' / 'junit.xml'}*"])
    root = ElementTree.parse(pytester.path / "out" / "junit.xml").getroot()
    assert [case.get("name") for case in root.iter("testcase")] == ["test_ok[k-a]"]
    assert json.loads((pytester.path / "out" / "results.json").read_text())["tests"]
    assert "</html>" in (pytester.path / "out" / "report.html").read_text()
    assert sorted(p.name for p in (pytester.path / "out").iterdir() if p.is_file()) == [
        "junit.xml",
        "report.html",
        "results.json",
    ]


def test_a_junit_file_on_a_full_disk_keeps_the_last_whole_report(
    pytester: pytest.Pytester, catalogue: str, full_disk: Path
) -> None:
    junit = full_disk / "old.json"  # any name: the whole old content must stay
    pytester.makepyfile(test_ok=PASSING)
    pytester.runpytest(catalogue, f"--junitxml={junit}")
    assert json.loads(junit.read_text()) == {"whole": True}
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "old.json"]


def test_a_truncated_history_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    good = tmp_path / "night1.json"
    good.write_text(
        json.dumps(
            {
                "format": "bootharness-results-1",
                "created": "2026-01-01T02:00:00+00:00",
                "tests": [{"nodeid": "t::a", "test": "a", "outcome": "PASS"}],
            }
        )
    )
    cut = tmp_path / "night2.json"
    cut.write_text(good.read_text()[:40])  # a full disk, a killed copy
    with pytest.warns(history.HistorySkipped, match="night2.json: not a readable"):
        runs = history.load_runs([good, cut])
    assert [run.source for run in runs] == ["night1.json"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(history.load_runs([tmp_path])) == 1
    assert len(seen) == 1


def test_a_run_with_a_corrupt_history_file_still_writes_its_report(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(test_ok=PASSING)
    (pytester.path / "night1.json").write_text('{"format": "bootharness-results-1", "tes')
    result = pytester.runpytest(
        catalogue, "--bootharness-html=report.html", "--bootharness-history=night1.json"
    )
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*HistorySkipped*night1.json*"])
    assert "</html>" in (pytester.path / "report.html").read_text()
