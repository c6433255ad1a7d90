"""Start tests from a booted snapshot instead of booting every time.

Most tests in a suite boot the same kernel, initramfs and machine, and spend nearly all of
their time getting to the same point. Here the harness boots once to that point, saves the
VM, and starts every later test with the same definition from the saved state.

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
in the go line (``GO <nonce> <epoch> <seed> <random>``); the init switches to it before its
next marker. The console is in raw mode with echo off while the go line is read, so the new
nonce reaches the console only inside markers, and success is again a marker only this run
can print. The go line also carries the host's clock (``date -s``) and fresh randomness:
random bytes written to ``/dev/urandom`` (mixed into the pool, which the kernel reseeds from
at its next reseed) and a seed for the shell's ``$RANDOM``, which would otherwise repeat the
same sequence in every restored run.

**Two mechanisms**, chosen at run time (:data:`MECHANISMS`, best first):

* ``shared-ram``: guest RAM lives in a file (``memory-backend-file,share=on``) while the
  snapshot boots; with the ``x-ignore-shared`` migration capability, the saved stream holds
  only device state. A restore maps the same file ``share=off`` (``MAP_PRIVATE``): pages are
  read on demand and copied on write, so the saved RAM is never written. ``x-ignore-shared``
  is experimental, so a probe restore checks after saving that the mechanism restores and
  that the RAM file's size and times did not change (its key holds the QEMU binary's hash,
  so every QEMU upgrade checks again).
* ``stream``: the portable one: the whole migration stream (RAM included) in one file,
  saved with ``migrate exec:cat > FILE`` and loaded with ``-incoming defer`` and
  ``migrate-incoming exec:cat FILE`` (QEMU 7.2 has no ``file:`` URI).

The mechanism a VM started with is in ``vm.boot_mechanism`` (``cold`` when it booted) and
in the junit property ``boot_mechanism``.

**Keys.** A snapshot lives in the cache under a digest of everything that defines the VM:
the QEMU binary's hash and version, the accelerator, the kernel's identity, the snapshot
image's digest, the machine options and devices, the kernel command line without the
nonce, and each disk's base image digest, format, size and controller. It is rebuilt when
any of these changes. Creation runs under :func:`harness.cache.build_once` (a file lock and
an atomic rename), so parallel workers build it once and nobody sees half of one.

**Disks.** The snapshot is taken before any disk is mounted: the guest has probed the disks
(partition tables, in its block device cache) but holds no file system state and has no
write in flight. Each restore gets its own fresh copy-on-write overlay of the same base
images, so what the guest cached at the ready point is still what the disk holds, and no
test sees another test's writes. The migration stream does not hold disk contents; the
overlays the snapshot boot used are thrown away.

**Safety.** The manifest (format, mechanism, each file's size and digest) is written last,
so an entry without one is incomplete. Before first use in a process every file is checked
against it (content digest over the file's data extents; after that, its size, inode and
times), so a truncated or corrupt snapshot is found before QEMU sees it and is never half
used. A snapshot that is corrupt, or fails to restore (QEMU rejects it, the guest does not
answer the go line), is discarded and the test boots cold, with a :class:`SnapshotWarning`.
A test can always opt out and boot cold.

**After a restore**, the VM behaves like a booted one: a new console socket pair and QMP
connection (:class:`~harness.machine.Machine` makes them), fault detection expecting no
kernel banner (a banner would be an unexpected reboot), the same markers. Output from before
the snapshot is not replayed: the console log starts at the restore.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness import cache, templates, tools
from harness.boot import (
    NONCE_PARAMETER,
    Deadlines,
    Vm,
    harness_modules,
    machine_spec,
    new_nonce,
    qemu_version,
)
from harness.console import Mark
from harness.initramfs import Initramfs, InitramfsSpec, template_variables
from harness.initramfs import build as build_initramfs
from harness.kernels import Kernel
from harness.machine import Machine, MachineSpec
from harness.modules import ModuleFile
from harness.outcome import ConfigError, Evidence, HarnessError, InfraError
from harness.storage import Storage

log = logging.getLogger(__name__)

FORMAT = "bootharness-snapshot-1"
MECHANISMS = ("shared-ram", "stream")
AUTO = "auto"
MODES = ("off", AUTO, *MECHANISMS)
READY_VARIABLE = "ready_point"
READY_SEPARATOR = "# bootharness: the test's own part starts here\n"
MEMORY_ID = "bhram"  # the RAM block's name: the same on save and restore
STATE_FILE = "state.mig"
RAM_FILE = "ram.img"
MANIFEST = "manifest.json"
BOOT_LOG = "snapshot-boot.log"
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_POLL = 0.1
DEFAULT_DEADLINES = Deadlines()


class SnapshotError(InfraError):
    """A snapshot could not be made, checked or restored; the test boots cold instead."""


class SnapshotUnsupported(SnapshotError):
    """This test cannot use a snapshot (its template has no ready point), or a mechanism
    does not work with this QEMU (``lasting``: for this QEMU binary, not just this once)."""

    def __init__(self, message: str, evidence: Evidence | None = None, *, lasting: bool = False):
        super().__init__(message, evidence)
        self.lasting = lasting


class SnapshotCorrupt(SnapshotError):
    """A saved snapshot does not match its manifest (truncated, changed, incomplete)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class SnapshotWarning(UserWarning):
    """A test that asked for a snapshot booted cold; the message says why."""


# -- the plan: one test's VM, split at the ready point


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
        ConfigError: bad template, module or file (see :func:`harness.initramfs.build`).
        SnapshotUnsupported: the template has no ready point, or renders the test's
            commands before it.
    """
    modules = tuple(dict.fromkeys((*harness_modules(kernel), *spec.modules)))
    ready_variables = {**spec.variables, READY_VARIABLE: True}
    shared = replace(spec, modules=modules, variables={**ready_variables, "commands": []})
    fingerprint = _shared_fingerprint(kernel, shared, cache_root)
    known = _SHARED.get(fingerprint)
    if known is None:
        image = build_initramfs(kernel, shared, cache_root)
        known = (image, kernel.identity)
        _SHARED[fingerprint] = known
    image, kernel_identity = known
    head, _ = split_script(image.init_script, template=spec.template)
    paths = [_module_path(kernel.release, module) for module in image.modules]
    own = replace(spec, modules=modules, variables=ready_variables)
    script = templates.render(
        spec.template, template_variables(own, paths), extra_dirs=spec.template_dirs
    )
    own_head, rest = split_script(script, template=spec.template)
    if own_head != head:
        raise SnapshotUnsupported(
            f"init template {spec.template!r} renders the test's commands before its ready "
            "point, so tests cannot share a snapshot; move them after it. This test boots cold"
        )
    base = machine_spec(kernel, image, nonce="", accel=accel, cmdline=cmdline, **machine_options)
    key_parts = {
        "format": FORMAT,
        "qemu": qemu_identity(base.qemu),
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
        repr(_identity(kernel.vmlinuz)),
        str(kernel.modules_dir),
        str(cache_root),
        spec.template,
        repr(sorted((str(k), repr(v)) for k, v in spec.variables.items())),
        repr(tuple(spec.modules)),
        spec.compression,
    ]
    for folder in templates.template_dirs(spec.template_dirs):
        if folder.is_dir():
            parts += [repr(_identity(p)) for p in sorted(folder.rglob("*")) if p.is_file()]
    for name, source in sorted(spec.files.items()):
        if isinstance(source, bytes):
            parts.append(f"{name}={cache.digest([source])}")
        else:
            source = Path(source)
            files = sorted(source.rglob("*")) if source.is_dir() else [source]
            parts += [f"{name}:{_identity(p)}" for p in files if p.exists()]
    return cache.digest(parts)


def _module_path(release: str, module: ModuleFile) -> str:
    # Where harness.initramfs puts a module: stored uncompressed, as .ko.
    relpath = module.relpath
    for suffix in _MODULE_SUFFIXES:
        if relpath.endswith(suffix):
            relpath = relpath[: -len(suffix)] + ".ko"
            break
    return f"/lib/modules/{release}/{relpath}"


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
    }


def _without_nonce(cmdline: str) -> str:
    return " ".join(w for w in cmdline.split() if not w.startswith(f"{NONCE_PARAMETER}="))


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


# -- digests, cached per process by file identity

_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int, int, int]:
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)


def content_digest(path: Path) -> str:
    """SHA-256 of the content of ``path``: each non-zero 4 KiB page with its offset, and the size.

    Guest RAM files are sparse (a 512 MiB guest touches ~100 MiB at the ready point), so
    only the file's data extents are read and holes are skipped; zero pages count as
    holes, so the digest depends on the content alone, not on how it is laid out on disk
    (a sparse or a full copy digest the same). Cached per process while the file's size,
    inode and times stay the same.
    """
    identity = _identity(path)
    known = _DIGESTS.get(identity)
    if known is not None:
        return known
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        done = 0  # pages before this offset have been digested
        while done < size:
            try:
                start = os.lseek(fd, done, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            offset = max(done, start - start % _PAGE)
            handle.seek(offset)
            while offset < end:
                chunk = handle.read(min(1 << 20, end - offset + (-end) % _PAGE))
                if not chunk:
                    break
                for at in range(0, len(chunk), _PAGE):
                    page = chunk[at : at + _PAGE]
                    if page != _ZERO_PAGE[: len(page)]:
                        hasher.update((offset + at).to_bytes(8, "little"))
                        hasher.update(page)
                offset += len(chunk)
            done = max(offset, end)
        hasher.update(size.to_bytes(8, "little"))
    value = hasher.hexdigest()
    _DIGESTS[identity] = value
    return value


def qemu_identity(qemu: str = "qemu-system-x86_64") -> str:
    """A digest of the QEMU binary's content and its version string.

    Raises:
        MissingToolError: QEMU is not installed.
    """
    path = Path(tools.require(qemu))
    return cache.digest([content_digest(path.resolve()), qemu_version(qemu)])


# -- a saved snapshot


@dataclass(frozen=True)
class Snapshot:
    """A complete, verified snapshot in the cache."""

    path: Path
    mechanism: str
    ready_nonce: str
    manifest: Mapping[str, Any]
    manifest_identity: tuple[str, int, int, int, int, int]

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def ram_file(self) -> Path | None:
        return self.path / RAM_FILE if self.mechanism == "shared-ram" else None

    def files(self) -> list[Path]:
        """The saved files the manifest covers."""
        return [self.path / name for name in self.manifest["files"]]


def load(path: Path) -> Snapshot:
    """Read and check the snapshot at ``path`` against its manifest.

    Raises:
        SnapshotCorrupt: no manifest (incomplete), an unreadable or foreign one, or a file
            missing, of another size, or with another digest than the manifest says.
    """
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        identity = _identity(manifest_path)
        mechanism = str(manifest["mechanism"])
        ready_nonce = str(manifest["ready_nonce"])
        files = dict(manifest["files"])
    except FileNotFoundError:
        raise SnapshotCorrupt(
            f"snapshot {path} has no {MANIFEST}: it is incomplete", path
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SnapshotCorrupt(f"snapshot {path}: unreadable {MANIFEST}: {error}", path) from None
    if manifest.get("format") != FORMAT or mechanism not in MECHANISMS:
        raise SnapshotCorrupt(
            f"snapshot {path}: format {manifest.get('format')!r} / mechanism {mechanism!r} "
            f"is not {FORMAT} with one of {', '.join(MECHANISMS)}",
            path,
        )
    for name, expected in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError as error:
            raise SnapshotCorrupt(f"snapshot file {file} is missing: {error}", path) from None
        if size != expected["size"]:
            raise SnapshotCorrupt(
                f"snapshot file {file} has {size} bytes, its manifest says {expected['size']}: "
                "truncated or overwritten",
                path,
            )
        if content_digest(file) != expected["digest"]:
            raise SnapshotCorrupt(
                f"snapshot file {file} does not match its manifest's digest", path
            )
    return Snapshot(path, mechanism, ready_nonce, manifest, identity)


def discard(path: Path, reason: str, *, only: Snapshot | None = None) -> bool:
    """Remove the snapshot at ``path`` from the cache (under its build lock).

    With ``only``, remove it only if it is still that snapshot: another worker may have
    discarded and rebuilt it meanwhile. A QEMU still restoring from it keeps its open
    files. Returns True if something was removed.
    """
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            return False
        if only is not None:
            try:
                if _identity(path / MANIFEST) != only.manifest_identity:
                    return False
            except OSError:
                pass  # no manifest any more: not a usable snapshot either way
        # Rename first: the entry disappears at once, and nothing is left half-removed.
        trash = path.parent / f".discarded-{path.name}-{uuid.uuid4().hex[:8]}"
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    log.warning("discarded snapshot %s: %s", path, reason)
    return True


# -- making one


@dataclass
class Creation:
    """Where a snapshot boot and its probe restore keep their files (not in the cache)."""

    workdir: Path
    deadlines: Deadlines = DEFAULT_DEADLINES
    seconds: float = 0.0


def create(plan: Plan, mechanism: str, target: Path, creation: Creation) -> None:
    """Boot ``plan`` to its ready point, save it with ``mechanism`` into folder ``target``,
    check that it restores, and write the manifest last.

    Raises:
        SnapshotUnsupported: the mechanism does not work with this QEMU.
        HarnessError: the boot failed before its ready point (TestFailure, KernelFault,
            BootTimeout, InfraError), or saving failed (SnapshotError).
    """
    started = time.monotonic()
    target.mkdir()
    ready_nonce = new_nonce()
    shared = mechanism == "shared-ram"
    boot_dir = creation.workdir / f"snapshot-boot-{mechanism}"
    spec = plan.machine(
        boot_dir,
        ready_nonce=ready_nonce,
        mechanism=mechanism,
        ram=target / RAM_FILE,
        share=True,
        incoming=False,
    )
    vm = Vm(spec, boot_dir, nonce=ready_nonce, deadlines=creation.deadlines)
    with vm:
        try:
            vm.start()
        except InfraError as error:
            if shared and vm.machine.poll() is not None:
                raise SnapshotUnsupported(
                    f"QEMU cannot keep guest RAM in a shared file: {error.message}"
                ) from error
            raise
        if shared:
            capabilities = vm.qmp.command("query-migrate-capabilities")
            if not any(c.get("capability") == "x-ignore-shared" for c in capabilities):
                raise SnapshotUnsupported(
                    f"QEMU {qemu_version(spec.qemu)} has no x-ignore-shared capability",
                    lasting=True,
                )
        vm.expect_marker("READY", phase="init")
        deadline = time.monotonic() + creation.deadlines.of("shutdown")
        save(vm.machine, target / STATE_FILE, mechanism=mechanism, deadline=deadline)
    shutil.copyfile(vm.machine.console_log, target / BOOT_LOG)
    _probe(plan, target, mechanism, ready_nonce, creation)
    write_manifest(
        target,
        [STATE_FILE, RAM_FILE] if shared else [STATE_FILE],
        mechanism=mechanism,
        ready_nonce=ready_nonce,
        key=plan.key,
        key_parts=dict(plan.key_parts),
        qemu_version=qemu_version(spec.qemu),
        kernel=f"{plan.kernel.name} ({plan.kernel.release})",
        memory_mb=spec.memory_mb,
        seconds=round(time.monotonic() - started, 3),
    )
    creation.seconds = time.monotonic() - started
    log.info("snapshot %s made with %s in %.2f s", target.name, mechanism, creation.seconds)


def write_manifest(
    target: Path, files: list[str], *, mechanism: str, ready_nonce: str, **details: Any
) -> None:
    """Write ``target``'s manifest (each file's size and digest), atomically and last:
    a snapshot folder without one is incomplete."""
    manifest = {
        **details,
        "format": FORMAT,
        "mechanism": mechanism,
        "ready_nonce": ready_nonce,
        "created": time.time(),
        "files": {
            name: {"size": (target / name).stat().st_size, "digest": content_digest(target / name)}
            for name in files
        },
    }
    partial = target / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, target / MANIFEST)


def save(machine: Machine, path: Path, *, mechanism: str, deadline: float) -> None:
    """Pause the guest and write its migration stream to ``path``.

    Raises:
        SnapshotError: the migration failed or did not finish before ``deadline``.
        InfraError: QEMU died or QMP failed.
    """
    machine.qmp.command("stop")
    _set_capabilities(machine, mechanism)
    # exec: runs through /bin/sh, and QEMU waits for the command to exit before it
    # reports the migration completed, so the file is whole by then.
    machine.qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
    _wait_migration(machine, deadline, what="saving")
    if path.stat().st_size == 0:
        raise SnapshotError(f"saving the VM wrote an empty stream to {path}", machine.evidence())


def _set_capabilities(machine: Machine, mechanism: str) -> None:
    capabilities = [{"capability": "events", "state": True}]
    if mechanism == "shared-ram":
        # Needed on both sides: the shared RAM block is left out of the stream.
        capabilities.append({"capability": "x-ignore-shared", "state": True})
    machine.qmp.command("migrate-set-capabilities", capabilities=capabilities)


def _wait_migration(machine: Machine, deadline: float, *, what: str) -> None:
    final = ("completed", "failed", "cancelled")
    while True:
        event = machine.qmp.wait_event(
            ["MIGRATION"],
            min(deadline, time.monotonic() + _POLL),
            match=lambda e: e.data.get("status") in final,
        )
        if event is not None:
            status = event.data.get("status")
            if status == "completed":
                return
            raise SnapshotError(f"{what} the VM: migration {status}", machine.evidence())
        if machine.poll() is not None:
            raise machine.exited_error(f"exited while {what} the VM")
        if time.monotonic() >= deadline:
            raise SnapshotError(
                f"{what} the VM did not finish before its deadline", machine.evidence()
            )


def incoming(machine: Machine, snapshot: Snapshot, deadline: float) -> None:
    """Load ``snapshot`` into a QEMU started with ``-incoming defer`` (still paused).

    Raises:
        SnapshotError, InfraError: the load failed, QEMU died, or the deadline passed.
    """
    _set_capabilities(machine, snapshot.mechanism)
    machine.qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(snapshot.state_file))}")
    _wait_migration(machine, deadline, what="restoring")


def _probe(plan: Plan, target: Path, mechanism: str, ready_nonce: str, creation: Creation) -> None:
    """Restore the new snapshot once, and check that the saved RAM was not written."""
    ram = target / RAM_FILE if mechanism == "shared-ram" else None
    before = _identity(ram)[3:] if ram is not None else None
    probe_dir = creation.workdir / f"snapshot-probe-{mechanism}"
    spec = plan.machine(
        probe_dir,
        ready_nonce=ready_nonce,
        mechanism=mechanism,
        ram=ram,
        share=False,
        incoming=True,
    )
    snapshot = Snapshot(target, mechanism, ready_nonce, {"files": {}}, ("", 0, 0, 0, 0, 0))
    machine = Machine(spec, probe_dir, nonce=new_nonce(), expected_boots=0)
    try:
        machine.launch()
        incoming(machine, snapshot, time.monotonic() + creation.deadlines.of("firmware"))
        machine.resume()
        status = machine.qmp.command("query-status")
        if status.get("status") != "running":
            raise SnapshotError(f"a restored VM is {status.get('status')!r}, not running")
    except HarnessError as error:
        if mechanism == "shared-ram":
            raise SnapshotUnsupported(f"a probe restore failed: {error.message}") from error
        raise
    finally:
        machine.stop()
    if ram is not None and _identity(ram)[3:] != before:
        raise SnapshotUnsupported(
            f"restoring wrote to the saved RAM file {ram}: copy-on-write (share=off) "
            "does not hold with this QEMU",
            lasting=True,
        )


# -- choosing and finding snapshots

# Per process: definitions whose snapshot boot failed (their tests boot cold at once).
_FAILED: dict[str, str] = {}


def _unsupported_path(cache_root: Path, qemu: str) -> Path:
    return cache_root / "snapshots" / f"mechanisms-{qemu[:16]}.json"


def unsupported_mechanisms(cache_root: Path, qemu: str) -> dict[str, str]:
    """Mechanisms found not to work with this QEMU binary, with why (kept in the cache)."""
    try:
        data = json.loads(_unsupported_path(cache_root, qemu).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _mark_unsupported(cache_root: Path, qemu: str, mechanism: str, reason: str) -> None:
    path = _unsupported_path(cache_root, qemu)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        known = unsupported_mechanisms(cache_root, qemu)
        known[mechanism] = reason
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1) + "\n")
        os.replace(partial, path)


def ensure(
    plan: Plan, *, cache_root: Path, mechanism: str = AUTO, creation: Creation
) -> tuple[Snapshot, bool]:
    """The snapshot for ``plan``: found in the cache, or made now. (snapshot, made now).

    With ``auto``, a saved snapshot of either mechanism is used, best first; a new one is
    made with the best mechanism that works with this QEMU.

    Raises:
        SnapshotCorrupt: a saved snapshot fails its checks (the caller discards it).
        SnapshotError: no snapshot could be made; the reason is in the message.
        ConfigError: ``mechanism`` is not one of :data:`MECHANISMS` or ``auto``.
    """
    if mechanism not in (AUTO, *MECHANISMS):
        raise ConfigError(
            f"snapshot mechanism {mechanism!r}: use one of {AUTO}, {', '.join(MECHANISMS)}"
        )
    order = MECHANISMS if mechanism == AUTO else (mechanism,)
    for candidate in order:
        entry = plan.entry(cache_root, candidate)
        if entry.exists():
            return load(entry), False
    if plan.key in _FAILED:
        raise SnapshotError(_FAILED[plan.key])
    qemu = plan.key_parts["qemu"]
    unsupported = unsupported_mechanisms(cache_root, qemu)
    reasons: list[str] = []
    for candidate in order:
        if candidate in unsupported:
            reasons.append(f"{candidate}: {unsupported[candidate]}")
            continue
        entry = plan.entry(cache_root, candidate)

        def build(partial: Path, chosen: str = candidate) -> None:
            create(plan, chosen, partial, creation)

        try:
            made = cache.build_once(entry, build)
        except SnapshotUnsupported as error:
            log.warning("snapshot mechanism %s does not work here: %s", candidate, error.message)
            if error.lasting:
                _mark_unsupported(cache_root, qemu, candidate, error.message)
            reasons.append(f"{candidate}: {error.message}")
            continue
        except HarnessError as error:
            message = (
                f"the snapshot boot failed before its ready point "
                f"({error.outcome.name}: {error.message})"
            )
            _FAILED[plan.key] = message
            raise SnapshotError(message, error.evidence) from error
        return load(entry), made
    raise SnapshotUnsupported("no snapshot mechanism works here: " + "; ".join(reasons))


# -- a VM that starts from a snapshot


def go_line(nonce: str, rest: str, *, epoch: float | None = None) -> str:
    """The line that lets a restored init go on: its nonce, the time, fresh randomness,
    and the size in bytes of the rest of the script that follows it (:func:`rest_message`)."""
    when = round(time.time() if epoch is None else epoch)
    size = len(rest_message(rest).encode())
    return f"GO {nonce} {when} {secrets.token_hex(32)} {secrets.randbelow(32768)} {size}\n"


def rest_message(rest: str) -> str:
    """The test's rest of script as sent after the go line: whole lines, nothing after."""
    return rest if rest.endswith("\n") else rest + "\n"


class SnapshotVm(Vm):
    """A :class:`~harness.boot.Vm` whose :meth:`start` resumes from a snapshot.

    The snapshot is made first if the cache has none. If it cannot be made or used, the
    test boots cold (the VM built by ``cold``), with a :class:`SnapshotWarning`;
    ``boot_mechanism`` says which way it started and ``snapshot_note`` why it booted cold.
    """

    def __init__(
        self,
        plan: Plan | None,
        workdir: Path,
        *,
        cache_root: Path,
        cold: Callable[[Path], Vm],
        mechanism: str = AUTO,
        deadlines: Deadlines = DEFAULT_DEADLINES,
        expected_boots: int = 1,
        unusable: SnapshotError | None = None,
        kernel: Kernel | None = None,
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.cache_root = cache_root
        self.mechanism = mechanism
        self.expected_boots = expected_boots
        self.boot_mechanism = "pending"
        self.snapshot: Snapshot | None = None
        self.snapshot_note: str | None = None
        self.snapshot_created = False
        self._cold = cold
        self._unusable = unusable
        nonce = new_nonce()
        if plan is not None:
            spec = machine_spec(
                plan.kernel, plan.image, nonce="", accel=plan.accel, **plan.machine_options
            )
        else:
            spec = MachineSpec(kernel=Path("/nonexistent"))
        # Provisional until start(): the restored (or cold) machine replaces it.
        super().__init__(
            spec,
            workdir / "restored",
            nonce=nonce,
            deadlines=deadlines,
            expected_boots=0,
            kernel=kernel,
        )

    def start(self) -> None:
        """Resume the guest from its snapshot up to the test's own part; boot cold if that
        cannot be done.

        Raises:
            InfraError, KernelFault, BootTimeout, TestFailure: from the cold boot, as
                :meth:`Vm.start` (a restore's own failures become a cold boot).
        """
        if self._unusable is not None:
            self._boot_cold(self._unusable)
            return
        assert self.plan is not None
        creation = Creation(self.workdir, self.deadlines)
        try:
            snapshot, self.snapshot_created = ensure(
                self.plan, cache_root=self.cache_root, mechanism=self.mechanism, creation=creation
            )
        except SnapshotCorrupt as error:
            discard(error.path, error.message)
            self._boot_cold(error)
            return
        except SnapshotError as error:
            self._boot_cold(error)
            return
        try:
            self._restore(snapshot)
        except HarnessError as error:
            console = self.machine._console  # None if QEMU never started
            if console is not None and console.recorder.mark("RESUMED") is not None:
                # The restore worked and the test's own part already failed (a command
                # that panics the kernel at once): like a cold boot's failure after
                # INIT-START, the next wait reports it (faults and exits stay recorded).
                log.debug("failure right after the restore, left to the test: %s", error)
                return
            self.machine.stop()
            discard(snapshot.path, f"restore failed: {error.message}", only=snapshot)
            self._boot_cold(SnapshotError(f"restoring {snapshot.path} failed: {error.message}"))

    def _restore(self, snapshot: Snapshot) -> None:
        assert self.plan is not None
        workdir = self.workdir / "restored"
        nonce = new_nonce()
        spec = self.plan.machine(
            workdir,
            ready_nonce=snapshot.ready_nonce,
            mechanism=snapshot.mechanism,
            ram=snapshot.ram_file,
            share=False,
            incoming=True,
        )
        self.spec = spec
        self.nonce = nonce
        # No banner is expected after a restore: one would be an unexpected reboot.
        self.machine = Machine(
            spec, workdir, nonce=nonce, expected_boots=max(self.expected_boots - 1, 0)
        )
        self.snapshot = snapshot
        (workdir / "snapshot.txt").parent.mkdir(parents=True, exist_ok=True)
        (workdir / "snapshot.txt").write_text(
            f"restored from {snapshot.path} ({snapshot.mechanism})\n"
            f"the boot up to the ready point: {snapshot.path / BOOT_LOG}\n"
        )
        self.machine.launch()
        recorder = self.machine.console.recorder
        incoming(self.machine, snapshot, time.monotonic() + self.deadlines.of("firmware"))
        recorder.marks.append(Mark("restored", time.monotonic() - recorder.started))
        self.machine.resume()
        # Sent only now: a byte the serial port took in before the load would be lost.
        self.machine.console.send(go_line(nonce, self.plan.rest) + rest_message(self.plan.rest))
        self.boot_mechanism = snapshot.mechanism
        self.expect_marker("RESUMED", phase="firmware")

    def _boot_cold(self, reason: SnapshotError) -> None:
        message = f"booting cold instead of from a snapshot: {reason.message}"
        log.warning("%s", message)
        warnings.warn(SnapshotWarning(message), stacklevel=3)
        self.snapshot_note = reason.message
        cold = self._cold(self.workdir / "cold")
        self.spec, self.nonce, self.machine = cold.spec, cold.nonce, cold.machine
        self.boot_mechanism = "cold"
        Vm.start(self)


def prepare_vm(
    kernel: Kernel,
    spec: InitramfsSpec,
    *,
    cache_root: Path,
    workdir: Path,
    accel: str = "tcg",
    deadlines: Deadlines = DEFAULT_DEADLINES,
    cmdline: str = "",
    expected_boots: int = 1,
    storage: Storage | None = None,
    mechanism: str = AUTO,
    **machine_options: Any,
) -> SnapshotVm:
    """Set up a VM that starts from a snapshot of its definition (see the module doc).

    Takes what :func:`harness.boot.prepare_vm` takes, plus the VM's disks as a
    :class:`~harness.storage.Storage` (not yet attached: every restore gets its own
    overlays) and the mechanism (``auto``, ``shared-ram`` or ``stream``).

    Raises:
        ConfigError: bad template, module or file (see :func:`harness.initramfs.build`).
    """
    from harness import boot as boot_module

    def cold(folder: Path) -> Vm:
        options = dict(machine_options)
        if storage is not None:
            options["extra_args"] = (
                *storage.attach(folder),
                *machine_options.get("extra_args", ()),
            )
        return boot_module.prepare_vm(
            kernel,
            spec,
            cache_root=cache_root,
            workdir=folder,
            accel=accel,
            deadlines=deadlines,
            cmdline=cmdline,
            expected_boots=expected_boots,
            **options,
        )

    plan: Plan | None = None
    unusable: SnapshotError | None = None
    try:
        plan = make_plan(
            kernel,
            spec,
            cache_root=cache_root,
            accel=accel,
            cmdline=cmdline,
            storage=storage,
            **machine_options,
        )
    except SnapshotUnsupported as error:
        unusable = error
    return SnapshotVm(
        plan,
        workdir,
        cache_root=cache_root,
        cold=cold,
        mechanism=mechanism,
        deadlines=deadlines,
        expected_boots=expected_boots,
        unusable=unusable,
        kernel=kernel,
    )
