"""--bootharness-history in a real pytest run, and the page's rerun command really reruns.

No VM boots: the kernels are fake local bzImages and the tests fail with plain asserts.
"""

from __future__ import annotations

import shlex
from html.parser import HTMLParser

import pytest

from tests.fakes import local_catalogue

CELL_TEST = """
import os

def test_cell(kernel, controller):
    assert (kernel.name, controller.name) != ("k-b", os.environ.get("BREAK", "-"))
"""


@pytest.fixture
def catalogue(pytester: pytest.Pytester) -> str:
    toml = local_catalogue(pytester.path, {"a": [], "b": []})
    return f"--kernels={toml}"


class _Commands(HTMLParser):
    """Text of the ``since`` lines and ``pre.commands`` blocks inside matrix cells."""

    def __init__(self) -> None:
        super().__init__()
        self.since: list[str] = []
        self.commands: list[str] = []
        self._target: list[str] | None = None
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "td":
            self._in_cell = True
        elif self._in_cell and "since" in classes:
            self._target = self.since
        elif self._in_cell and "commands" in classes:
            self._target = self.commands

    def handle_endtag(self, tag: str) -> None:
        self._target = None
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._target is not None:
            self._target.append(data)


def test_history_option_marks_new_failures_and_the_rerun_command_selects_the_cell(
    pytester: pytest.Pytester, catalogue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_matrix=CELL_TEST)
    matrix = [catalogue, "--kernel=k-a", "--kernel=k-b", "--controller=ahci,nvme"]
    result = pytester.runpytest(*matrix, "--bootharness-json=night1/results.json")
    result.assert_outcomes(passed=4)

    monkeypatch.setenv("BREAK", "nvme")
    pytester.makeini("[pytest]\nbootharness_history = night1\n")  # the ini form
    result = pytester.runpytest(*matrix, "--bootharness-html=night2/report.html")
    result.assert_outcomes(passed=3, failed=1)
    page = _Commands()
    page.feed((pytester.path / "night2" / "report.html").read_text())
    assert len(page.since) == 1 and page.since[0].startswith("new tonight (passed ")
    (rerun,) = "".join(page.commands).splitlines()  # no bundle without a boot: only pytest
    argv = shlex.split(rerun)
    assert argv[0] == "pytest" and argv[1].endswith("test_cell[k-b-nvme]")
    # Run it as a person would: exactly the failing cell, failing again.
    again = pytester.runpytest(catalogue, *argv[1:], "-v")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*test_cell?k-b-nvme? FAILED*"])


def test_a_missing_history_path_is_a_usage_error_before_any_test(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(test_matrix=CELL_TEST)
    result = pytester.runpytest(
        catalogue, "--bootharness-html=r.html", "--bootharness-history=nowhere"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bootharness-history: history *nowhere: no such file*"])
