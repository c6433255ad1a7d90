"""One test's VM split at the ready point, and the key of the snapshot it shares.

**The ready point.** A template declares where the shared part of the boot ends: with
``ready_point`` set, ``init.sh.j2`` (after modules and ``mdev -s``, before any disk is
mounted) prints ``READY`` and waits in ``read`` for a go line from the host; the line
``# bootharness: the test's own part starts here`` (:data:`READY_SEPARATOR`) ends that part.
The snapshot's image is rendered with no ``commands``, so one snapshot serves every test
that differs only in its commands; the rest of each test's own script (what its template
renders after the separator) is sent over the console after the go line and runs in place
of the image's. A template whose part before the separator depends on the commands cannot
share a snapshot: such a test boots cold.

**The nonce.** The nonce on the kernel command line belongs to the boot that made the
snapshot, and every restore would inherit it. So each restore makes a fresh one and sends it
in the go line (:func:`go_line`: ``GO <nonce> <epoch> <seed> <random>``); the init switches
to it before its next marker. The console is in raw mode with echo off while the go line is
read, so the new nonce reaches the console only inside markers, and success is again a
marker only this run can print. The go line also carries the host's clock (``date -s``) and
fresh randomness: random bytes written to ``/dev/urandom`` (mixed into the pool, which the
kernel reseeds from at its next reseed) and a seed for the shell's ``$RANDOM``, which would
otherwise repeat the same sequence in every restored run.

**Keys.** A snapshot lives in the cache under a digest of everything that defines the VM
(:attr:`Plan.key_parts`): the QEMU binary's hash and version, the accelerator, the kernel's
identity, the snapshot image's digest, the machine options and devices, the kernel command
line without the nonce, and each disk's base image digest, format, size and controller. It
is rebuilt when any of these changes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from harness import cache, tools
from harness.image import templates
from harness.image.initramfs import Initramfs, InitramfsSpec, module_path, render_init
from harness.image.initramfs import build as build_initramfs
from harness.kernel.provision import Kernel
from harness.snapshot.errors import SnapshotUnsupported
from harness.snapshot.store import FORMAT, Snapshot, content_digest, file_identity
from harness.storage.attach import Storage
from harness.vm import clock
from harness.vm.boot import NONCE_PARAMETER, machine_spec, qemu_version, with_harness_modules
from harness.vm.machine import MachineSpec

READY_VARIABLE = "ready_point"
READY_SEPARATOR = "# bootharness: the test's own part starts here\n"
MEMORY_ID = "bhram"  # the RAM block's name: the same on save and restore


@dataclass(frozen=True)
class Plan:
    """A test's VM split at the ready point: the shared snapshot and the test's own rest."""

    kernel: Kernel
    image: Initramfs  # the snapshot's image: ready point on, no commands
    rest: str  # the test's own part of its init script, sent after the go line
    accel: str
    cmdline: str
    machine_options: Mapping[str, Any]
    storage: Storage | None
    key_parts: Mapping[str, str]

    @property
    def key(self) -> str:
        return cache.digest(f"{name}={value}" for name, value in sorted(self.key_parts.items()))

    def entry(self, cache_root: Path, mechanism: str) -> Path:
        """Where the snapshot of this plan made with ``mechanism`` lives in the cache."""
        return cache_root / "snapshots" / f"{self.key[:32]}-{mechanism}"

    def restore_machine(self, workdir: Path, snapshot: Snapshot) -> MachineSpec:
        """The machine that loads ``snapshot`` (its saved RAM mapped copy-on-write)."""
        return self.machine(
            workdir,
            ready_nonce=snapshot.ready_nonce,
            mechanism=snapshot.mechanism,
            ram=snapshot.ram_file,
            share=False,
            incoming=True,
        )

    def machine(
        self,
        workdir: Path,
        *,
        ready_nonce: str,
        mechanism: str,
        ram: Path | None,
        share: bool,
        incoming: bool,
    ) -> MachineSpec:
        """The machine of the snapshot boot (``incoming=False``) or of a restore.

        Both are built here so they agree on every device and on the order of the
        arguments (which decides PCI slots): migration needs the same hardware both sides.
        Disks get fresh overlays in ``workdir``.
        """
        base = machine_spec(
            self.kernel,
            self.image,
            nonce=ready_nonce,
            accel=self.accel,
            cmdline=self.cmdline,
            **self.machine_options,
        )
        extra = list(base.extra_args)
        if self.storage is not None:
            extra = [*self.storage.attach(workdir), *extra]
        machine = base.machine
        if mechanism == "shared-ram":
            assert ram is not None
            machine += f",memory-backend={MEMORY_ID}"
            path = str(ram).replace(",", ",,")  # QEMU's option syntax doubles commas
            extra += [
                "-object",
                f"memory-backend-file,id={MEMORY_ID},size={base.memory_mb}M,"
                f"mem-path={path},share={'on' if share else 'off'}",
            ]
        if incoming:
            extra += ["-incoming", "defer"]
        return replace(base, machine=machine, extra_args=tuple(extra))


def split_script(script: str, *, template: str) -> tuple[str, str]:
    """An init script split at :data:`READY_SEPARATOR`: (shared head, the test's rest).

    Raises:
        SnapshotUnsupported: the script has no ready point.
    """
    head, separator, rest = script.partition(READY_SEPARATOR)
    if not separator:
        raise SnapshotUnsupported(
            f"init template {template!r} has no ready point: with `ready_point` set it must "
            f"print READY, wait for the host's go line and end that part with the line "
            f"{READY_SEPARATOR.strip()!r} (see init.sh.j2); this test boots cold"
        )
    return head + separator, rest


def make_plan(
    kernel: Kernel,
    spec: InitramfsSpec,
    *,
    cache_root: Path,
    accel: str = "tcg",
    cmdline: str = "",
    storage: Storage | None = None,
    **machine_options: Any,
) -> Plan:
    """Build the snapshot's image (or find it in the cache) and this test's rest of script.

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.image.initramfs.build`).
        SnapshotUnsupported: the template has no ready point, or renders the test's
            commands before it.
    """
    full = with_harness_modules(kernel, spec)
    ready_variables = {**spec.variables, READY_VARIABLE: True}
    shared = replace(full, variables={**ready_variables, "commands": []})
    fingerprint = _shared_fingerprint(kernel, shared, cache_root)
    known = _SHARED.get(fingerprint)
    if known is None:
        image = build_initramfs(kernel, shared, cache_root)
        known = (image, kernel.identity)
        _SHARED[fingerprint] = known
    image, kernel_identity = known
    head, _ = split_script(image.init_script, template=spec.template)
    paths = ["/" + module_path(kernel.release, module) for module in image.modules]
    own = replace(full, variables=ready_variables)
    script = render_init(own, paths, cache_root)
    own_head, rest = split_script(script, template=spec.template)
    if "\0" in rest:  # the init reads the rest with `read -d ""`: a NUL would end it early
        raise SnapshotUnsupported("the test's own part of the init holds a NUL byte")
    if own_head != head:
        raise SnapshotUnsupported(
            f"init template {spec.template!r} renders the test's commands before its ready "
            "point, so tests cannot share a snapshot; move them after it. This test boots cold"
        )
    base = machine_spec(kernel, image, nonce="", accel=accel, cmdline=cmdline, **machine_options)
    assert base.kernel is not None  # machine_spec always loads the kernel through QEMU
    key_parts = {
        "format": FORMAT,
        "qemu": qemu_identity(base.qemu, cache_root=cache_root),
        "accel": accel,
        "kernel": f"{kernel_identity} {base.kernel.name}",
        "initramfs": image.digest,
        "machine": json.dumps(_machine_fields(base), sort_keys=True),
        "cmdline": _without_nonce(base.cmdline),
        "disks": json.dumps(_disk_fields(storage)),
    }
    return Plan(kernel, image, rest, accel, cmdline, dict(machine_options), storage, key_parts)


# Per process: the snapshot image of each shared definition. Building an image that is
# already cached still resolves modules and hashes every entry (~0.2 s), which would be most
# of a restore's time; every test of a suite shares the same one.
_SHARED: dict[str, tuple[Initramfs, str]] = {}


def _shared_fingerprint(kernel: Kernel, spec: InitramfsSpec, cache_root: Path) -> str:
    """What the snapshot image depends on, cheaply: the kernel's files by identity, the
    template folders' files by identity, the spec's values and its files' contents.
    The busybox binary and the kernel's module tree are taken as fixed during one run."""
    parts = [
        kernel.name,
        kernel.release,
        kernel.version,
        repr(file_identity(kernel.vmlinuz)),
        str(kernel.modules_dir),
        str(cache_root),
        spec.template,
        repr(sorted((str(k), repr(v)) for k, v in spec.variables.items())),
        repr(tuple(spec.modules)),
        spec.compression,
    ]
    for folder in templates.template_dirs(spec.template_dirs):
        if folder.is_dir():
            parts += [repr(file_identity(p)) for p in sorted(folder.rglob("*")) if p.is_file()]
    for name, source in sorted(spec.files.items()):
        if isinstance(source, bytes):
            parts.append(f"{name}={cache.digest([source])}")
        else:
            source = Path(source)
            files = sorted(source.rglob("*")) if source.is_dir() else [source]
            parts += [f"{name}:{file_identity(p)}" for p in files if p.exists()]
    return cache.digest(parts)


def _machine_fields(spec: MachineSpec) -> dict[str, Any]:
    return {
        "machine": spec.machine,
        "memory_mb": spec.memory_mb,
        "cpus": spec.cpus,
        "nodefaults": spec.nodefaults,
        "pvpanic": spec.pvpanic,
        "network": spec.network,
        "devices": list(spec.devices),
        "extra_args": list(spec.extra_args),
        "qemu": spec.qemu,
        "firmware": str(spec.firmware or ""),
    }


def _without_nonce(cmdline: str) -> str:
    """The command line as a snapshot's key holds it: without the nonce (each boot's own)
    and the host's clock parameters (the host's, not the VM's)."""
    words = clock.without_parameters(cmdline).split()
    return " ".join(w for w in words if not w.startswith(f"{NONCE_PARAMETER}="))


def _disk_fields(storage: Storage | None) -> list[dict[str, Any]]:
    if storage is None:
        return []
    fields = []
    for image, attachment in zip(storage.images, storage.plan.attachments, strict=True):
        fields.append(
            {
                "drive": attachment.drive_id,
                "base": content_digest(image.path),
                "format": image.format,
                "size": image.size,
            }
        )
    fields.append({"devices": storage.plan.device_args()})
    return fields


def qemu_identity(qemu: str = "qemu-system-x86_64", *, cache_root: Path | None = None) -> str:
    """A digest of the QEMU binary's content and its version string (with a cache, both are
    kept there while the binary is unchanged: hashing 18 MB costs more than a restore).

    Raises:
        MissingToolError: QEMU is not installed.
    """
    path = Path(tools.require(qemu)).resolve()
    if cache_root is None:
        content = content_digest(path)
    else:
        record = cache_root / "qemu" / f"content-{cache.digest([str(path)])[:16]}.json"
        content = cache.remembered_digest(path, record, content_digest)
    return cache.digest([content, qemu_version(qemu, cache_root=cache_root)])


def go_line(nonce: str, rest: str, *, epoch: float | None = None) -> str:
    """The line that lets a restored init go on: its nonce, the time, fresh randomness,
    and the size in bytes of the rest of the script that follows it (:func:`rest_message`)."""
    when = round(time.time() if epoch is None else epoch)
    size = len(rest_message(rest).encode())
    return f"GO {nonce} {when} {secrets.token_hex(32)} {secrets.randbelow(32768)} {size}\n"


def rest_message(rest: str) -> str:
    """The test's rest of script as sent after the go line: whole lines, nothing after."""
    return rest if rest.endswith("\n") else rest + "\n"
