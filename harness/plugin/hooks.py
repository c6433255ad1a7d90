"""pytest glue: options, markers, kernel parametrization, failure reports, and the one place
that registers the plugin's parts (fixtures, matrix, recorder, results collector).

Loaded through the ``pytest11`` entry point. The run's settings live in ``config.stash``
(:mod:`harness.plugin.settings`) so xdist workers each rebuild them from their own options.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Generator

import pytest

from harness import __version__, lifeline, upkeep
from harness.kernel.catalogue import Catalogue, find_catalogue, load_catalogue
from harness.outcome import ConfigError, HarnessError, InfraError
from harness.plugin import collector as collector_module
from harness.plugin import fixtures, junitfile, kernel_warnings, matrix, recorder, servers
from harness.plugin.settings import (
    catalogue_key,
    matrix_key,
    passed_key,
    read_matrix_settings,
    read_settings,
    settings_key,
    vms_key,
)
from harness.report import history
from harness.snapshot.restore import MODES
from harness.vm import loadscale
from harness.vm.accel import VALID_REQUESTS
from harness.vm.boot import Vm, qemu_version
from harness.vm.sandbox import DEDICATED_USER, FALLBACK_USER, SANDBOX_CHOICES
from harness.vm.state import render_event_log

log = logging.getLogger(__name__)


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
    group.addoption("--accel", choices=VALID_REQUESTS, help="QEMU accelerator (default: auto)")
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
        choices=MODES,
        help="start tests from a booted snapshot of their VM (auto: the best mechanism that "
        "works; default off; marker snapshot / cold_boot per test)",
    )
    parser.addini("bootharness_snapshots", "snapshots: off, auto, shared-ram or stream", default="")
    group.addoption(
        "--initrd",
        metavar="FILE",
        help="a prebuilt initrd for tests that take the `initrd` fixture (bisect over images)",
    )
    parser.addini("bootharness_initrd", "the prebuilt initrd of the `initrd` fixture", default="")
    group.addoption(
        "--qemu-sandbox",
        choices=SANDBOX_CHOICES,
        help="QEMU's seccomp sandbox (default on; off: QEMU also keeps our user)",
    )
    group.addoption(
        "--qemu-user",
        metavar="USER",
        help="whom QEMU runs as once set up (name or UID:GID; none: stay). Default, as root: "
        f"{DEDICATED_USER} if that user exists, else {FALLBACK_USER}",
    )
    parser.addini("bootharness_qemu_sandbox", "QEMU's seccomp sandbox: on or off", default="")
    parser.addini("bootharness_qemu_user", "whom QEMU runs as once set up", default="")
    group.addoption(
        "--no-cache-prune",
        action="store_true",
        default=None,
        help="do not prune the cache at the end of the run (default: at most hourly, by "
        "the policy of `bootharness cache prune`)",
    )
    parser.addini(
        "bootharness_cache_prune", "prune the cache at the end of a run", type="bool", default=True
    )
    matrix.add_options(group, parser)  # controllers, templates, retries, reports
    kernel_warnings.add_options(group, parser)


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
    kernel_warnings.configure(config)
    settings = read_settings(config)
    config.stash[settings_key] = settings
    if hasattr(config, "workerinput"):
        # A pytest-xdist worker runs for its controller alone: when the controller dies
        # (a cancelled CI job, SIGKILL) stop this worker's VMs at once and exit.
        lifeline.watch_parent()
    config.pluginmanager.register(fixtures, "bootharness-fixtures")
    config.pluginmanager.register(servers, "bootharness-servers")
    config.pluginmanager.register(kernel_warnings.KernelWarnings(), "bootharness-kernel-warnings")
    _register_matrix_parts(config)
    if settings.kernels_file or settings.kernel_selectors:
        # Asked for explicitly: a bad file or selector is a usage error before collection.
        try:
            catalogue(config).select(list(settings.kernel_selectors))
        except HarnessError as error:
            raise pytest.UsageError(str(error)) from error


def catalogue(config: pytest.Config) -> Catalogue:
    """The run's kernels.toml, loaded once (a bad file is a usage error naming every problem)."""
    if catalogue_key not in config.stash:
        settings = config.stash[settings_key]
        try:
            path = find_catalogue(settings.kernels_file, config.rootpath)
            config.stash[catalogue_key] = load_catalogue(path)
        except HarnessError as error:
            raise pytest.UsageError(str(error)) from error
    return config.stash[catalogue_key]


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pytest-xdist): one worker per CPU the rest of the machine leaves free,
    within the process's CPU quota, at least one (:func:`harness.vm.loadscale.auto_workers`):
    on a loaded machine ``-n auto`` is ``-n 1``, never slower. ``-n logical`` and
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` keep xdist's own choice."""
    if config.option.numprocesses == "logical" or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return loadscale.auto_workers()


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


def pytest_sessionstart(session: pytest.Session) -> None:
    """After every plugin's configure: the junit file, if any, is written atomically."""
    if not hasattr(session.config, "workerinput"):
        junitfile.install(session.config)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Prune the cache once the run is over (in the controller, at most hourly)."""
    config = session.config
    settings = config.stash.get(settings_key, None)
    if hasattr(config, "workerinput") or settings is None or not settings.cache_prune:
        return
    upkeep.prune_now(settings.cache_dir)


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
        # An INFRA_ERROR is a pytest error, not a failure: the guest was never judged.
        if isinstance(error, InfraError) and report.when == "call":
            report.when = "setup"
    if report.failed and vms:
        report.sections.append(("bootharness", _failure_section(vms, error)))
    if report.when == "call":
        item.stash[passed_key] = report.passed
    # junit properties come from the test's record (harness.plugin.recorder, harness.report.model).


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


def _register_matrix_parts(config: pytest.Config) -> None:
    """Read the settings and register the matrix, recording and results plugins.

    Result files are written by the controller only (the single process, or xdist's
    controller); workers build records and bundles. When a report is asked for, passing
    tests keep their folders so their console logs can be copied at the end.
    """

    settings = read_matrix_settings(config)
    config.stash[matrix_key] = settings
    config.addinivalue_line(
        "markers", "controllers(*names): run this test only on these disk controllers"
    )
    config.addinivalue_line("markers", "templates(*names): run this test only with these templates")
    config.addinivalue_line(
        "markers",
        "boot_paths(*names, widen=False): run this test only on these boot paths (all: every "
        "one); widen=True: without --boot-path, on all of them, not just the default",
    )
    config.pluginmanager.register(matrix.MatrixPlugin(settings), "bootharness-matrix")
    config.pluginmanager.register(recorder.Recorder(settings), "bootharness-recorder")
    wants_files = settings.json_path is not None or settings.html_path is not None
    if wants_files and settings_key in config.stash:
        base = config.stash[settings_key]
        config.stash[settings_key] = dataclasses.replace(base, keep_artifacts=True)
    if wants_files and not hasattr(config, "workerinput"):
        try:
            # Read now, not after the run: a bad path fails before any boot, not after.
            with warnings.catch_warnings(record=True) as skipped:
                warnings.simplefilter("always", history.HistorySkipped)
                runs = history.load_runs(settings.history)
            for warning in skipped:  # a damaged file: shown in the warnings summary
                config.issue_config_time_warning(warning.message, stacklevel=2)  # type: ignore[arg-type]
        except ConfigError as error:
            raise pytest.UsageError(f"--bootharness-history: {error}") from error
        collector = collector_module.ResultsCollector(
            settings.json_path, settings.html_path, runs, columns=settings.columns
        )
        config.pluginmanager.register(collector, "bootharness-results")
