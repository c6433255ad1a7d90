"""pytest glue: options, markers, kernel parametrization and failure reports.

Loaded through the ``pytest11`` entry point. Fixtures live in :mod:`harness.fixtures`; the
run's settings live in ``config.stash`` so xdist workers each rebuild them from their own
options.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import __version__, cache, config, fixtures, matrix
from harness.boot import Deadlines, Vm, qemu_version
from harness.outcome import HarnessError, InfraError
from harness.vmstate import render_event_log

log = logging.getLogger(__name__)

ACCEL_CHOICES = ("auto", "kvm", "tcg")
SNAPSHOT_CHOICES = ("off", "auto", "shared-ram", "stream")


@dataclass(frozen=True)
class Settings:
    """The run's bootharness settings, from command-line options and ini values."""

    kernels_file: str | None
    kernel_selectors: tuple[str, ...]
    accel: str
    deadlines: Deadlines
    keep_artifacts: bool
    cache_dir: Path
    snapshots: str = "off"  # off, auto, shared-ram or stream (harness.snapshot)


settings_key = pytest.StashKey[Settings]()
catalogue_key = pytest.StashKey[config.Catalogue]()
vms_key = pytest.StashKey[list[Vm]]()
passed_key = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bootharness", "boot Linux kernels under QEMU")
    group.addoption(
        "--kernel",
        action="append",
        default=[],
        metavar="NAME|TAG",
        help="kernel(s) to test, by name, tag or tag:TAG (repeatable; default: the default kernel)",
    )
    group.addoption("--kernels", metavar="FILE", help="the kernels.toml to use")
    group.addoption("--accel", choices=ACCEL_CHOICES, help="QEMU accelerator (default: auto)")
    group.addoption(
        "--boot-timeout",
        type=float,
        metavar="S",
        help="deadline (s) for the kernel and init phases",
    )
    group.addoption(
        "--timeout-multiplier", type=float, metavar="X", help="scale every deadline (slow machines)"
    )
    group.addoption(
        "--keep-artifacts",
        action="store_true",
        default=None,
        help="keep the per-test folders (console log, QEMU argv) of passing tests too",
    )
    group.addoption(
        "--bootharness-cache", metavar="DIR", help="cache folder for kernels and images"
    )
    parser.addini("bootharness_kernels", "the kernels.toml to use", default="")
    parser.addini("bootharness_kernel", "default kernel selectors", type="args", default=[])
    parser.addini("bootharness_accel", "QEMU accelerator: auto, kvm or tcg", default="auto")
    parser.addini("bootharness_boot_timeout", "deadline (s) for kernel and init phases", default="")
    parser.addini("bootharness_timeout_multiplier", "scale every deadline", default="1.0")
    parser.addini(
        "bootharness_keep_artifacts", "keep artifacts of passing tests", type="bool", default=False
    )
    parser.addini("bootharness_cache", "cache folder", default="")
    group.addoption(
        "--snapshots",
        choices=SNAPSHOT_CHOICES,
        help="start tests from a booted snapshot of their VM (auto: the best mechanism that "
        "works; default off; marker snapshot / cold_boot per test)",
    )
    parser.addini("bootharness_snapshots", "snapshots: off, auto, shared-ram or stream", default="")
    matrix.add_options(group, parser)  # controllers, templates, retries, reports


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernels(*selectors): run this test only on kernels matching a name or tag; "
        "kernels(..., widen=True): without --kernel, on every such kernel, not just the default",
    )
    config.addinivalue_line(
        "markers",
        "kernel_config(*options): skip unless the kernel has every CONFIG_ option (y or m; "
        "A|B: either)",
    )
    config.addinivalue_line(
        "markers", "boot: the test boots a real VM (added automatically to tests that boot)"
    )
    config.addinivalue_line(
        "markers",
        "snapshot(mechanism='auto'): start this test's VMs from a booted snapshot "
        "(auto, shared-ram or stream)",
    )
    config.addinivalue_line(
        "markers", "cold_boot: always boot this test's VMs cold, even with --snapshots"
    )
    settings = _settings(config)
    config.stash[settings_key] = settings
    config.pluginmanager.register(fixtures, "bootharness-fixtures")
    matrix.configure(config)
    if settings.kernels_file or settings.kernel_selectors:
        # Asked for explicitly: a bad file or selector is a usage error before collection.
        try:
            catalogue(config).select(list(settings.kernel_selectors))
        except HarnessError as error:
            raise pytest.UsageError(str(error)) from error


def _settings(config: pytest.Config) -> Settings:
    def pick(option: str, ini: str) -> str:
        value = config.getoption(option)
        return str(value) if value not in (None, "") else str(config.getini(ini) or "")

    accel = pick("accel", "bootharness_accel") or "auto"
    if accel not in ACCEL_CHOICES:
        raise pytest.UsageError(
            f"bootharness_accel = {accel!r}: use one of {', '.join(ACCEL_CHOICES)}"
        )
    try:
        multiplier = float(pick("timeout_multiplier", "bootharness_timeout_multiplier") or 1.0)
        boot_timeout = pick("boot_timeout", "bootharness_boot_timeout")
        deadlines = Deadlines.from_options(
            float(boot_timeout) if boot_timeout else None, multiplier
        )
    except ValueError as error:
        raise pytest.UsageError(f"bootharness timeouts must be numbers: {error}") from error
    keep = config.getoption("keep_artifacts")
    selectors = tuple(config.getoption("kernel") or config.getini("bootharness_kernel"))
    snapshots = pick("snapshots", "bootharness_snapshots") or "off"
    if snapshots not in SNAPSHOT_CHOICES:
        raise pytest.UsageError(
            f"bootharness_snapshots = {snapshots!r}: use one of {', '.join(SNAPSHOT_CHOICES)}"
        )
    return Settings(
        kernels_file=pick("kernels", "bootharness_kernels") or None,
        kernel_selectors=selectors,
        accel=accel,
        deadlines=deadlines,
        keep_artifacts=bool(
            keep if keep is not None else config.getini("bootharness_keep_artifacts")
        ),
        cache_dir=cache.cache_root(pick("bootharness_cache", "bootharness_cache") or None),
        snapshots=snapshots,
    )


def catalogue(config: pytest.Config) -> config.Catalogue:
    """The run's kernels.toml, loaded once (a bad file is a usage error naming every problem)."""
    if catalogue_key not in config.stash:
        settings = config.stash[settings_key]
        try:
            path = _find_catalogue(settings.kernels_file, config.rootpath)
            config.stash[catalogue_key] = _load(path)
        except HarnessError as error:
            raise pytest.UsageError(str(error)) from error
    return config.stash[catalogue_key]


_find_catalogue = config.find_catalogue
_load = config.load_catalogue


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every test that uses the ``kernel`` fixture over the selected kernels."""
    if "kernel" not in metafunc.fixturenames:
        return
    settings = metafunc.config.stash[settings_key]
    cat = catalogue(metafunc.config)
    try:
        entries = cat.select(list(settings.kernel_selectors))
    except HarnessError as error:
        raise pytest.UsageError(str(error)) from error
    marker = metafunc.definition.get_closest_marker("kernels")
    if marker is not None:
        wanted = [str(s) for s in marker.args]
        if marker.kwargs.get("widen") and not settings.kernel_selectors:
            # A matrix test (kernels("nightly", widen=True)) covers every matching kernel
            # when the run names none; an explicit --kernel still narrows it.
            entries = list(cat.kernels)
        entries = [e for e in entries if any(e.matches(s) for s in wanted)]
    if not entries:
        metafunc.parametrize(
            "kernel",
            [
                pytest.param(
                    None,
                    marks=pytest.mark.skip(
                        reason="no selected kernel matches this test's kernels marker"
                    ),
                )
            ],
            ids=["no-kernel"],
            indirect=True,
        )
        return
    metafunc.parametrize(
        "kernel", entries, ids=[e.name for e in entries], indirect=True, scope="session"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "boot" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.boot)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    vms = item.stash.get(vms_key, [])
    error = call.excinfo.value if call.excinfo is not None else None
    if isinstance(error, HarnessError) and report.failed:
        # The evidence says more than a traceback through pexpect and asyncio internals.
        report.longrepr = f"{error.outcome.name}: {error}"
        report.sections.append(("bootharness outcome", f"{error.outcome.name}: {error.message}"))
        # DESIGN.md: an INFRA_ERROR is a pytest error, not a failure: the guest was never judged.
        if isinstance(error, InfraError) and report.when == "call":
            report.when = "setup"
    if report.failed and vms:
        report.sections.append(("bootharness", _failure_section(vms, error)))
    if report.when == "call":
        item.stash[passed_key] = report.passed
    # junit properties come from the test's record (harness.recorder, harness.results).


def _failure_section(vms: list[Vm], error: BaseException | None) -> str:
    lines = [f"bootharness {__version__}, QEMU {qemu_version()}"]
    for vm in vms:
        lines.append(f"console log: {vm.machine.console_log}")
        lines.append("qemu command: " + " ".join(vm.machine.argv))
        events = render_event_log(vm.machine.qmp_log)
        if events:
            lines.append(f"qmp events ({vm.machine.qmp_log}):\n{events}")
        if vm.machine.launched and not isinstance(error, HarnessError):
            lines.append("console tail:\n" + vm.machine.console.recorder.tail(30))
    return "\n".join(lines)
