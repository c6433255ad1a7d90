"""pytest fixtures: the selected kernel, initramfs builds and booted VMs.

Registered by :mod:`harness.plugin.hooks`. ``kernel`` is parametrized by the plugin over the kernels
selected with ``--kernel``, so test ids read ``test_x[debian-6.1-amd64]``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import pytest

from harness.image import initramfs
from harness.image.bootdisk import Menu
from harness.image.distro import GeneratorConfig
from harness.image.foreign import OverlayFiles
from harness.image.initramfs import Initramfs, InitramfsSpec
from harness.image.templates import DEFAULT_TEMPLATE
from harness.kernel import capabilities
from harness.kernel import provision as kernels
from harness.kernel.catalogue import KernelEntry
from harness.outcome import ConfigError, HarnessError
from harness.plugin import kernel_warnings
from harness.plugin.settings import (
    Settings,
    matrix_key,
    passed_key,
    settings_key,
    vms_key,
)
from harness.snapshot import restore as snapshots
from harness.snapshot import spare
from harness.storage import attach as storage
from harness.storage import bootpaths, controllers
from harness.storage.bootpaths import BootPath, BootSpec
from harness.storage.controllers import Disk
from harness.storage.layouts import LayoutSpec
from harness.vm import accel, distro, loadscale
from harness.vm.boot import BootRequest, Vm, prepare_vm
from harness.vm.deadlines import Deadlines
from harness.vm.login import SUCCESS_PATTERNS
from harness.vm.patterns import ConsoleVerdict
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
        template_dirs: Sequence[Path] = ...,
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
        initrd: Path | None = ...,
        root: str | None = ...,
        expect: Sequence[str] = ...,
        fail: Sequence[str] = ...,
        markers: bool | None = ...,
        root_failures: bool | None = ...,
        overlay: OverlayFiles | None = ...,
        template_dirs: Sequence[Path] = ...,
        boot_path: str | BootPath | None = ...,
        boot_controller: str = ...,
        menu: Menu | None = ...,
        entry: int | str | None = ...,
        select: str = ...,
        boot_files: Mapping[str, Path] | None = ...,
        layout: str = ...,
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


@pytest.fixture(scope="session")
def initrd(request: pytest.FixtureRequest) -> Path:
    """The prebuilt initrd under test, from ``--initrd FILE`` (ini ``bootharness_initrd``);
    ``bootharness bisect --initrds ... --pytest NODEID`` gives each candidate this way. A test
    that takes it is skipped when no image was given."""
    path = _settings(request).initrd
    if path is None:
        pytest.skip("no --initrd FILE given")
    return path


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
        template_dirs: Sequence[Path] = (),
    ) -> Initramfs:
        spec = _spec(template, variables, modules, files, compression)
        spec = replace(spec, template_dirs=tuple(template_dirs))
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

    ``initrd=PATH`` boots a prebuilt image instead (no template, modules or files; the
    disks' drivers are not added: the image must bring its own). ``root=`` is the kernel's
    ``root=`` for a prebuilt image and the template's ``root`` variable otherwise.
    ``expect``/``fail`` are console regexes (:mod:`harness.vm.patterns`): without markers
    (``markers=False``, the default for ``initrd`` and for templates declaring
    ``{# bootharness: markers=off #}``) the expect patterns in order are success and the
    fail patterns plus the shipped root-failure table (``root_failures``) are TEST_FAIL.
    ``overlay`` appends an archive of files to the image (:func:`harness.image.foreign.overlay`).

    The boot path is ``boot_path=`` (a name or :class:`~harness.storage.bootpaths.BootPath`),
    else the ``boot_path`` fixture's when the test uses it, else the only name of a
    ``boot_paths`` marker, else ``pvh``. Through a disk (bios-grub, uefi-grub, uefi-stub) the
    boot disk hangs off ``boot_controller`` (its driver joins the initramfs: the guest sees
    the disk it booted from), ``menu=`` replaces the one-entry GRUB menu, ``entry=`` (index
    or title) picks what boots, ``select="keys"`` types the choice at GRUB's menu instead of
    making it the default, and ``boot_files=`` adds files (guest path -> host file). A kernel
    the path cannot boot (uefi-stub without CONFIG_EFI_STUB) skips the test with the reason.

    ``layout`` names how the root sits on the disks, for reports (``gpt+lvm``...).
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
        initrd: Path | None = None,
        root: str | None = None,
        expect: Sequence[str] = (),
        fail: Sequence[str] = (),
        markers: bool | None = None,
        root_failures: bool | None = None,
        overlay: OverlayFiles | None = None,
        template_dirs: Sequence[Path] = (),
        boot_path: str | BootPath | None = None,
        boot_controller: str = bootpaths.DEFAULT_BOOT_CONTROLLER,
        menu: Menu | None = None,
        entry: int | str | None = None,
        select: str = bootpaths.SELECT_DEFAULT,
        boot_files: Mapping[str, Path] | None = None,
        layout: str = "",
        **machine_options: Any,
    ) -> Vm:
        vm_dir = bootharness_workdir / f"vm{len(vms)}"
        path = _chosen_boot_path(request, boot_path)
        lacking_path = bootpaths.lacks_reason(path, kernel)
        if lacking_path is not None:
            pytest.skip(lacking_path)
        boot_spec = BootSpec(
            path,
            controller=boot_controller,
            menu=menu,
            entry=entry,
            select=select,
            files=dict(boot_files or {}),
        )
        if not path.direct and initrd is None:
            # The guest sees the disk it booted from: its controller's driver joins our
            # initramfs (a kernel without it skips the test, as for any disk).
            boot_ctl = controllers.get(boot_controller)
            lacking = capabilities.lacks_reason(
                kernel, {f"boot disk controller {boot_ctl.name}": boot_ctl.config}
            )
            if lacking is not None:
                pytest.skip(lacking)
            modules = (*boot_ctl.modules, *modules)
        disk_setup = None
        if initrd is not None:
            if template != DEFAULT_TEMPLATE or variables or modules or files:
                raise ConfigError(
                    "boot(initrd=...) boots a prebuilt image as it is: template, variables, "
                    "modules and files do not apply (use overlay= to add files to it)"
                )
            if root is not None:
                cmdline = f"root={root} {cmdline}".strip()
        elif root is not None:
            variables = {**(variables or {}), "root": root}
        if disks:
            # Controllers' drivers (and the root's file system) join the initramfs by
            # themselves; a kernel without them skips the test with the reason.
            disk_setup = storage.plan(
                disks, machine=str(machine_options.get("machine", "pc")), variables=variables
            )
            if layout:
                disk_setup = replace(disk_setup, layout=layout)
            lacking = capabilities.lacks_reason(kernel, disk_setup.requirements)
            if lacking is not None:
                pytest.skip(lacking)
            if initrd is None:
                modules = (*disk_setup.modules, *modules)
        chosen = deadlines or settings.deadlines
        if deadlines is not None and settings.deadlines.multiplier != 1.0:
            chosen = deadlines.scaled(settings.deadlines.multiplier)
        # A loaded machine (xdist, a shared runner) slows the guest, not the deadline: stretch
        # the run's deadlines by the load at start. A test's own Deadlines are its measure.
        load = _load_factor(request) if deadlines is None else 1.0
        boot_request = BootRequest(
            kernel=kernel,
            initramfs=replace(
                _spec(template, variables, modules, files), template_dirs=tuple(template_dirs)
            ),
            accel=bootharness_accel.name,
            deadlines=chosen.scaled(load) if load != 1.0 else chosen,
            cmdline=cmdline,
            expected_boots=expected_boots,
            storage=disk_setup,
            load_factor=load,
            machine_options={"sandbox": settings.sandbox, **machine_options},
            initrd=Path(initrd) if initrd is not None else None,
            overlay=dict(overlay or {}),
            verdict=ConsoleVerdict(tuple(expect), tuple(fail), root_failures),
            markers=markers,
            boot=boot_spec,
            kernel_warnings=kernel_warnings.policy_for(request.node, settings),
        )
        # Snapshots (harness/snapshot/restore.py): every restore attaches its own overlays.
        # They resume at our init's ready point, which an init without markers has not; a
        # restored guest skips its firmware and loader: boot paths through them boot cold.
        mode = _snapshot_mode(request, settings, snapshot) if path.direct else "off"
        if mode != "off" and not boot_request.prints_markers:
            if snapshot:
                raise ConfigError(
                    "snapshots need the harness's init (its ready point); this boot's init "
                    "prints no markers: boot it cold (snapshot=False)"
                )
            mode = "off"
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


def _chosen_boot_path(request: pytest.FixtureRequest, asked: str | BootPath | None) -> BootPath:
    """``boot(boot_path=...)``, else the ``boot_path`` fixture's, else a one-name
    ``boot_paths`` marker's, else the default (pvh)."""
    try:
        if asked is not None:
            return bootpaths.get(asked)
        if "boot_path" in request.fixturenames:
            chosen = request.getfixturevalue("boot_path")
            if isinstance(chosen, BootPath):
                return chosen
        marker = request.node.get_closest_marker("boot_paths")
        if marker is not None and len(marker.args) == 1 and marker.args[0] != bootpaths.ALL:
            return bootpaths.get(str(marker.args[0]))
    except ConfigError as error:
        raise pytest.UsageError(f"{request.node.nodeid}: {error}") from error
    return bootpaths.get(bootpaths.DEFAULT_BOOT_PATH)


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
def boot_path(request: pytest.FixtureRequest) -> BootPath:
    """The boot path under test (a :class:`harness.storage.bootpaths.BootPath`), parametrized
    over ``--boot-path NAME|all`` (default: pvh); ids show its name. ``boot(...)`` boots
    through it unless told otherwise."""
    if getattr(request, "param", None) is None:
        pytest.skip("no boot path selected")
    chosen = request.param
    assert isinstance(chosen, BootPath)
    return chosen


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


class DistroBoot(Protocol):
    def __call__(
        self,
        generator: str = ...,
        layout: str | LayoutSpec = ...,
        *,
        controllers: Sequence[str] = ...,
        files: Mapping[str, bytes] | None = ...,
        keyfile: bool = ...,
        cmdline: str = ...,
        expect: Sequence[str] = ...,
        fail: Sequence[str] = ...,
        config: GeneratorConfig | None = ...,
        members: Sequence[int] | None = ...,
        start: bool = ...,
        **boot_options: Any,
    ) -> Vm: ...


@pytest.fixture
def distro_boot(
    request: pytest.FixtureRequest,
    kernel: kernels.Kernel,
    bootharness_accel: accel.AccelChoice,
    boot: BootVm,
) -> DistroBoot:
    """Boot a real Debian system on the kernel under test (see :mod:`harness.vm.distro`).

    ``distro_boot("dracut", "lvm", controllers=("ahci",))`` builds (or takes from the cache)
    the root, the generator's initramfs, the root image and the layout, and boots them: the
    layout's disks on ``controllers`` (RAID1 members one per controller), the command line
    the generator needs, the login prompt as success and systemd's failure lines as
    TEST_FAIL. ``vm.login()`` then types the LUKS passphrase when asked and returns a shell
    (``.run(cmd)`` gives output and exit status). ``keyfile=True`` unlocks LUKS with the
    layout's key file appended to the image instead. ``files`` go into the root image (an
    fstab naming a missing device...). ``members`` picks which of the layout's disks are
    attached (``(0,)``: a RAID1 with its second disk removed). Other options go to ``boot``.
    Skipped when the
    harness does not run as root (chroot and mounts build the pieces).
    """
    settings = _settings(request)

    def start_vm(
        generator: str = "initramfs-tools",
        layout: str | LayoutSpec = "disk",
        *,
        controllers: Sequence[str] = distro.DEFAULT_CONTROLLERS,
        files: Mapping[str, bytes] | None = None,
        keyfile: bool = False,
        cmdline: str = "",
        expect: Sequence[str] = SUCCESS_PATTERNS,
        fail: Sequence[str] = (),
        config: GeneratorConfig | None = None,
        members: Sequence[int] | None = None,
        start: bool = True,
        **boot_options: Any,
    ) -> Vm:
        if os.geteuid() != 0:
            pytest.skip("distro boots build roots and images with chroot and mounts: need root")
        system = distro.prepare(
            kernel,
            settings.cache_dir,
            generator=generator,
            layout=layout,
            config=config,
            files=files,
            accel=bootharness_accel.name,
        )
        # Scaled here by the load like the run's own deadlines (boot() leaves a test's own
        # deadlines as they are).
        deadlines = boot_options.pop("deadlines", None) or distro.DEADLINES.scaled(
            _load_factor(request)
        )
        boot_options.setdefault("memory_mb", distro.MEMORY_MB)
        boot_options.setdefault("extra_args", distro.MACHINE_ARGS)
        disks = system.disks(controllers)
        if members is not None:  # a layout with members left out (a degraded RAID1)
            disks = [disks[i] for i in members]
        vm = boot(
            initrd=system.initramfs.path,
            disks=disks,
            cmdline=f"{system.cmdline(keyfile=keyfile)} {cmdline}".strip(),
            expect=expect,
            fail=fail,
            overlay=system.keyfile_overlay() if keyfile else None,
            deadlines=deadlines,
            layout=system.layout_dimension,
            start=start,
            **boot_options,
        )
        vm.passphrase = None if keyfile else system.passphrase
        return vm

    return start_vm
