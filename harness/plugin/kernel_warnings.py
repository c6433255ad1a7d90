"""The kernel warnings policy in pytest: options, the per-test marker, the end-of-test check
and where warnings are listed.

``--kernel-warnings fail|report|ignore`` (ini ``bootharness_kernel_warnings``; default
``report``) and ``--kernel-warnings-allowlist FILE`` (repeatable; ini
``bootharness_kernel_warnings_allowlist``) set the run's policy
(:mod:`harness.vm.kernel_warnings`); the marker ``kernel_warnings("fail")`` sets one test's.
Every VM the ``boot`` fixture starts carries the policy, so under ``fail`` a warning ends any
wait on the console as a KERNEL_FAULT. A warning printed after the test's last wait is caught
when the test function returns. Listed warnings go to the test's report section, the junit
property ``kernel_warnings`` (one line per warning) and a terminal summary at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from typing import Any

import pytest

from harness.plugin.settings import Settings, vms_key
from harness.vm.boot import Vm
from harness.vm.kernel_warnings import MODES, WarningPolicy

MARKER = "kernel_warnings"
PROPERTY = "kernel_warnings"
SECTION = "bootharness kernel warnings"


def add_options(group: Any, parser: pytest.Parser) -> None:
    group.addoption(
        "--kernel-warnings",
        choices=MODES,
        help="what kernel warnings (WARN, lockdep, sleeping in atomic context, RCU stalls, "
        "hung tasks) do: fail the test, report them (default), or ignore them",
    )
    group.addoption(
        "--kernel-warnings-allowlist",
        action="append",
        default=[],
        metavar="FILE",
        help="known warnings ([[warning]] tables with regex and reason): never fail a test",
    )
    parser.addini("bootharness_kernel_warnings", "kernel warnings: fail, report or ignore")
    parser.addini(
        "bootharness_kernel_warnings_allowlist", "allowlist files of known warnings", type="paths"
    )


def configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(mode): this test's kernel warnings policy: fail, report or ignore "
        "(the run's allowlists still apply)",
    )


def policy_for(item: pytest.Item, settings: Settings) -> WarningPolicy:
    """The policy of one test: the run's, with the marker's mode when it has one.

    Raises:
        pytest.UsageError: the marker names an unknown mode.
    """
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return settings.kernel_warnings
    mode = str(marker.args[0]) if marker.args else str(marker.kwargs.get("mode", ""))
    if mode not in MODES:
        raise pytest.UsageError(f"{item.nodeid}: kernel_warnings({mode!r}): use one of {MODES}")
    return dataclasses.replace(settings.kernel_warnings, mode=mode)


class KernelWarnings:
    """Registered in every process that runs tests; lists warnings and fails on late ones."""

    def __init__(self) -> None:
        self.listed: list[tuple[str, list[str]]] = []  # (nodeid, lines), in the controller

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, None]:
        outcome = yield
        vms: list[Vm] = item.stash.get(vms_key, [])
        lines = [line for vm in vms for line in vm.warning_lines()]
        if lines:
            item.user_properties.append((PROPERTY, "\n".join(lines)))
        section = "\n".join(text for vm in vms if (text := vm.warnings_section()))
        if section:
            item.add_report_section("call", "kernel warnings", section)
        if outcome.exception is not None:
            return
        for vm in vms:
            late = vm.unraised_failing_warnings()
            if late:
                outcome.force_exception(vm.warning_fault(late, phase="end of test"))
                return

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == PROPERTY and value:
                self.listed.append((report.nodeid, str(value).splitlines()))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.listed:
            return
        terminalreporter.section(SECTION)
        for nodeid, lines in self.listed:
            for line in lines:
                terminalreporter.write_line(f"{nodeid}: {line}")
