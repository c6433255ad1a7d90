"""Assemble an initramfs: busybox, the kernel's own modules, extra files and the rendered /init.

The image is cached under a digest of every entry that goes into it (paths, modes, contents)
plus the compression and the timestamp, so the same inputs give the same bytes on any machine
and a second build is a cache hit. A warm build does not even hash: the spec's recipe record
(:mod:`harness.image.recipe`) names the image while none of its inputs has changed.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import cache, compression, tools
from harness.image import cpio, recipe, templates
from harness.image.cpio import Entry, EntryKind
from harness.kernel import modules as kernel_modules
from harness.kernel.modules import ModuleFile, shared_index
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError

log = logging.getLogger(__name__)

_FORMAT = "bootharness-initramfs-1"
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
# Applets busybox lists that must not become links: /init is ours, linuxrc is for initrd.
_SKIP_APPLETS = {"init", "linuxrc", "sbin/init"}
# The code that decides an image's bytes: a recipe record made by other code is not used.
_CODE = tuple(
    Path(str(m.__file__))
    for m in (cpio, recipe, templates, compression, kernel_modules, sys.modules[__name__])
)


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
    plan = _recipe(kernel, spec, cache_root)
    found = plan.recall() if plan is not None else None
    if found is not None:
        return _remembered(found)
    if kernel.config:  # also refuses an unknown method; compress() does when there is no config
        compression.check_kernel_supports(spec.compression, kernel.config, kernel_name=kernel.name)
    modules = resolve_modules(kernel, spec.modules)
    try:  # taken before the modules are read: a module changed meanwhile voids the record
        module_inputs = [cache.file_identity(module.path) for module in modules]
    except OSError:
        plan = None
    module_entries = [_module_entry(kernel.release, module) for module in modules]
    variables = template_variables(spec, ["/" + entry.path for entry in module_entries])
    init_script = templates.render(spec.template, variables, extra_dirs=spec.template_dirs)

    try:
        extra = list(_extra_entries(spec.files))
    except ValueError as error:  # a path Entry refuses: "../x", "", "a//b"
        raise ConfigError(f"initramfs files: {error}") from None
    own = [
        *_base_entries(),
        *busybox_entries(),
        *module_entries,
        Entry.file("init", init_script.encode(), mode=0o755),
    ]
    entries = _combine(own, extra)
    mtime = cpio.source_date_epoch()
    key = _digest(entries, spec.compression, mtime)
    suffix = "" if spec.compression == "none" else f".{spec.compression}"
    target = cache_root / "initramfs" / f"{key[:32]}.cpio{suffix}"

    def write(partial: Path) -> None:
        archive = cpio.write_archive(entries, mtime=mtime)
        partial.write_bytes(compression.compress(archive, spec.compression))

    built = cache.build_once(target, write, adopt=check_image)
    log.info("initramfs %s (%s)", target, "built" if built else "cache hit")
    image = Initramfs(target, key, built, tuple(modules), init_script)
    if plan is not None:
        plan.keep(_record_of(image), [*module_inputs, cache.file_identity(target)])
    return image


def _recipe(kernel: Kernel, spec: InitramfsSpec, cache_root: Path) -> recipe.Recipe | None:
    """What the image of ``spec`` for ``kernel`` depends on (see :mod:`harness.image.recipe`)."""
    busybox = Path(tools.require("busybox"))
    files: list[Path] = [busybox, *_CODE]
    if kernel.config_path is not None:
        files.append(kernel.config_path)
    if spec.modules and kernel.modules_dir is not None:
        files.append(kernel.modules_dir / "modules.dep")
    paths = {k: v for k, v in spec.files.items() if not isinstance(v, bytes)}
    contents = {k: cache.digest([v]) for k, v in spec.files.items() if isinstance(v, bytes)}
    folders = templates.template_dirs(spec.template_dirs)
    parts = {
        "image": _FORMAT,
        "kernel": [kernel.name, kernel.release, kernel.version, kernel.vmlinuz, kernel.cmdline],
        "modules_dir": kernel.modules_dir,
        "config": kernel.config_path,
        "template": spec.template,
        "variables": spec.variables,
        "modules": spec.modules,
        "files": paths,
        "contents": contents,
        "compression": spec.compression,
        "template_dirs": folders,
        "busybox": busybox,
        "source_date_epoch": os.environ.get("SOURCE_DATE_EPOCH", ""),
    }
    return recipe.recipe(
        parts, cache_root=cache_root, files=files, folders=folders, trees=paths.values()
    )


def _record_of(image: Initramfs) -> dict[str, Any]:
    return {
        "path": str(image.path),
        "digest": image.digest,
        "modules": [[m.name, m.relpath, str(m.path)] for m in image.modules],
        "init_script": image.init_script,
    }


def _remembered(found: dict[str, Any]) -> Initramfs:
    modules = tuple(ModuleFile(name, rel, Path(path)) for name, rel, path in found["modules"])
    return Initramfs(Path(found["path"]), found["digest"], False, modules, found["init_script"])


def render_init(spec: InitramfsSpec, module_paths: Sequence[str], cache_root: Path) -> str:
    """The /init ``spec`` renders with its modules at ``module_paths`` (as :func:`build` would
    put it in an image), kept as a recipe record while the template folders, their files and
    the code are unchanged: a snapshot restore renders each test's own script.

    Raises:
        TemplateError: as :func:`harness.image.templates.render`.
    """
    variables = template_variables(spec, module_paths)
    folders = templates.template_dirs(spec.template_dirs)
    parts = {"script": _FORMAT, "template": spec.template, "variables": variables, "dirs": folders}
    plan = recipe.recipe(parts, cache_root=cache_root, files=_CODE, folders=folders, trees=())
    found = plan.recall() if plan is not None else None
    if found is not None and isinstance(found.get("script"), str):
        return str(found["script"])
    script = templates.render(spec.template, variables, extra_dirs=spec.template_dirs)
    if plan is not None:
        plan.keep({"script": script}, [])
    return script


def check_image(path: Path) -> None:
    """Check that ``path`` is a whole (compressed) newc archive: what an image made by an
    older harness, which has no manifest, must pass to be used.

    Raises:
        ValueError: it does not decompress or its archive is cut short (the message says).
    """
    data = compression.decompress(path.read_bytes())
    cpio.read_archive(data)


def resolve_modules(kernel: Kernel, names: Sequence[str]) -> list[ModuleFile]:
    """Module files for ``names`` and their dependencies, in load order, vermagic-checked."""
    if not names:
        return []
    if kernel.modules_dir is None:
        raise ConfigError(
            f"kernel {kernel.name!r} has no modules folder but modules were requested "
            f"({', '.join(names)}); add `modules = ...` to its entry in kernels.toml"
        )
    index = shared_index(kernel.modules_dir, kernel.release)
    modules = index.resolve(names)
    index.check_vermagic(modules)
    return modules


def module_path(release: str, module: ModuleFile) -> str:
    """Where the image holds ``module`` (relative to its root): uncompressed, as ``.ko``."""
    relpath = module.relpath
    for suffix in _MODULE_SUFFIXES:
        if relpath.endswith(suffix):
            relpath = relpath[: -len(suffix)] + ".ko"
            break
    return f"lib/modules/{release}/{relpath}"


def _module_entry(release: str, module: ModuleFile) -> Entry:
    # Store modules uncompressed: busybox insmod then needs no decompressor, and the
    # initramfs compression shrinks them just as well.
    data = module.path.read_bytes()
    if not module.relpath.endswith(".ko"):
        data = compression.decompress(data)
    return Entry.file(module_path(release, module), data, mode=0o644)


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


def _combine(own: Sequence[Entry], extra: Sequence[Entry]) -> list[Entry]:
    """The harness's entries plus the spec's files. A folder may be added onto one of ours
    (``etc``); anything else that would replace or sit below one of ours is refused, since
    the archive can hold each path once and the harness's files are what the init needs."""
    by_path = {entry.path: entry for entry in own}
    for entry in extra:
        clash = by_path.get(entry.path)
        if clash is not None and not (clash.kind is entry.kind is EntryKind.DIR):
            raise ConfigError(
                f"initramfs file {entry.path!r} clashes with the {clash.kind.name.lower()} "
                "already at that path (the harness's /init, busybox and its applets, modules "
                "and base layout, or another of the files); choose another path"
            )
        parent = posixpath.dirname(entry.path)
        while parent:
            above = by_path.get(parent)
            if above is not None and above.kind is not EntryKind.DIR:
                raise ConfigError(
                    f"initramfs file {entry.path!r} needs {parent!r} to be a folder, but "
                    f"it is a {above.kind.name.lower()}; choose another path"
                )
            parent = posixpath.dirname(parent)
        by_path[entry.path] = entry
    return list(by_path.values())


def _host_tree(archive_path: str, source: Path) -> Iterator[Entry]:
    info = source.lstat()
    if stat.S_ISLNK(info.st_mode):
        yield Entry.symlink(archive_path, os.readlink(source))
    elif stat.S_ISDIR(info.st_mode):
        yield Entry.dir(archive_path)  # 0755 whatever the umask: same bytes on any machine
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
