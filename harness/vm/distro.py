"""A real system to boot: a Debian root, its generator's initramfs and a disk layout, together.

:func:`prepare` assembles what one distro boot needs, each piece from the cache when it is
there: the root folder (:func:`harness.image.distro.build_root`), the initramfs the chosen
generator makes inside it for the kernel (:func:`harness.image.distro.generate`), the root
file system image with the kernel's modules (:func:`harness.storage.layouts.root_image`) and
the layout around it (:func:`harness.storage.layouts.build`, with :mod:`harness.vm.builder`
for the layouts a guest must make). :class:`DistroSystem` then says how to boot it: the disks
on the test's controllers, the kernel command line the generator needs for the layout, the
passphrase to type, the key file to add to the image.

A second :func:`prepare` of the same inputs builds nothing (:attr:`DistroSystem.built`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.image import distro
from harness.image.distro import DistroInitramfs, DistroRoot, GeneratorConfig, RootSpec
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.storage import attach, layouts
from harness.storage.controllers import Disk
from harness.storage.layouts import KEYFILE_PATH, Layout, LayoutSpec, RootImage
from harness.vm import builder
from harness.vm.boot import BootRequest
from harness.vm.deadlines import Deadlines
from harness.vm.login import SUCCESS_PATTERNS
from harness.vm.patterns import ConsoleVerdict

log = logging.getLogger(__name__)

# A systemd boot under TCG takes a minute on an idle machine, several on a loaded one;
# `systemctl is-system-running --wait` may wait for the last units.
DEADLINES = Deadlines(kernel=90.0, init=600.0, shutdown=60.0, command=300.0)
MEMORY_MB = 1024
# Added to every distro boot's command line:
# - no_timer_check: on a loaded host the kernel's IO-APIC timer check can fail and panic
#   ("IO-APIC + timer doesn't work!") although the timer works;
# - systemd (PID 1) logs its warnings and errors to the kernel log, hence to the console, for
#   the whole boot (by default only until journald starts): its status lines cut unit names to
#   80 columns ("[FAILED] Failed to start systemd-cr…"), its log lines name them in full
#   ("systemd[1]: Failed to start systemd-cryptsetup@luks\x2d....service - ..."), and
#   printk.devkmsg=on keeps the kernel from rate-limiting them.
CMDLINE = "no_timer_check systemd.log_target=kmsg systemd.log_level=warning printk.devkmsg=on"
DEFAULT_CONTROLLERS = ("ahci",)


@dataclass(frozen=True)
class DistroSystem:
    """Everything one distro boot needs, built."""

    kernel: Kernel
    root: DistroRoot
    initramfs: DistroInitramfs
    image: RootImage
    layout: Layout
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds per piece built

    @property
    def generator(self) -> str:
        return self.initramfs.generator

    @property
    def built(self) -> tuple[str, ...]:
        """The pieces this prepare() had to build (empty on a warm cache)."""
        return tuple(name for name, seconds in self.timings.items() if seconds > 0)

    @property
    def passphrase(self) -> str | None:
        return self.layout.passphrase

    @property
    def layout_dimension(self) -> str:
        """The layout as reports name it: "" (whole disk), ``mbr``, ``gpt``, ``gpt+lvm``..."""
        name = self.layout.name
        if name == "disk":
            return ""
        if name in layouts.GUEST_LAYOUTS:
            return f"gpt+{name}"
        return name

    def disks(self, controllers: Sequence[str] = DEFAULT_CONTROLLERS) -> list[Disk]:
        """The layout's disks on ``controllers``: member ``i`` on ``controllers[i]`` (the
        last one for the members beyond), so a RAID1 spans two controllers when given two.

        Raises:
            ConfigError: no controller given.
        """
        if not controllers:
            raise ConfigError("a distro boot needs at least one disk controller")
        chosen = list(controllers)
        return [
            Disk(image, chosen[min(i, len(chosen) - 1)])
            for i, image in enumerate(self.layout.disks)
        ]

    def cmdline(self, *, keyfile: bool = False) -> str:
        """The kernel command line: the generator's root arguments for the layout, plus
        :data:`CMDLINE`."""
        return f"{self.layout.cmdline(self.generator, keyfile=keyfile)} {CMDLINE}"

    def boot_request(
        self,
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        *,
        keyfile: bool = False,
        cmdline: str = "",
        accel: str = "tcg",
        deadlines: Deadlines = DEADLINES,
        expect: Sequence[str] = SUCCESS_PATTERNS,
        fail: Sequence[str] = (),
    ) -> BootRequest:
        """A boot of this system outside pytest (the ``distro_boot`` fixture does the same
        through ``boot``): its disks on ``controllers``, the login prompt as success.

        Raises:
            ConfigError: no controller, or ``keyfile`` for a layout without one.
        """
        storage = replace(attach.plan(self.disks(controllers)), layout=self.layout_dimension)
        return BootRequest(
            kernel=self.kernel,
            initramfs=InitramfsSpec(),
            accel=accel,
            deadlines=deadlines,
            cmdline=f"{self.cmdline(keyfile=keyfile)} {cmdline}".strip(),
            storage=storage,
            machine_options={"memory_mb": MEMORY_MB},
            initrd=self.initramfs.path,
            overlay=self.keyfile_overlay() if keyfile else {},
            verdict=ConsoleVerdict(tuple(expect), tuple(fail)),
            markers=False,
        )

    def keyfile_overlay(self) -> dict[str, bytes]:
        """The files to append to the initramfs for a key-file unlock (see
        :meth:`~harness.storage.layouts.Layout.cmdline`).

        Raises:
            ConfigError: the layout has no key file.
        """
        if self.layout.keyfile is None:
            raise ConfigError(f"layout {self.layout.name!r} has no key file")
        return {KEYFILE_PATH: self.layout.keyfile.read_bytes()}


def prepare(
    kernel: Kernel,
    cache_root: Path,
    *,
    generator: str = "initramfs-tools",
    layout: str | LayoutSpec = "disk",
    root_spec: RootSpec | None = None,
    config: GeneratorConfig | None = None,
    files: Mapping[str, bytes] | None = None,
    accel: str = "tcg",
    progress: bool | None = None,
) -> DistroSystem:
    """Build (or take from the cache) the root, the initramfs, the root image and the layout.

    ``files`` are put in the root image (an fstab, a unit). ``config`` defaults to the
    generator's defaults. The root holds both generators and the storage tools.

    Raises:
        ConfigError: bad inputs (see the builders), not running as root for a piece that
            must be built.
        DistroBuildError: mmdebstrap or the generator failed.
        LayoutBuildError: the guest building the layout failed.
    """
    config = config or distro.generator_config(generator)
    if config.generator != generator:
        raise ConfigError(f"config is for {config.generator!r}, not {generator!r}")
    spec = layout if isinstance(layout, LayoutSpec) else LayoutSpec(layout)
    spec.validate()
    root = distro.build_root(root_spec or RootSpec(), cache_root, progress=progress)
    initramfs = distro.generate(root, kernel, config, cache_root, progress=progress)
    image = layouts.root_image(root, kernel, cache_root, files=files)
    run_guest = builder.runner(kernel, cache_root, accel=accel)
    built = layouts.build(spec, image, cache_root, run_guest=run_guest)
    timings = {
        "root": root.seconds,
        "initramfs": initramfs.seconds,
        "root image": image.seconds,
        "layout": built.seconds,
    }
    system = DistroSystem(kernel, root, initramfs, image, built, timings)
    if system.built:
        log.info("distro system built: %s", ", ".join(system.built))
    return system


__all__ = ("CMDLINE", "DEADLINES", "DistroSystem", "prepare")
