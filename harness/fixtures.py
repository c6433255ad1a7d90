"""pytest fixtures: the selected kernel, initramfs builds and booted VMs.

Registered by :mod:`harness.plugin`. ``kernel`` is parametrized by the plugin over the kernels
selected with ``--kernel``, so test ids read ``test_x[debian-6.1-amd64]``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from harness import accel, initramfs, kernels
from harness.boot import Deadlines, Vm, prepare_vm
from harness.config import KernelEntry
from harness.initramfs import Initramfs, InitramfsSpec
from harness.outcome import HarnessError
from harness.templates import DEFAULT_TEMPLATE


class BuildInitramfs(Protocol):
    def __call__(
        self,
        template: str = ...,
        *,
        variables: Mapping[str, Any] | None = ...,
        modules: Sequence[str] = ...,
        files: Mapping[str, Path | bytes] | None = ...,
        compression: str = ...,
    ) -> Initramfs: ...


class BootVm(Protocol):
    def __call__(
        self,
        template: str = ...,
        *,
        variables: Mapping[str, Any] | None = ...,
        modules: Sequence[str] = ...,
        files: Mapping[str, Path | bytes] | None = ...,
        cmdline: str = ...,
        deadlines: Deadlines | None = ...,
        start: bool = ...,
        expected_boots: int = ...,
        **machine_options: Any,
    ) -> Vm: ...


def _spec(
    template: str,
    variables: Mapping[str, Any] | None,
    modules: Sequence[str],
    files: Mapping[str, Path | bytes] | None,
    compression: str = "gzip",
) -> InitramfsSpec:
    return InitramfsSpec(
        template=template,
        variables=dict(variables or {}),
        modules=tuple(modules),
        files=dict(files or {}),
        compression=compression,
    )


def _settings(request: pytest.FixtureRequest) -> Any:
    from harness.plugin import settings_key

    return request.config.stash[settings_key]


@pytest.fixture(scope="session")
def bootharness_accel(request: pytest.FixtureRequest) -> accel.AccelChoice:
    """The accelerator for this run: probed once (KVM only if it really works)."""
    settings = _settings(request)
    return accel.choose_accelerator(settings.accel, cache_dir=settings.cache_dir / "accel")


@pytest.fixture(scope="session")
def kernel(request: pytest.FixtureRequest) -> kernels.Kernel:
    """The kernel under test, provisioned into the cache (parametrized by the plugin)."""
    entry = request.param
    if not isinstance(entry, KernelEntry):
        raise pytest.UsageError("the kernel fixture is parametrized by the bootharness plugin")
    try:
        return kernels.provision(entry, _settings(request).cache_dir)
    except HarnessError as error:
        pytest.fail(f"cannot provision kernel {entry.name!r}: {error}", pytrace=False)


@pytest.fixture
def build_initramfs(request: pytest.FixtureRequest, kernel: kernels.Kernel) -> BuildInitramfs:
    """Build an initramfs for the kernel under test from a template (cached by content)."""
    cache_dir = _settings(request).cache_dir

    def build(
        template: str = DEFAULT_TEMPLATE,
        *,
        variables: Mapping[str, Any] | None = None,
        modules: Sequence[str] = (),
        files: Mapping[str, Path | bytes] | None = None,
        compression: str = "gzip",
    ) -> Initramfs:
        spec = _spec(template, variables, modules, files, compression)
        return initramfs.build(kernel, spec, cache_dir)

    return build


@pytest.fixture
def bootharness_workdir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A private folder for this test's VMs: console logs, QEMU argv and stderr, QMP events.

    Removed after a passing test unless --keep-artifacts; a failed test always keeps it.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:60]
    workdir = tmp_path_factory.mktemp(f"bh-{name}", numbered=True)
    yield workdir
    from harness.plugin import passed_key

    if request.node.stash.get(passed_key, False) and not _settings(request).keep_artifacts:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def boot(
    request: pytest.FixtureRequest,
    kernel: kernels.Kernel,
    bootharness_accel: accel.AccelChoice,
    bootharness_workdir: Path,
) -> Iterator[BootVm]:
    """Boot VMs for the kernel under test; every VM is stopped when the test ends.

    ``boot(...)`` builds the initramfs from the template and returns a :class:`Vm` whose
    kernel has started /init (``start=False`` returns it before launching QEMU).
    """
    from harness.plugin import vms_key

    settings = _settings(request)
    vms: list[Vm] = []
    request.node.stash[vms_key] = vms

    def start_vm(
        template: str = DEFAULT_TEMPLATE,
        *,
        variables: Mapping[str, Any] | None = None,
        modules: Sequence[str] = (),
        files: Mapping[str, Path | bytes] | None = None,
        cmdline: str = "",
        deadlines: Deadlines | None = None,
        start: bool = True,
        expected_boots: int = 1,
        **machine_options: Any,
    ) -> Vm:
        spec = _spec(template, variables, modules, files)
        chosen = deadlines or settings.deadlines
        if deadlines is not None and settings.deadlines.multiplier != 1.0:
            chosen = deadlines.scaled(settings.deadlines.multiplier)
        vm = prepare_vm(
            kernel,
            spec,
            cache_root=settings.cache_dir,
            workdir=bootharness_workdir / f"vm{len(vms)}",
            accel=bootharness_accel.name,
            deadlines=chosen,
            cmdline=cmdline,
            expected_boots=expected_boots,
            **machine_options,
        )
        vms.append(vm)
        if start:
            vm.start()
        return vm

    yield start_vm
    for vm in vms:
        vm.stop()
