"""Reproduction bundles: everything needed to boot a failed test's VM again, in one folder.

A bundle holds the initramfs image the VM booted (hard-linked from the cache when it can be,
else copied), the console log, the QMP event log, QEMU's stderr, argv and the rendered /init,
the symbolised stack traces of the faults seen (``trace.txt``), and ``bundle.json``: which
kernel (name, release, package or files, and a digest of the image QEMU was given), the
machine spec (command line with the boot's nonce, devices, extra arguments), the deadlines,
and the base images behind each disk. Disks are referred to, not copied: a VM boots a qcow2
overlay of a read-only base image, so the base is what a replay needs, and it is recorded
with its size and digest so a replay can tell it has changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cache
from harness.outcome import ConfigError
from harness.report.model import write_atomic
from harness.snapshot.restore import plan_record
from harness.storage import disks
from harness.vm.boot import qemu_version

log = logging.getLogger(__name__)

FORMAT = "bootharness-bundle-1"
BUNDLE_JSON = "bundle.json"
INITRAMFS = "initramfs.img"
TRACE = "trace.txt"  # the symbolised stack traces of the faults seen
# Files of the VM's private folder worth keeping, as they are named there.
MAX_DISK_COPY = 256 * 1024 * 1024  # a larger base is only referred to when it cannot be linked
VM_FILES = ("console.log", "qmp-events.jsonl", "qemu.stderr", "qemu.argv", "init.sh")
# MachineSpec fields stored as they are (kernel and initrd are files, handled apart).
_SPEC_FIELDS = (
    "cmdline",
    "accel",
    "machine",
    "memory_mb",
    "cpus",
    "nodefaults",
    "pvpanic",
    "network",
    "devices",
    "extra_args",
    "qemu",
    "firmware",
)


@dataclass(frozen=True)
class DiskRef:
    """One ``-drive`` of the VM: the file QEMU opened and the base image behind it."""

    drive: str  # the -drive id
    file: str  # what QEMU opened (an overlay in the VM's folder, usually)
    format: str
    base: str  # the image a replay must put a fresh overlay on
    base_format: str
    base_size: int
    base_digest: str
    copy: str = ""  # the bundle's own hard link or copy of the base, when it has one


@dataclass(frozen=True)
class Bundle:
    """A bundle read back from disk."""

    path: Path
    data: Mapping[str, Any]

    @property
    def outcome(self) -> str:
        return str(self.data["outcome"])

    @property
    def initramfs(self) -> Path | None:
        name = self.data["initramfs"]["file"]
        return self.path / name if name else None

    @property
    def disks(self) -> list[DiskRef]:
        return [DiskRef(**d) for d in self.data.get("disks", [])]

    def base_image(self, ref: DiskRef) -> Path:
        """The base to boot ``ref`` from: the bundle's own copy if it has one."""
        return self.path / ref.copy if ref.copy else Path(ref.base)


def write(
    target: Path,
    vm: Any,
    *,
    test: str,
    outcome: str,
    message: str,
    kernel_source: str = "",
) -> Path:
    """Write the bundle of ``vm`` (a stopped :class:`~harness.vm.boot.Vm`) into ``target``.

    ``kernel_source`` says where the kernel came from (a package name or a vmlinuz path), so
    a replay elsewhere can provision it. An existing ``target`` is replaced.

    Raises:
        OSError: the folder or a file in it cannot be written.
    """
    spec = vm.spec
    kernel = vm.kernel
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    initrd = spec.initrd
    if initrd is not None:
        _link_or_copy(Path(initrd), target / INITRAMFS)
    workdir = Path(vm.machine.workdir)
    for name in VM_FILES:
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(workdir / name, target / name)
    # A boot through firmware and a boot loader reads the bzImage from its boot disk (the
    # disk and the firmware's variable store are in the VM folder's files and argv).
    image = spec.kernel if spec.kernel is not None else getattr(kernel, "vmlinuz", None)
    if spec.kernel is None:
        image_kind = "boot-disk"
    elif kernel is not None and spec.kernel == kernel.vmlinuz:
        image_kind = "vmlinuz"
    else:
        image_kind = "vmlinux"
    data: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "test": test,
        "outcome": outcome,
        "message": message,
        "kernel": {
            "name": str(getattr(kernel, "name", "")),
            "release": str(getattr(kernel, "release", "")),
            "version": str(getattr(kernel, "version", "")),
            "source": kernel_source,
            "commit": str(getattr(kernel, "commit", "")),  # source kernels: the tree's state
            "config_digest": str(getattr(kernel, "config_digest", "")),
            "identity": kernel.identity if kernel is not None else "",
            "image": str(image or ""),
            "image_kind": image_kind,
            "image_digest": cache.file_digest(Path(image)) if image is not None else "",
        },
        "initramfs": {
            "file": INITRAMFS if initrd is not None else "",
            "original": str(initrd or ""),
            "digest": cache.file_digest(Path(initrd)) if initrd is not None else "",
        },
        "machine": {name: _plain(getattr(spec, name)) for name in _SPEC_FIELDS},
        "nonce": vm.nonce,
        # How the boot was judged: markers, or console patterns (harness.vm.patterns).
        "verdict": {
            "markers": vm.markers,
            "expect": list(vm.verdict.expect),
            "fail": list(vm.verdict.fail),
            "root_failures": vm.verdict.root_failures,
        },
        "expected_boots": vm.machine.expected_boots,
        "deadlines": dataclasses.asdict(vm.deadlines),
        "load_factor": float(vm.load_factor),
        "disks": [dataclasses.asdict(d) for d in _keep_bases(disk_refs(spec.extra_args), target)],
        "qemu_argv": list(vm.machine.argv),
        "qemu_version": qemu_version(spec.qemu),
        "kernel_warnings": list(vm.warning_lines()),
        "trace": "",
    }
    traces = vm.fault_traces()
    if traces:  # where it crashed, symbolised against the kernel's own files
        (target / TRACE).write_text(traces + "\n")
        data["trace"] = TRACE
    # A VM resumed from a snapshot: its image is the snapshot's (the init waits at READY),
    # so a replay needs the plan too (the test's own rest of the init, the snapshot's key).
    snapshot = plan_record(vm)
    if snapshot is not None:
        data["snapshot"] = snapshot
    write_atomic(target / BUNDLE_JSON, json.dumps(data, indent=2) + "\n")
    log.info("reproduction bundle: %s", target)
    return target


def load(path: Path) -> Bundle:
    """Read the bundle in folder ``path`` (or its ``bundle.json``).

    Raises:
        ConfigError: no bundle there, or not one this version can read; the message says
            what was found.
    """
    path = Path(path)
    folder = path.parent if path.name == BUNDLE_JSON else path
    try:
        data = json.loads((folder / BUNDLE_JSON).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{folder}: no {BUNDLE_JSON} here; pass the folder a failed test left "
            "(its path is in the test report and the HTML report)"
        ) from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{folder / BUNDLE_JSON}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(
            f"{folder / BUNDLE_JSON}: not a {FORMAT} bundle (format {data.get('format')!r})"
            if isinstance(data, dict)
            else f"{folder / BUNDLE_JSON}: not a bundle"
        )
    return Bundle(folder, data)


def disk_refs(extra_args: Sequence[str]) -> list[DiskRef]:
    """The ``-drive`` files in QEMU arguments, each with the base image behind it.

    A qcow2 file with a backing file refers to its base; any other file is its own base
    (a replay boots an overlay of it, so it is never written either).
    """
    refs: list[DiskRef] = []
    for option in drive_options(extra_args):
        file = option.get("file")
        if not file:
            continue
        info = disks.image_info(Path(file))
        fmt = str(option.get("format") or info.get("format", "raw"))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        base = Path(backing) if backing else Path(file)
        base_info = disks.image_info(base) if backing else info
        refs.append(
            DiskRef(
                drive=option.get("id", ""),
                file=file,
                format=fmt,
                base=str(base),
                base_format=str(
                    info.get("backing-filename-format") or base_info.get("format", "raw")
                ),
                base_size=base.stat().st_size,
                base_digest=cache.file_digest(base),
            )
        )
    return refs


def drive_options(extra_args: Sequence[str]) -> list[dict[str, str]]:
    """Each ``-drive`` value of ``extra_args`` as key=value pairs (QEMU's ``,,`` escapes kept)."""
    options = []
    for flag, value in itertools.pairwise(extra_args):
        if flag == "-drive":
            options.append(parse_option(value))
    return options


def parse_option(value: str) -> dict[str, str]:
    """``if=none,id=d0,file=a,,b`` -> {"if": "none", "id": "d0", "file": "a,b"}."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(value):
        char = value[i]
        if char == "," and value[i + 1 : i + 2] == ",":
            current += ","
            i += 2
            continue
        if char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
        i += 1
    parts.append(current)
    result: dict[str, str] = {}
    for part in parts:
        key, sep, rest = part.partition("=")
        result[key] = rest if sep else ""
    return result


def _keep_bases(refs: list[DiskRef], target: Path) -> list[DiskRef]:
    """Keep each base image with the bundle: a hard link (free: bases are read-only and never
    rewritten), else a copy when small; a base in a test's temporary folder would otherwise
    vanish with pytest's rotation of old temporary folders."""
    kept: list[DiskRef] = []
    for ref in refs:
        name = f"disk-{ref.drive or len(kept)}.{ref.base_format}"
        try:
            os.link(ref.base, target / name)
        except OSError:
            if ref.base_size > MAX_DISK_COPY:
                kept.append(ref)
                continue
            shutil.copyfile(ref.base, target / name)
        kept.append(dataclasses.replace(ref, copy=name))
    return kept


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs nothing and the cache never rewrites an entry in place; across
    # file systems (a bundle folder on another disk) a copy it is.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
