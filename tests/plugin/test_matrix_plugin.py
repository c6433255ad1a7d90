"""The matrix options, INFRA_ERROR retries and result files, exercised with pytester.

No VM boots here: the kernels are fake local bzImages, and the tests raise the harness's own
errors, so what is checked is the plugin's logic (ids, retries, records through xdist).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.fakes import local_catalogue


@pytest.fixture
def catalogue(pytester: pytest.Pytester) -> str:
    toml = local_catalogue(pytester.path, {"a": ["nightly"], "b": ["nightly"]})
    return f"--kernels={toml}"


def test_ids_read_kernel_then_controller_then_template_and_k_selects(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(
        """
        def test_cell(kernel, controller, template):
            assert template == "init.sh.j2"
        """
    )
    args = [catalogue, "--kernel", "tag:nightly", "--controller", "ahci,nvme", "-v"]
    result = pytester.runpytest(*args)
    result.stdout.fnmatch_lines_random(
        [
            "*test_cell?k-a-ahci-init.sh? PASSED*",
            "*test_cell?k-a-nvme-init.sh? PASSED*",
            "*test_cell?k-b-ahci-init.sh? PASSED*",
            "*test_cell?k-b-nvme-init.sh? PASSED*",
        ]
    )
    result.assert_outcomes(passed=4)
    result = pytester.runpytest(*args, "-k", "k-b and nvme")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest(catalogue, "--controller", "all")
    result.assert_outcomes(passed=7)


def test_controllers_marker_filters_and_unknown_controller_is_usage_error(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.controllers("nvme")
        def test_only_nvme(kernel, controller):
            assert controller.name == "nvme"
        """
    )
    result = pytester.runpytest(catalogue, "--controller", "ahci,nvme", "-v")
    result.stdout.fnmatch_lines(["*test_only_nvme?k-a-nvme? PASSED*"])
    result.assert_outcomes(passed=1)
    result = pytester.runpytest(catalogue, "--controller", "sata9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown disk controller(s) 'sata9'*ahci*"])


RETRY_TESTS = """
import pathlib
from harness.outcome import InfraError, KernelFault

def _count(name):
    path = pathlib.Path(__file__).parent / name
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n

def test_infra_once(kernel):
    if _count("infra") == 1:
        raise InfraError("QEMU did not start (injected)")

def test_kernel_fault(kernel):
    _count("fault")
    raise KernelFault("kernel fault: panic (injected)")

def test_infra_then_fault(kernel):
    if _count("both") == 1:
        raise InfraError("QEMU crashed (injected)")
    raise KernelFault("kernel fault: oops (injected)")

def test_harness_bug(kernel):
    _count("bug")
    raise RuntimeError("a bug")
"""


def _counts(path: Path) -> dict[str, int]:
    return {n: int((path / n).read_text()) for n in ("infra", "fault", "both", "bug")}


def test_only_infra_errors_are_retried_and_a_kernel_fault_wins(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(test_retry=RETRY_TESTS)
    result = pytester.runpytest(catalogue, "--junitxml=junit.xml", "-rA")
    result.assert_outcomes(passed=1, failed=3)
    assert _counts(pytester.path) == {"infra": 2, "fault": 1, "both": 2, "bug": 1}
    result.stdout.fnmatch_lines_random(
        [
            "*test_infra_once?k-a?: INFRA_ERROR -> PASS (retried)*",
            "*test_infra_then_fault?k-a?: INFRA_ERROR -> KERNEL_FAULT (retried)*",
        ]
    )
    cases = {
        c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
        for c in ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    }
    assert len(cases) == 4  # one testcase per test, however many attempts
    assert cases["test_infra_once[k-a]"]["attempts"] == "2"
    assert cases["test_infra_once[k-a]"]["retried"] == "INFRA_ERROR"
    assert cases["test_infra_then_fault[k-a]"]["outcome"] == "KERNEL_FAULT"
    assert cases["test_kernel_fault[k-a]"]["attempts"] == "1"
    assert "retried" not in cases["test_harness_bug[k-a]"]


def test_retries_can_be_turned_off(pytester: pytest.Pytester, catalogue: str) -> None:
    pytester.makepyfile(test_retry=RETRY_TESTS)
    result = pytester.runpytest(catalogue, "--infra-retries", "0", "-k", "infra_once")
    result.assert_outcomes(errors=1)  # INFRA_ERROR is a pytest error (docs/architecture.md)
    assert (pytester.path / "infra").read_text() == "1"


def test_records_from_xdist_workers_reach_the_json_and_html(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile(
        """
        from harness.outcome import Evidence, KernelFault
        def test_cell(kernel, controller):
            if (kernel.name, controller.name) == ("k-b", "nvme"):
                raise KernelFault("kernel fault: panic", Evidence(excerpt="Kernel panic - x"))
        """
    )
    result = pytester.runpytest_subprocess(
        catalogue,
        "--kernel=tag:nightly",
        "--controller=ahci,nvme",
        "-n",
        "2",
        "-p",
        "xdist",
        "--bootharness-json=out/results.json",
        "--bootharness-html=out/report.html",
    )
    result.assert_outcomes(passed=3, failed=1)
    data = json.loads((pytester.path / "out" / "results.json").read_text())
    cells = {(t["kernel"], t["controller"]): t["outcome"] for t in data["tests"]}
    assert cells == {
        ("k-a", "ahci"): "PASS",
        ("k-a", "nvme"): "PASS",
        ("k-b", "ahci"): "PASS",
        ("k-b", "nvme"): "KERNEL_FAULT",
    }
    failed = next(t for t in data["tests"] if t["outcome"] != "PASS")
    assert failed["excerpt"] == "Kernel panic - x"
    page = (pytester.path / "out" / "report.html").read_text()
    assert 'data-kernel="k-b" data-column="nvme" data-outcome="KERNEL_FAULT"' in page


def test_report_columns_option_and_ini_choose_the_dimension(
    pytester: pytest.Pytester, catalogue: str
) -> None:
    pytester.makepyfile("def test_cell(kernel, controller):\n    pass\n")
    args = [catalogue, "--kernel=tag:nightly", "--controller=ahci,nvme"]
    result = pytester.runpytest(*args, "--bootharness-html=r.html")
    result.assert_outcomes(passed=4)
    assert 'data-columns="controller"' in (pytester.path / "r.html").read_text()
    result = pytester.runpytest(
        *args, "--bootharness-html=r.html", "--bootharness-columns=boot_path"
    )
    result.assert_outcomes(passed=4)
    page = (pytester.path / "r.html").read_text()
    assert 'data-columns="boot_path"' in page and '<th data-column="pvh">pvh</th>' in page
    pytester.makeini("[pytest]\nbootharness_columns = colour\n")
    result = pytester.runpytest(*args, "--bootharness-html=r.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bootharness_columns = 'colour': use one of controller*"])
