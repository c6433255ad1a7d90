"""Run a disk layout's build in a guest: LVM, md RAID and LUKS need the guest's kernel.

:mod:`harness.storage.layouts` says what a layout needs (:class:`GuestJob`: blank target
disks, the root image, a script for the distribution's own tools); this module boots it. The
VM runs our own busybox initramfs on the kernel under test with the device-mapper, md and
crypto modules; the init finds each disk by its serial, mounts the root image read-only,
copies the job's files to a tmpfs in it and runs the script in the root with ``chroot``, so
``lvm``, ``mdadm``, ``cryptsetup`` and ``e2image`` are the distribution's. The disks are
copy-on-write overlays: after the guest powered off, each target's overlay is flattened
into the job's output (qcow2). A failed step is the init's FAIL line with the command and
the tool's own message above it on the console.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import tempfile
from pathlib import Path

from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import HarnessError, InfraError
from harness.storage import attach, disks
from harness.storage.controllers import Disk
from harness.storage.disks import DiskImage
from harness.storage.layouts import GuestJob, GuestRunner
from harness.vm.boot import BootRequest, prepare_vm
from harness.vm.deadlines import Deadlines

log = logging.getLogger(__name__)

CONTROLLER = "virtio-blk"  # disks appear in command-line order; each has its serial
MEMORY_MB = 1024
# Copying ~700 MB through dm-crypt under TCG takes minutes on a loaded machine.
DEADLINES = Deadlines(kernel=60.0, init=900.0, shutdown=60.0)
SCRIPT = "bh/script"  # where the job's script goes in the initramfs

# Runs in our initramfs (busybox sh). Each element is one command of the init template:
# a non-zero status ends the build with a FAIL line naming it.
_FIND = (
    "bh_dev() { for d in /sys/block/vd*; do "
    '[ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }; '
    'done; echo "no disk with serial $1" >&2; return 1; }'
)
_MOUNT = (
    'mkdir -p /distro && mount -t ext4 -o ro,noload "$SRC" /distro && '
    "mount -t tmpfs tmpfs /distro/tmp && mount -t tmpfs tmpfs /distro/run && "
    "mount --bind /dev /distro/dev && mount -t proc proc /distro/proc && "
    "mount -t sysfs sysfs /distro/sys && cp -r /bh /distro/tmp/bh"
)
_UNMOUNT = "umount /distro/sys /distro/proc /distro/dev /distro/run /distro/tmp /distro && sync"


class LayoutBuildError(InfraError):
    """The guest that builds a layout did not finish it; the evidence has its console."""


def guest_commands(job: GuestJob, serials: list[str]) -> list[str]:
    """The init's commands for ``job``, the disks having ``serials`` (targets, then source)."""
    exports = [f"T{i}=$(bh_dev {shlex.quote(s)})" for i, s in enumerate(serials[:-1])]
    exports.append(f"SRC=$(bh_dev {shlex.quote(serials[-1])})")
    names = " ".join(f"T{i}" for i in range(len(serials) - 1))
    return [
        _FIND,
        " && ".join(exports) + f" && export {names} SRC",
        _MOUNT,
        f"chroot /distro /bin/sh -eu /tmp/{SCRIPT}",
        _UNMOUNT,
    ]


def run_job(
    job: GuestJob,
    kernel: Kernel,
    cache_root: Path,
    *,
    accel: str = "tcg",
    deadlines: Deadlines = DEADLINES,
    workdir: Path | None = None,
) -> None:
    """Boot a guest that runs ``job`` and write each target's result to ``job.outputs``.

    Raises:
        LayoutBuildError: the guest failed, faulted or timed out (the cause and its console
            evidence are kept; the VM folder stays for a look).
        ConfigError: the kernel lacks a module the job needs.
    """
    if len(job.outputs) != len(job.targets):
        raise ValueError("a GuestJob needs one output per target disk")
    folder = Path(tempfile.mkdtemp(prefix="layout-", dir=_work_root(cache_root, workdir)))
    wanted = [Disk(image, CONTROLLER) for image in (*job.targets, job.source)]
    storage = attach.plan(wanted)
    serials = [a.serial for a in storage.plan.attachments]
    files: dict[str, Path | bytes] = {f"bh/{name}": data for name, data in job.files.items()}
    files[SCRIPT] = job.script.encode() + b"\n"
    spec = InitramfsSpec(
        variables={"commands": guest_commands(job, serials), "after": "poweroff"},
        modules=(*storage.modules, *job.modules),
        files=files,
    )
    request = BootRequest(
        kernel=kernel,
        initramfs=spec,
        accel=accel,
        deadlines=deadlines,
        storage=storage,
        machine_options={"memory_mb": MEMORY_MB},
    )
    log.info("building %s in a guest (%s)", job.name, folder)
    vm = prepare_vm(request, cache_root=cache_root, workdir=folder)
    try:
        with vm:
            vm.start()
            vm.expect_pass()
            vm.wait_shutdown()
    except HarnessError as error:
        raise LayoutBuildError(
            f"building {job.name} in a guest failed ({error.outcome.name}): {error.message}",
            error.evidence,
        ) from error
    for index, output in enumerate(job.outputs):
        overlay = storage.overlay(folder, index)
        flat = DiskImage(overlay, "qcow2", job.targets[index].size)
        disks.convert(flat, output, "qcow2", read_only=False)
    shutil.rmtree(folder, ignore_errors=True)


def runner(
    kernel: Kernel,
    cache_root: Path,
    *,
    accel: str = "tcg",
    deadlines: Deadlines = DEADLINES,
    workdir: Path | None = None,
) -> GuestRunner:
    """A :data:`~harness.storage.layouts.GuestRunner` booting ``kernel`` (see :func:`run_job`)."""

    def run(job: GuestJob) -> None:
        run_job(job, kernel, cache_root, accel=accel, deadlines=deadlines, workdir=workdir)

    return run


def _work_root(cache_root: Path, workdir: Path | None) -> Path:
    where = workdir if workdir is not None else cache_root / "distro" / "work"
    where.mkdir(parents=True, exist_ok=True)
    return where


__all__ = ("LayoutBuildError", "guest_commands", "run_job", "runner")
