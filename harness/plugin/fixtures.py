"""pytest fixtures: the selected kernel, initramfs builds and booted VMs.

Registered by :mod:`harness.plugin.hooks`. ``kernel`` is parametrized by the plugin over the kernels
selected with ``--kernel``, so test ids read ``test_x[debian-6.1-amd64]``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from harness.image import initramfs
from harness.image.initramfs import Initramfs, InitramfsSpec
from harness.image.templates import DEFAULT_TEMPLATE
from harness.kernel import capabilities
from harness.kernel import provision as kernels
from harness.kernel.catalogue import KernelEntry
from harness.outcome import HarnessError
from harness.plugin.settings import Settings, matrix_key, passed_key, settings_key, vms_key
from harness.snapshot import restore as snapshots
from harness.snapshot import spare
from harness.storage import attach as storage
from harness.storage.controllers import Disk
from harness.vm import accel, loadscale
from harness.vm.boot import BootRequest, Vm, prepare_vm
from harness.vm.deadlines import Deadlines
from harness.vm.shell import GuestShell


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
        disks: Sequence[Disk] = ...,
        snapshot: bool | str | None = ...,
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


def _settings(request: pytest.FixtureRequest) -> Settings:
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


@pytest.fixture(autouse=True)
def _bootharness_kernel_config(request: pytest.FixtureRequest) -> None:
    """Skip a test marked ``kernel_config(*options)`` when its kernel lacks one of them."""
    marker = request.node.get_closest_marker(capabilities.MARKER)
    if marker is None or "kernel" not in request.fixturenames:
        return
    kernel_under_test = request.getfixturevalue("kernel")
    capabilities.require_config(kernel_under_test, *(str(o) for o in marker.args))


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
    if request.node.stash.get(passed_key, False) and not _settings(request).keep_artifacts:
        shutil.rmtree(workdir, ignore_errors=True)


def _snapshot_mode(
    request: pytest.FixtureRequest, settings: Settings, asked: bool | str | None
) -> str:
    """``off``, or the snapshot mechanism a VM starts with: ``boot(snapshot=...)`` first,
    then the ``cold_boot`` and ``snapshot`` markers, then ``--snapshots``."""
    chosen = settings.snapshots
    default = chosen if chosen != "off" else snapshots.AUTO
    if asked is False:
        return "off"
    if asked is True:
        return default
    if isinstance(asked, str):
        mode = asked
    elif request.node.get_closest_marker("cold_boot") is not None:
        return "off"
    elif (marker := request.node.get_closest_marker("snapshot")) is not None:
        mode = str(marker.kwargs.get("mechanism", marker.args[0] if marker.args else default))
    else:
        return chosen
    if mode not in snapshots.MODES:
        raise pytest.UsageError(
            f"{request.node.nodeid}: snapshot mechanism {mode!r}: use one of "
            f"{', '.join(snapshots.MODES)}"
        )
    return mode


@pytest.fixture(scope="session")
def bootharness_spares(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where spare QEMUs wait for the next restore of a snapshot (see
    :mod:`harness.snapshot.spare`): next to the tests' folders, so a spare's files move into
    the test that takes it; the last spare is stopped when the session ends."""
    yield tmp_path_factory.mktemp("spares")
    spare.discard()


@pytest.fixture
def boot(
    request: pytest.FixtureRequest,
    kernel: kernels.Kernel,
    bootharness_accel: accel.AccelChoice,
    bootharness_workdir: Path,
    bootharness_spares: Path,
) -> Iterator[BootVm]:
    """Boot VMs for the kernel under test; every VM is stopped when the test ends.

    ``boot(...)`` builds the initramfs from the template and returns a :class:`Vm` whose
    kernel has started /init (``start=False`` returns it before launching QEMU).
    """
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
        disks: Sequence[Disk] = (),
        snapshot: bool | str | None = None,
        **machine_options: Any,
    ) -> Vm:
        vm_dir = bootharness_workdir / f"vm{len(vms)}"
        disk_setup = None
        if disks:
            # Controllers' drivers (and the root's file system) join the initramfs by
            # themselves; a kernel without them skips the test with the reason.
            disk_setup = storage.plan(
                disks, machine=str(machine_options.get("machine", "pc")), variables=variables
            )
            lacking = capabilities.lacks_reason(kernel, disk_setup.requirements)
            if lacking is not None:
                pytest.skip(lacking)
            modules = (*disk_setup.modules, *modules)
        chosen = deadlines or settings.deadlines
        if deadlines is not None and settings.deadlines.multiplier != 1.0:
            chosen = deadlines.scaled(settings.deadlines.multiplier)
        # A loaded machine (xdist, a shared runner) slows the guest, not the deadline: stretch
        # the run's deadlines by the load at start. A test's own Deadlines are its measure.
        load = _load_factor(request) if deadlines is None else 1.0
        boot_request = BootRequest(
            kernel=kernel,
            initramfs=_spec(template, variables, modules, files),
            accel=bootharness_accel.name,
            deadlines=chosen.scaled(load) if load != 1.0 else chosen,
            cmdline=cmdline,
            expected_boots=expected_boots,
            storage=disk_setup,
            load_factor=load,
            machine_options=machine_options,
        )
        # Snapshots (harness/snapshot/restore.py): every restore attaches its own overlays.
        mode = _snapshot_mode(request, settings, snapshot)
        if mode != "off":
            vm = snapshots.prepare_vm(
                boot_request,
                cache_root=settings.cache_dir,
                workdir=vm_dir,
                mechanism=mode,
                spares=bootharness_spares,
            )
        else:
            vm = prepare_vm(boot_request, cache_root=settings.cache_dir, workdir=vm_dir)
        vms.append(vm)
        if start:
            vm.start()
        return vm

    yield start_vm
    for vm in vms:
        vm.stop()


def _load_factor(request: pytest.FixtureRequest) -> float:
    matrix_settings = request.config.stash.get(matrix_key, None)
    if matrix_settings is not None and not matrix_settings.load_scaling:
        return 1.0
    return loadscale.load_factor()


@pytest.fixture
def controller(request: pytest.FixtureRequest) -> Any:
    """The disk controller under test (a :class:`harness.storage.controllers.Controller`),
    parametrized over ``--controller NAME|all`` (default: virtio-blk); ids show its name."""
    if getattr(request, "param", None) is None:
        pytest.skip("no controller selected")
    return request.param


@pytest.fixture
def template(request: pytest.FixtureRequest) -> str:
    """The init template under test (file name), parametrized over ``--template NAME|all``."""
    if getattr(request, "param", None) is None:
        pytest.skip("no template selected")
    return str(request.param)


class GuestFactory(Protocol):
    def __call__(
        self, *, variables: Mapping[str, Any] | None = ..., **boot_options: Any
    ) -> GuestShell: ...


@pytest.fixture
def guest(boot: BootVm) -> GuestFactory:
    """Boot a guest whose init ends in a shell and return that shell, attached.

    ``guest(**boot_options)`` takes what ``boot`` takes; ``after="shell"`` is set unless the
    variables say otherwise. Returns a :class:`harness.vm.shell.GuestShell` (its VM is
    ``.vm``): ``guest().run("cat /proc/mounts")``.
    """

    def start(*, variables: Mapping[str, Any] | None = None, **boot_options: Any) -> GuestShell:
        merged = {"after": "shell", **(variables or {})}
        return boot(variables=merged, **boot_options).shell()

    return start
