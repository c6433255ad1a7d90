"""The test matrix beyond kernels: controllers and init templates, and the run's report options.

Controllers, boot paths and templates are chosen like kernels: ``--controller NAME``
(repeatable, or comma-separated, or ``all``), ``--boot-path NAME`` and ``--template NAME``, with
ini equivalents, and tests that use the ``controller``, ``boot_path`` or ``template`` fixture
are parametrized over the choice. The kernel is parametrized first (by
:mod:`harness.plugin.hooks`), so ids read ``test_root_switch[debian-6.1-amd64-ahci-bios-grub]``,
and ``-k ahci`` or a node id picks cells.

Also here: the options of retries (:mod:`harness.plugin.recorder`), load-scaled deadlines
(:mod:`harness.vm.loadscale`) and the result files (:mod:`harness.report.model`), and
:func:`configure`, which registers those plugins in the right processes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from harness.image import templates
from harness.plugin.settings import MatrixSettings
from harness.report.view import COLUMN_DIMENSIONS
from harness.storage import bootpaths, controllers

log = logging.getLogger(__name__)


def add_options(group: Any, parser: pytest.Parser) -> None:
    """Add the matrix and report options to the plugin's option group and the ini file."""
    group.addoption(
        "--controller",
        action="append",
        default=[],
        metavar="NAME|all",
        help=f"disk controller(s) for tests using the controller fixture (repeatable or "
        f"comma-separated; default: {controllers.DEFAULT_CONTROLLER})",
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
    group.addoption(
        "--boot-path",
        action="append",
        default=[],
        metavar="NAME|all",
        help="boot path(s) for tests using the boot_path fixture: "
        f"{', '.join(bootpaths.BOOT_PATHS)} (repeatable or comma-separated; "
        f"default: {bootpaths.DEFAULT_BOOT_PATH})",
    )
    parser.addini("bootharness_boot_path", "default boot path(s)", type="args", default=[])
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
    group.addoption(
        "--bootharness-columns",
        choices=COLUMN_DIMENSIONS,
        help="the dimension the HTML report's columns follow (default: the one the run "
        "varies most)",
    )
    parser.addini("bootharness_columns", "HTML report columns: a dimension", default="")
    parser.addini("bootharness_bundles", "folder for reproduction bundles", default="")


class MatrixPlugin:
    """Parametrizes the ``controller`` and ``template`` fixtures (after the kernel)."""

    def __init__(self, settings: MatrixSettings) -> None:
        self.settings = settings

    @pytest.hookimpl(
        trylast=True
    )  # after harness.plugin.hooks's kernel: ids read kernel-controller
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "controller" in metafunc.fixturenames:
            chosen = controllers.select(self.settings.controllers)
            _parametrize(metafunc, "controller", "controllers", chosen, [c.name for c in chosen])
        if "boot_path" in metafunc.fixturenames:
            paths = self._boot_paths(metafunc)
            _parametrize(metafunc, "boot_path", "boot_paths", paths, [p.name for p in paths])
        if "template" in metafunc.fixturenames:
            names = templates.select(self.settings.templates)
            ids = [name.removesuffix(".j2") for name in names]
            _parametrize(metafunc, "template", "templates", names, ids)

    def _boot_paths(self, metafunc: pytest.Metafunc) -> list[bootpaths.BootPath]:
        """The chosen boot paths; ``boot_paths(..., widen=True)`` without ``--boot-path``
        runs every path the marker names (``all``: every path), not just the default."""
        mark = metafunc.definition.get_closest_marker("boot_paths")
        widen = mark is not None and bool(mark.kwargs.get("widen"))
        if widen and not self.settings.boot_paths:
            return bootpaths.select([bootpaths.ALL])
        return bootpaths.select(self.settings.boot_paths)


def _parametrize(
    metafunc: pytest.Metafunc, argname: str, marker: str, values: list[Any], ids: list[str]
) -> None:
    mark = metafunc.definition.get_closest_marker(marker)
    if mark is not None and "all" not in mark.args:
        wanted = {str(a).removesuffix(".j2") for a in mark.args}
        keep = [i for i, name in enumerate(ids) if name in wanted]
        values, ids = [values[i] for i in keep], [ids[i] for i in keep]
    if not values:
        reason = f"no selected {argname} matches this test's {marker} marker"
        values, ids = [pytest.param(None, marks=pytest.mark.skip(reason=reason))], [f"no-{argname}"]
    metafunc.parametrize(argname, values, ids=ids, indirect=True)
