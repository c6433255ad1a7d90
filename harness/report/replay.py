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

A test that resumed from a snapshot recorded the snapshot's image, whose init waits at its
ready point for a go line, and the plan (the test's own rest of the init, the snapshot's
key). Its replay boots that image to the ready point and sends the go line and the same rest
(:class:`~harness.snapshot.restore.SplitStart`); with ``snapshot`` it resumes from the same
snapshot instead (found under the same key, or made from the same image; with the same locks
and the same fall back to booting when it cannot), for a VM without disks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import cache
from harness.image.initramfs import InitramfsSpec
from harness.kernel.catalogue import find_catalogue, load_catalogue
from harness.kernel.provision import Kernel, provision
from harness.outcome import ConfigError
from harness.report.bundle import Bundle, DiskRef
from harness.snapshot import restore
from harness.storage import disks
from harness.vm import boot
from harness.vm.boot import StartPlan
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
    snapshot: str | None = None,
) -> Replay:
    """Set up the VM of ``bundle`` in ``workdir`` (not started); ``snapshot`` (a mechanism
    or ``auto``) resumes a snapshot-started test from its snapshot (see the module doc).

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
    if machine.get("firmware"):
        machine["firmware"] = Path(machine["firmware"])
    if accel is not None:
        machine["accel"] = accel
    spec = MachineSpec(kernel=image, initrd=bundle.initramfs, **machine)
    deadlines = Deadlines(**bundle.data["deadlines"])
    judged = bundle.data.get("verdict") or {}  # bundles from before console verdicts: markers
    expected_boots = int(bundle.data.get("expected_boots", 1))
    recorded = bundle.data.get("snapshot")
    start: StartPlan | None = None
    if recorded is not None:
        start = _snapshot_start(
            bundle, recorded, kernel, spec, workdir, cache_root, snapshot, notes
        )
        expected_boots = 1  # the replay boots from the start (or resumes: then none)
    elif snapshot is not None:
        notes.append("the test booted cold: so does its replay (no snapshot to resume)")
    vm = boot.Vm(
        spec,
        workdir,
        nonce=str(bundle.data["nonce"]),
        deadlines=deadlines,
        expected_boots=expected_boots,
        start_plan=start,
        verdict=ConsoleVerdict(
            tuple(judged.get("expect", ())),
            tuple(judged.get("fail", ())),
            judged.get("root_failures"),
        ),
        markers=bool(judged.get("markers", True)),
    )
    vm.kernel = kernel  # as the boot fixture does
    return Replay(vm, kernel, bundle, notes)


def _snapshot_start(
    bundle: Bundle,
    recorded: dict[str, Any],
    kernel: Kernel,
    spec: MachineSpec,
    workdir: Path,
    cache_root: Path,
    mechanism: str | None,
    notes: list[str],
) -> StartPlan:
    """How a replay of a snapshot-started test starts: to the ready point and the go line,
    or from the snapshot when asked (and possible)."""
    cold = restore.SplitStart(_ready_machine(spec), str(recorded["rest"]), workdir)
    if mechanism is None:
        notes.append(
            "the test resumed from a snapshot: the replay boots its image to the ready point "
            "and sends the same rest of the init (--snapshot resumes instead)"
        )
        return cold
    if recorded.get("disks") or spec.initrd is None:
        notes.append("a VM with disks replays without its snapshot: booting to the ready point")
        return cold
    plan = restore.plan_from_record(
        kernel, spec.initrd, recorded, cache_root=cache_root, kernel_image=spec.kernel
    )
    request = boot.BootRequest(kernel, InitramfsSpec(), accel=plan.accel)
    return restore.SnapshotStart(
        request, plan, workdir, cache_root=cache_root, mechanism=mechanism, fallback=cold
    )


def _ready_machine(restored: MachineSpec) -> Callable[[str], MachineSpec]:
    """The machine that boots a restored VM's image from the start, for a given nonce: the
    recorded machine without the restore's RAM backend and incoming stream."""
    extra: list[str] = []
    args = list(restored.extra_args)
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        value = args[index + 1] if index + 1 < len(args) else ""
        if arg == "-incoming" or (arg == "-object" and value.startswith("memory-backend-file,")):
            skip = True
            continue
        extra.append(arg)
    parts = restored.machine.split(",")
    machine = ",".join(p for p in parts if not p.startswith("memory-backend="))
    word = f"{boot.NONCE_PARAMETER}="

    def build(nonce: str) -> MachineSpec:
        words = [w for w in restored.cmdline.split() if not w.startswith(word)]
        return replace(
            restored,
            machine=machine,
            extra_args=tuple(extra),
            cmdline=" ".join([*words, f"{word}{nonce}"]),
        )

    return build


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
