"""Assemble an initramfs: busybox, the kernel's own modules, extra files and the rendered /init.

The image is cached under a digest of every entry that goes into it (paths, modes, contents)
plus the compression and the timestamp, so the same inputs give the same bytes on any machine
and a second build is a cache hit that costs only the hashing.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import cache, compression, cpio, templates, tools
from harness.cpio import Entry
from harness.kernels import Kernel
from harness.modules import ModuleFile, ModuleIndex
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

_FORMAT = "bootharness-initramfs-1"
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
# Applets busybox lists that must not become links: /init is ours, linuxrc is for initrd.
_SKIP_APPLETS = {"init", "linuxrc", "sbin/init"}


@dataclass(frozen=True)
class InitramfsSpec:
    """Everything that defines an initramfs, besides the kernel it is built for."""

    template: str = templates.DEFAULT_TEMPLATE
    variables: Mapping[str, Any] = field(default_factory=dict)
    modules: Sequence[str] = ()
    files: Mapping[str, Path | bytes] = field(default_factory=dict)
    compression: str = "gzip"
    template_dirs: Sequence[Path] = ()


@dataclass(frozen=True)
class Initramfs:
    """A built (or cached) image and what went into it."""

    path: Path
    digest: str
    built: bool  # False on a cache hit
    modules: tuple[ModuleFile, ...]
    init_script: str


def template_variables(spec: InitramfsSpec, module_paths: Sequence[str]) -> dict[str, Any]:
    """The variables every template gets, overridden by the spec's own."""
    variables: dict[str, Any] = {
        "nonce": "",
        "root": "",
        "root_mode": "ro",
        "root_fstype": "",
        "root_wait": 10,
        "commands": [],
        "after": "poweroff",
        "quiet_console": False,
    }
    variables.update(spec.variables)
    variables["modules"] = list(module_paths)
    return variables


def build(kernel: Kernel, spec: InitramfsSpec, cache_root: Path) -> Initramfs:
    """Build the initramfs for ``kernel`` described by ``spec`` (or find it in the cache).

    Raises:
        ConfigError: unknown module, vermagic mismatch, template error, missing file, or a
            compression the kernel cannot unpack.
        MissingToolError: busybox (or a compressor) is not installed.
    """
    if spec.compression not in compression.METHODS:
        raise ConfigError(
            f"unknown initramfs compression {spec.compression!r}; "
            f"use one of: {', '.join(compression.METHODS)}"
        )
    if kernel.config:
        compression.check_kernel_supports(spec.compression, kernel.config, kernel_name=kernel.name)
    modules = resolve_modules(kernel, spec.modules)
    module_entries = [_module_entry(kernel.release, module) for module in modules]
    variables = template_variables(spec, ["/" + entry.path for entry in module_entries])
    init_script = templates.render(spec.template, variables, extra_dirs=spec.template_dirs)

    entries = [
        *_base_entries(),
        *busybox_entries(),
        *module_entries,
        *_extra_entries(spec.files),
        Entry.file("init", init_script.encode(), mode=0o755),
    ]
    mtime = cpio.source_date_epoch()
    key = _digest(entries, spec.compression, mtime)
    suffix = "" if spec.compression == "none" else f".{spec.compression}"
    target = cache_root / "initramfs" / f"{key[:32]}.cpio{suffix}"

    def write(partial: Path) -> None:
        archive = cpio.write_archive(entries, mtime=mtime)
        partial.write_bytes(compression.compress(archive, spec.compression))

    built = cache.build_once(target, write)
    log.info("initramfs %s (%s)", target, "built" if built else "cache hit")
    return Initramfs(target, key, built, tuple(modules), init_script)


def resolve_modules(kernel: Kernel, names: Sequence[str]) -> list[ModuleFile]:
    """Module files for ``names`` and their dependencies, in load order, vermagic-checked."""
    if not names:
        return []
    if kernel.modules_dir is None:
        raise ConfigError(
            f"kernel {kernel.name!r} has no modules folder but modules were requested "
            f"({', '.join(names)}); add `modules = ...` to its entry in kernels.toml"
        )
    index = ModuleIndex.load(kernel.modules_dir, kernel.release)
    modules = index.resolve(names)
    index.check_vermagic(modules)
    return modules


def _module_entry(release: str, module: ModuleFile) -> Entry:
    # Store modules uncompressed: busybox insmod then needs no decompressor, and the
    # initramfs compression shrinks them just as well.
    relpath = module.relpath
    for suffix in _MODULE_SUFFIXES:
        if relpath.endswith(suffix):
            relpath = relpath[: -len(suffix)] + ".ko"
            break
    data = module.path.read_bytes()
    if not module.relpath.endswith(".ko"):
        data = compression.decompress(data)
    return Entry.file(f"lib/modules/{release}/{relpath}", data, mode=0o644)


def _base_entries() -> list[Entry]:
    # /dev/console must exist before devtmpfs is mounted: the kernel opens it for init's
    # stdio. A cpio device node makes that work without root on the build host.
    return [
        Entry.dir("dev"),
        Entry.chardev("dev/console", 5, 1, mode=0o600),
        Entry.chardev("dev/null", 1, 3, mode=0o666),
        *(Entry.dir(name) for name in ("proc", "sys", "tmp", "run", "newroot", "root", "etc")),
        Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry.file("etc/group", b"root:x:0:\n"),
    ]


def busybox_entries() -> list[Entry]:
    """The static busybox and one symlink per applet, as ``busybox --install -s`` would."""
    busybox = Path(tools.require("busybox"))
    data = busybox.read_bytes()
    if b"GLIBC_" in data[:65536] and b"ld-linux" in data:
        raise ConfigError(
            f"{busybox} is dynamically linked; the initramfs needs a static one: "
            "apt-get install busybox-static"
        )
    listed = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    entries = [Entry.file("bin/busybox", data, mode=0o755)]
    for applet in sorted(set(listed)):
        if applet in _SKIP_APPLETS or applet == "bin/busybox":
            continue
        entries.append(Entry.symlink(applet, "/bin/busybox"))
    return entries


def _extra_entries(files: Mapping[str, Path | bytes]) -> Iterator[Entry]:
    for archive_path, source in sorted(files.items()):
        path = archive_path.strip("/")
        if isinstance(source, bytes):
            yield Entry.file(path, source, mode=0o644)
            continue
        if not source.exists() and not source.is_symlink():
            raise ConfigError(
                f"initramfs file {archive_path!r}: source {source} does not exist; fix the path"
            )
        yield from _host_tree(path, source)


def _host_tree(archive_path: str, source: Path) -> Iterator[Entry]:
    info = source.lstat()
    if stat.S_ISLNK(info.st_mode):
        yield Entry.symlink(archive_path, os.readlink(source))
    elif stat.S_ISDIR(info.st_mode):
        yield Entry.dir(archive_path, mode=stat.S_IMODE(info.st_mode) or 0o755)
        for child in sorted(source.iterdir()):
            yield from _host_tree(f"{archive_path}/{child.name}", child)
    elif stat.S_ISREG(info.st_mode):
        mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
        yield Entry.file(archive_path, source.read_bytes(), mode=mode)
    else:
        raise ConfigError(f"initramfs file {source}: only files, folders and symlinks can be added")


def _digest(entries: Sequence[Entry], method: str, mtime: int) -> str:
    parts: list[bytes | str] = [_FORMAT, method, str(mtime)]
    for entry in sorted(entries, key=lambda e: e.path):
        parts += [entry.path, entry.kind.name, str(entry.mode), str(entry.rdev), entry.data]
    return cache.digest(parts)
