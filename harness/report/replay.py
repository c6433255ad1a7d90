"""Boot a reproduction bundle again: the same kernel image, initramfs, command line and disks.

The replay uses the bundle's own copy of the initramfs and the boot's own nonce (it is on the
recorded kernel command line), so the init prints the same markers and the outcome is judged
the same way. The kernel is the recorded image when it is still there with the same digest;
otherwise it is provisioned again by name from ``kernels.toml`` and must have the same
identity. Each disk gets a fresh overlay of its recorded base image in the replay's folder,
so replaying never writes the base and never depends on the original run's files.

A replay boots what the original test booted; what the test did with the console after the
boot (commands it sent, assertions it made) is not replayed. ``--shell`` attaches the console
afterwards, to look around a rescue shell or a hung guest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cache
from harness.kernel.catalogue import find_catalogue, load_catalogue
from harness.kernel.provision import Kernel, provision
from harness.outcome import ConfigError
from harness.report.bundle import Bundle, DiskRef
from harness.storage import disks
from harness.vm import boot
from harness.vm.deadlines import Deadlines
from harness.vm.machine import MachineSpec
from harness.vm.patterns import ConsoleVerdict

log = logging.getLogger(__name__)


@dataclass
class Replay:
    """A prepared replay: the VM to boot, its kernel, and what the bundle recorded."""

    vm: boot.Vm
    kernel: Kernel
    bundle: Bundle
    notes: list[str]


def prepare(
    bundle: Bundle,
    workdir: Path,
    *,
    cache_root: Path,
    kernels_file: str | None = None,
    accel: str | None = None,
) -> Replay:
    """Set up the VM of ``bundle`` in ``workdir`` (not started).

    Raises:
        ConfigError: the kernel image is gone and cannot be provisioned again with the same
            identity, or a disk's base image is missing; the message says which and why.
        InfraError: provisioning the kernel again failed (download, tools).
    """
    notes: list[str] = []
    kernel, image = _kernel(bundle, cache_root, kernels_file, notes)
    workdir.mkdir(parents=True, exist_ok=True)
    machine: dict[str, Any] = dict(bundle.data["machine"])
    machine["devices"] = tuple(machine.get("devices", ()))
    extra = list(machine.get("extra_args", ()))
    for ref in bundle.disks:
        fresh = _overlay(bundle.base_image(ref), ref, workdir, notes)
        extra = _swap_file(extra, ref.file, str(fresh))
    machine["extra_args"] = tuple(extra)
    if accel is not None:
        machine["accel"] = accel
    spec = MachineSpec(kernel=image, initrd=bundle.initramfs, **machine)
    deadlines = Deadlines(**bundle.data["deadlines"])
    judged = bundle.data.get("verdict") or {}  # bundles from before console verdicts: markers
    vm = boot.Vm(
        spec,
        workdir,
        nonce=str(bundle.data["nonce"]),
        deadlines=deadlines,
        expected_boots=int(bundle.data.get("expected_boots", 1)),
        verdict=ConsoleVerdict(
            tuple(judged.get("expect", ())),
            tuple(judged.get("fail", ())),
            judged.get("root_failures"),
        ),
        markers=bool(judged.get("markers", True)),
    )
    vm.kernel = kernel  # as the boot fixture does
    return Replay(vm, kernel, bundle, notes)


def run(replay: Replay) -> boot.BootResult:
    """Boot the prepared replay to its outcome (QEMU is always stopped afterwards)."""
    return boot.run(replay.vm, kernel=replay.kernel, accel=replay.vm.spec.accel)


def _kernel(
    bundle: Bundle, cache_root: Path, kernels_file: str | None, notes: list[str]
) -> tuple[Kernel, Path]:
    recorded = bundle.data["kernel"]
    image = Path(recorded["image"])
    if image.is_file() and cache.file_digest(image) == recorded["image_digest"]:
        kernel = Kernel(
            name=recorded["name"],
            release=recorded["release"],
            vmlinuz=image,
            modules_dir=None,
            config_path=None,
            system_map=None,
            version=recorded.get("version", ""),
        )
        return kernel, image
    # The recorded image is gone (another machine, a cleaned cache): provision by name.
    name = recorded["name"]
    catalogue = load_catalogue(find_catalogue(kernels_file))
    kernel = provision(catalogue.get(name), cache_root)
    if recorded["identity"] and kernel.identity != recorded["identity"]:
        raise ConfigError(
            f"{bundle.path}: kernel {name!r} in {catalogue.path} is not the kernel the bundle "
            f"booted (release {kernel.release}, bundle: {recorded['release']}); restore that "
            f"kernel ({recorded['source'] or 'same files'}) to replay"
        )
    chosen = kernel.vmlinuz if recorded["image_kind"] == "vmlinuz" else kernel.vmlinux()
    if chosen is None:
        raise ConfigError(f"{bundle.path}: kernel {name!r} has no vmlinux to boot")
    notes.append(f"kernel {name} provisioned again from {catalogue.path}")
    return kernel, chosen


def _overlay(base: Path, ref: DiskRef, workdir: Path, notes: list[str]) -> Path:
    if not base.is_file():
        raise ConfigError(
            f"disk {ref.drive}: base image {base} is gone; rebuild it (the test that made it "
            "builds it again) or copy it back to that path"
        )
    if base.stat().st_size != ref.base_size or cache.file_digest(base) != ref.base_digest:
        notes.append(f"disk {ref.drive}: base image {base} changed since the bundle was made")
    image = disks.DiskImage(base, ref.base_format, 0)
    return disks.overlay(image, workdir / f"{ref.drive or 'disk'}.replay.qcow2")


def _swap_file(args: list[str], old: str, new: str) -> list[str]:
    """Point each ``-drive`` that opened ``old`` at ``new`` instead."""
    # QEMU escapes a comma in a value by doubling it; match the whole value only.
    pattern = re.compile(r"(^|,)file=" + re.escape(old.replace(",", ",,")) + r"(?=,(?!,)|$)")
    replacement = new.replace(",", ",,")
    result = []
    for index, arg in enumerate(args):
        if index > 0 and args[index - 1] == "-drive":
            arg = pattern.sub(lambda m: m.group(1) + "file=" + replacement, arg)
        result.append(arg)
    return result
