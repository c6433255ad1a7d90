"""The pytest plugin, exercised with pytester: options, ids, reports, junit, xdist."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.fakes import local_catalogue

REPO = Path(__file__).resolve().parents[2]
KERNELS = str(REPO / "kernels.toml")


@pytest.fixture
def fake_catalogue(pytester: pytest.Pytester) -> Path:
    return local_catalogue(pytester.path, {"a": ["nightly"], "b": ["nightly", "slow"], "c": []})


def test_markers_and_options_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.kernels(*selectors)*", "*@pytest.mark.boot*"])
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*--kernel=NAME|TAG*",
            "*--accel*",
            "*--boot-timeout*",
            "*--timeout-multiplier*",
            "*--keep-artifacts*",
            "*bootharness_accel*",
        ]
    )


def test_kernel_fixture_is_parametrized_with_kernel_names(
    pytester: pytest.Pytester, fake_catalogue: Path
) -> None:
    pytester.makepyfile(
        """
        import pytest
        def test_release(kernel):
            assert kernel.release == "6.1.0-" + kernel.name[-1]
        @pytest.mark.kernels("slow")
        def test_only_slow(kernel):
            assert kernel.name == "k-b"
        """
    )
    result = pytester.runpytest(f"--kernels={fake_catalogue}", "--kernel", "tag:nightly", "-v")
    result.stdout.fnmatch_lines(
        ["*test_release?k-a? PASSED*", "*test_release?k-b? PASSED*", "*test_only_slow?k-b? PASSED*"]
    )
    result.assert_outcomes(passed=3)
    # Default selection: the default kernel only; ini option works too.
    ini = f"[pytest]\nbootharness_kernels = {fake_catalogue}\nbootharness_kernel = k-c\n"
    pytester.makeini(ini)
    result = pytester.runpytest("-v", "-k", "release")
    result.stdout.fnmatch_lines(["*test_release?k-c? PASSED*"])


def test_unknown_kernel_selector_is_a_usage_error(
    pytester: pytest.Pytester, fake_catalogue: Path
) -> None:
    pytester.makepyfile("def test_x(kernel): pass\n")
    result = pytester.runpytest(f"--kernels={fake_catalogue}", "--kernel", "k-z")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*k-z*"])


def test_bad_kernels_toml_is_a_usage_error_naming_the_file(pytester: pytest.Pytester) -> None:
    bad = pytester.path / "kernels.toml"
    bad.write_text('[kernels."x"]\ndebian_package = 3\n')
    pytester.makepyfile("def test_x(kernel): pass\n")
    result = pytester.runpytest(f"--kernels={bad}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kernels.toml*x*debian_package*"])


@pytest.mark.boot
def test_failed_boot_report_and_junit_properties(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_passes(boot):
            vm = boot()
            vm.expect_pass()

        def test_fails(boot):
            vm = boot(variables={"commands": ["echo checking; false"]})
            vm.expect_pass()

        def test_infra(boot):
            boot(extra_args=["-no-such-option"])
        """
    )
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest(f"--kernels={KERNELS}", "--accel", "tcg", f"--junitxml={junit}")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_infra*",
            "INFRA_ERROR: QEMU did not start*invalid option*",
            "*FAILURES*",
            "TEST_FAIL: the init failed: command 1 exited 1*",
            "phase: init*",
            "console log: *console.log",
            "qemu command: *qemu-system-x86_64*",
            "console tail:",
            "*checking*",
            "*bootharness outcome*",
            "*bootharness 0.1.0, QEMU *",
        ]
    )
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    props = {
        name: {p.get("name"): p.get("value") for p in case.iter("property")}
        for name, case in cases.items()
    }
    passed = props["test_passes[debian-6.1-amd64]"]
    assert passed["outcome"] == "PASS"
    assert passed["kernel_release"] == "6.1.0-56-amd64"
    assert passed["accelerator"] == "tcg"
    assert float(passed["boot_time"]) > 0
    assert passed["qemu_version"].startswith("7.")
    assert props["test_fails[debian-6.1-amd64]"]["outcome"] == "TEST_FAIL"
    assert props["test_infra[debian-6.1-amd64]"]["outcome"] == "INFRA_ERROR"
    assert cases["test_infra[debian-6.1-amd64]"].find("error") is not None


@pytest.mark.boot
def test_parallel_boots_under_xdist_do_not_collide(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.parametrize("n", range(2))
        def test_boot(boot, n):
            vm = boot(variables={"commands": [f"echo worker-{n}"]})
            vm.expect_pass()
            assert f"worker-{n}" in vm.machine.console_log.read_text()
            open(f"log-{n}.txt", "w").write(str(vm.machine.console_log))
        """
    )
    result = pytester.runpytest_subprocess(
        f"--kernels={KERNELS}", "--accel", "tcg", "-n", "2", "-p", "xdist", "--keep-artifacts"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 workers*"])
    logs = [Path((pytester.path / f"log-{n}.txt").read_text()) for n in range(2)]
    assert logs[0].parent != logs[1].parent, "two VMs shared a folder"
    for n, log in enumerate(logs):
        text = log.read_text()
        assert f"worker-{n}" in text and f"worker-{1 - n}" not in text
