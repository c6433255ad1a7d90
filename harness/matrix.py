"""The test matrix beyond kernels: controllers and init templates, and the run's report options.

Controllers and templates are chosen like kernels: ``--controller NAME`` (repeatable, or
comma-separated, or ``all``) and ``--template NAME``, with ini equivalents, and tests that use
the ``controller`` or ``template`` fixture are parametrized over the choice. The kernel is
parametrized first (by :mod:`harness.plugin`), so ids read
``test_root_switch[debian-6.1-amd64-ahci]``, and ``-k ahci`` or a node id picks cells.

Also here: the options of retries (:mod:`harness.recorder`), load-scaled deadlines
(:mod:`harness.loadscale`) and the result files (:mod:`harness.results`), and
:func:`configure`, which registers those plugins in the right processes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.outcome import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONTROLLER = "virtio-blk"
ALL = "all"


@dataclass(frozen=True)
class MatrixSettings:
    """Matrix choices and report options of the run (in ``config.stash[matrix_key]``)."""

    controllers: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    infra_retries: int = 1
    load_scaling: bool = True
    json_path: Path | None = None
    html_path: Path | None = None
    bundles_dir: Path | None = None
    history: tuple[Path, ...] = ()  # earlier runs' results files or folders


matrix_key = pytest.StashKey[MatrixSettings]()


def add_options(group: Any, parser: pytest.Parser) -> None:
    """Add the matrix and report options to the plugin's option group and the ini file."""
    group.addoption(
        "--controller",
        action="append",
        default=[],
        metavar="NAME|all",
        help=f"disk controller(s) for tests using the controller fixture (repeatable or "
        f"comma-separated; default: {DEFAULT_CONTROLLER})",
    )
    group.addoption(
        "--template",
        action="append",
        default=[],
        metavar="NAME|all",
        help="init template(s) for tests using the template fixture (default: init.sh.j2)",
    )
    group.addoption(
        "--infra-retries",
        type=int,
        metavar="N",
        help="run a test again up to N times when it ends in INFRA_ERROR (default: 1)",
    )
    group.addoption(
        "--no-load-scaling",
        action="store_true",
        default=None,
        help="do not stretch boot deadlines when the machine is loaded",
    )
    group.addoption(
        "--bootharness-json", metavar="FILE", help="write the run's results as JSON to FILE"
    )
    group.addoption(
        "--bootharness-html",
        metavar="FILE",
        help="write a self-contained HTML report to FILE (console logs are copied next to it)",
    )
    group.addoption(
        "--bootharness-bundles",
        metavar="DIR",
        help="write each failure's reproduction bundle under DIR (default: the test's folder)",
    )
    parser.addini("bootharness_controller", "default disk controller(s)", type="args", default=[])
    parser.addini("bootharness_template", "default init template(s)", type="args", default=[])
    parser.addini("bootharness_infra_retries", "retries of INFRA_ERROR tests", default="1")
    parser.addini(
        "bootharness_load_scaling", "stretch deadlines under load", type="bool", default=True
    )
    group.addoption(
        "--bootharness-history",
        action="append",
        default=[],
        metavar="FILE|DIR",
        help="earlier runs' results JSON (files, or folders of *.json; repeatable): the HTML "
        "report says since when each failure fails and what is new or fixed",
    )
    parser.addini("bootharness_json", "JSON results file", default="")
    parser.addini(
        "bootharness_history", "earlier runs' results files or folders", type="args", default=[]
    )
    parser.addini("bootharness_html", "HTML report file", default="")
    parser.addini("bootharness_bundles", "folder for reproduction bundles", default="")


def settings_from(config: pytest.Config) -> MatrixSettings:
    """Read the options (command line first, then ini).

    Raises:
        pytest.UsageError: a bad number, controller or template, naming the option.
    """

    def pick(option: str, ini: str) -> str:
        value = config.getoption(option)
        return str(value) if value not in (None, "") else str(config.getini(ini) or "")

    def path(option: str, ini: str) -> Path | None:
        text = pick(option, ini)
        return (config.invocation_params.dir / text).resolve() if text else None

    try:
        retries = int(pick("infra_retries", "bootharness_infra_retries") or 1)
    except ValueError as error:
        raise pytest.UsageError(f"--infra-retries / bootharness_infra_retries: {error}") from None
    if retries < 0:
        raise pytest.UsageError(f"--infra-retries {retries}: use 0 or more")
    no_scaling = config.getoption("no_load_scaling")
    settings = MatrixSettings(
        controllers=_split(
            config.getoption("controller") or config.getini("bootharness_controller")
        ),
        templates=_split(config.getoption("template") or config.getini("bootharness_template")),
        infra_retries=retries,
        load_scaling=not no_scaling
        if no_scaling
        else bool(config.getini("bootharness_load_scaling")),
        json_path=path("bootharness_json", "bootharness_json"),
        html_path=path("bootharness_html", "bootharness_html"),
        bundles_dir=path("bootharness_bundles", "bootharness_bundles"),
        history=tuple(
            (config.invocation_params.dir / text).resolve()
            for text in _split(
                config.getoption("bootharness_history") or config.getini("bootharness_history")
            )
        ),
    )
    try:
        select_controllers(settings.controllers)
        select_templates(settings.templates)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from error
    return settings


def _split(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(word for value in values for word in str(value).split(",") if word)


def select_controllers(selectors: Sequence[str]) -> list[Any]:
    """Controllers named by ``selectors`` (``all`` for every one), each once, in table order.

    No selectors selects :data:`DEFAULT_CONTROLLER`.

    Raises:
        ConfigError: unknown names, all listed at once with the known ones.
    """
    from harness import controllers

    known = controllers.CONTROLLERS
    wanted = list(selectors) or [DEFAULT_CONTROLLER]
    if ALL in wanted:
        return list(known.values())
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown disk controller(s) {', '.join(map(repr, unknown))}; "
            f"use {ALL} or any of: {', '.join(known)}"
        )
    return [c for name, c in known.items() if name in wanted]


def select_templates(selectors: Sequence[str]) -> list[str]:
    """Template file names for ``selectors`` (``init.sh`` or ``init.sh.j2``; ``all``).

    Raises:
        ConfigError: unknown templates, listed with the known ones.
    """
    from harness import templates

    known = templates.list_templates()
    if not selectors:
        return [templates.DEFAULT_TEMPLATE]
    if ALL in selectors:
        return known
    chosen: list[str] = []
    unknown: list[str] = []
    for name in selectors:
        full = name if name.endswith(".j2") else f"{name}.j2"
        (chosen if full in known else unknown).append(full)
    if unknown:
        raise ConfigError(
            f"unknown init template(s) {', '.join(map(repr, unknown))}; "
            f"use {ALL} or any of: {', '.join(known)} (folders: $BOOTHARNESS_TEMPLATES)"
        )
    return list(dict.fromkeys(chosen))


class MatrixPlugin:
    """Parametrizes the ``controller`` and ``template`` fixtures (after the kernel)."""

    def __init__(self, settings: MatrixSettings) -> None:
        self.settings = settings

    @pytest.hookimpl(trylast=True)  # after harness.plugin's kernel: ids read kernel-controller
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "controller" in metafunc.fixturenames:
            chosen = select_controllers(self.settings.controllers)
            _parametrize(metafunc, "controller", "controllers", chosen, [c.name for c in chosen])
        if "template" in metafunc.fixturenames:
            names = select_templates(self.settings.templates)
            ids = [name.removesuffix(".j2") for name in names]
            _parametrize(metafunc, "template", "templates", names, ids)


def _parametrize(
    metafunc: pytest.Metafunc, argname: str, marker: str, values: list[Any], ids: list[str]
) -> None:
    mark = metafunc.definition.get_closest_marker(marker)
    if mark is not None:
        wanted = {str(a).removesuffix(".j2") for a in mark.args}
        keep = [i for i, name in enumerate(ids) if name in wanted]
        values, ids = [values[i] for i in keep], [ids[i] for i in keep]
    if not values:
        reason = f"no selected {argname} matches this test's {marker} marker"
        values, ids = [pytest.param(None, marks=pytest.mark.skip(reason=reason))], [f"no-{argname}"]
    metafunc.parametrize(argname, values, ids=ids, indirect=True)


def configure(config: pytest.Config) -> None:
    """Read the settings and register the matrix, recording and results plugins.

    Result files are written by the controller only (the single process, or xdist's
    controller); workers build records and bundles. When a report is asked for, passing
    tests keep their folders so their console logs can be copied at the end.
    """
    from harness import recorder, results
    from harness.plugin import settings_key

    settings = settings_from(config)
    config.stash[matrix_key] = settings
    config.addinivalue_line(
        "markers", "controllers(*names): run this test only on these disk controllers"
    )
    config.addinivalue_line("markers", "templates(*names): run this test only with these templates")
    config.pluginmanager.register(MatrixPlugin(settings), "bootharness-matrix")
    config.pluginmanager.register(recorder.Recorder(settings), "bootharness-recorder")
    wants_files = settings.json_path is not None or settings.html_path is not None
    if wants_files and settings_key in config.stash:
        base = config.stash[settings_key]
        config.stash[settings_key] = dataclasses.replace(base, keep_artifacts=True)
    if wants_files and not hasattr(config, "workerinput"):
        from harness import history

        try:
            # Read now, not after the run: a bad path fails before any boot, not after.
            runs = history.load_runs(settings.history)
        except ConfigError as error:
            raise pytest.UsageError(f"--bootharness-history: {error}") from error
        collector = results.ResultsCollector(settings.json_path, settings.html_path, runs)
        config.pluginmanager.register(collector, "bootharness-results")
