"""The plugin's settings and stash keys: read once per process from options and ini values.

Every other module of the plugin imports its settings and keys from here (the hooks register
the parts; the fixtures, the matrix and the recorder read what the hooks stored), so the
plugin's imports run one way: settings <- fixtures, matrix, recorder, collector <- hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import cache
from harness.image import templates
from harness.kernel.catalogue import Catalogue
from harness.outcome import ConfigError
from harness.report.view import COLUMN_DIMENSIONS
from harness.snapshot.restore import MODES
from harness.storage import bootpaths, controllers
from harness.vm.accel import VALID_REQUESTS
from harness.vm.boot import Vm
from harness.vm.deadlines import Deadlines
from harness.vm.distro import DistroSystem
from harness.vm.kernel_warnings import MODES as WARNING_MODES
from harness.vm.kernel_warnings import WarningPolicy
from harness.vm.kernel_warnings import policy as warning_policy
from harness.vm.sandbox import DEFAULT as DEFAULT_SANDBOX
from harness.vm.sandbox import SANDBOX_CHOICES, Sandbox
from harness.vm.sandbox import from_options as sandbox_from_options


@dataclass(frozen=True)
class Settings:
    """The run's bootharness settings, from command-line options and ini values."""

    kernels_file: str | None
    kernel_selectors: tuple[str, ...]
    accel: str
    deadlines: Deadlines
    keep_artifacts: bool
    cache_dir: Path
    snapshots: str = "off"  # off, auto, shared-ram or stream (harness.snapshot.restore)
    initrd: Path | None = None  # --initrd FILE: the prebuilt image the `initrd` fixture gives
    kernel_warnings: WarningPolicy = field(default_factory=WarningPolicy)  # and allowlists
    sandbox: Sandbox = DEFAULT_SANDBOX  # QEMU's seccomp filter and user (harness.vm.sandbox)
    cache_prune: bool = True  # prune the cache at the end of the run (harness.upkeep)


settings_key = pytest.StashKey[Settings]()
catalogue_key = pytest.StashKey[Catalogue]()
vms_key = pytest.StashKey[list[Vm]]()
passed_key = pytest.StashKey[bool]()


@dataclass(frozen=True)
class MatrixSettings:
    """Matrix choices and report options of the run (in ``config.stash[matrix_key]``)."""

    controllers: tuple[str, ...] = ()
    boot_paths: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    infra_retries: int = 1
    load_scaling: bool = True
    json_path: Path | None = None
    html_path: Path | None = None
    bundles_dir: Path | None = None
    history: tuple[Path, ...] = ()  # earlier runs' results files or folders
    columns: str | None = None  # the dimension the HTML report's columns follow


matrix_key = pytest.StashKey[MatrixSettings]()


settings_key = pytest.StashKey[Settings]()
matrix_key = pytest.StashKey[MatrixSettings]()
catalogue_key = pytest.StashKey[Catalogue]()
vms_key = pytest.StashKey[list[Vm]]()  # a test's VMs, for its report and record
passed_key = pytest.StashKey[bool]()  # the test's call passed: its folder may go
distro_key = pytest.StashKey[DistroSystem]()  # the system a test's distro_boot() booted


def option_or_ini(config: pytest.Config, option: str, ini: str) -> str:
    """The command-line option when given, else the ini value, else ``""``."""
    value = config.getoption(option)
    return str(value) if value not in (None, "") else str(config.getini(ini) or "")


def read_settings(config: pytest.Config) -> Settings:
    """The run's settings from its options and ini values.

    Raises:
        pytest.UsageError: a bad accelerator, snapshot mode or number, naming the option.
    """

    def pick(option: str, ini: str) -> str:
        return option_or_ini(config, option, ini)

    accel = pick("accel", "bootharness_accel") or "auto"
    if accel not in VALID_REQUESTS:
        raise pytest.UsageError(
            f"bootharness_accel = {accel!r}: use one of {', '.join(VALID_REQUESTS)}"
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
    if snapshots not in MODES:
        raise pytest.UsageError(
            f"bootharness_snapshots = {snapshots!r}: use one of {', '.join(MODES)}"
        )
    mode = pick("kernel_warnings", "bootharness_kernel_warnings") or "report"
    if mode not in WARNING_MODES:
        raise pytest.UsageError(
            f"--kernel-warnings / bootharness_kernel_warnings = {mode!r}: use one of "
            f"{', '.join(WARNING_MODES)}"
        )
    allowlists = config.getoption("kernel_warnings_allowlist") or config.getini(
        "bootharness_kernel_warnings_allowlist"
    )
    try:
        policy = warning_policy(
            mode, [config.invocation_params.dir / str(path) for path in allowlists]
        )
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from error
    sandbox_mode = pick("qemu_sandbox", "bootharness_qemu_sandbox") or "on"
    if sandbox_mode not in SANDBOX_CHOICES:
        raise pytest.UsageError(
            f"bootharness_qemu_sandbox = {sandbox_mode!r}: use one of {', '.join(SANDBOX_CHOICES)}"
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
        initrd=_initrd(pick("initrd", "bootharness_initrd")),
        kernel_warnings=policy,
        sandbox=sandbox_from_options(
            sandbox_mode, pick("qemu_user", "bootharness_qemu_user") or None
        ),
        cache_prune=not config.getoption("no_cache_prune")
        and bool(config.getini("bootharness_cache_prune")),
    )


def _initrd(value: str) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise pytest.UsageError(f"--initrd {value}: no such file")
    return path


def read_matrix_settings(config: pytest.Config) -> MatrixSettings:
    """Read the options (command line first, then ini).

    Raises:
        pytest.UsageError: a bad number, controller or template, naming the option.
    """

    def pick(option: str, ini: str) -> str:
        return option_or_ini(config, option, ini)

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
    columns = pick("bootharness_columns", "bootharness_columns") or None
    if columns is not None and columns not in COLUMN_DIMENSIONS:
        raise pytest.UsageError(
            f"bootharness_columns = {columns!r}: use one of {', '.join(COLUMN_DIMENSIONS)}"
        )
    settings = MatrixSettings(
        controllers=split_values(
            config.getoption("controller") or config.getini("bootharness_controller")
        ),
        boot_paths=split_values(
            config.getoption("boot_path") or config.getini("bootharness_boot_path")
        ),
        templates=split_values(
            config.getoption("template") or config.getini("bootharness_template")
        ),
        infra_retries=retries,
        load_scaling=not no_scaling
        if no_scaling
        else bool(config.getini("bootharness_load_scaling")),
        json_path=path("bootharness_json", "bootharness_json"),
        html_path=path("bootharness_html", "bootharness_html"),
        bundles_dir=path("bootharness_bundles", "bootharness_bundles"),
        history=tuple(
            (config.invocation_params.dir / text).resolve()
            for text in split_values(
                config.getoption("bootharness_history") or config.getini("bootharness_history")
            )
        ),
        columns=columns,
    )
    try:
        controllers.select(settings.controllers)
        bootpaths.select(settings.boot_paths)
        templates.select(settings.templates)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from error
    return settings


def split_values(values: Sequence[str]) -> tuple[str, ...]:
    """Repeatable and comma-separated option values, as one tuple of words."""
    return tuple(word for value in values for word in str(value).split(",") if word)
