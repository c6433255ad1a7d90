"""Provision kernels into the cache and describe a provisioned kernel.

A kernel built from source is built (or found) by :mod:`harness.kernel.source`, so every
caller of :func:`provision` (boot, the fixtures, the matrix, bisect) builds on demand.

A Debian kernel package is downloaded and unpacked by :mod:`harness.kernel.debian` (no
install, no maintainer scripts). Everything happens in a scratch folder that is renamed into
place at the end (see :func:`harness.cache.build_once`), so an interrupted download never
counts as provisioned and two processes never provision the same kernel twice; every cached
file (the ``.deb``, the unpacked tree, the extracted vmlinux) is checked against its manifest
on use and rebuilt when damaged.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import cache, manifest, tools
from harness.kernel import bzimage, debian, source
from harness.kernel.catalogue import DebianPackage, KernelEntry, LocalFiles, SourceTree
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    """A kernel ready to boot: its files on disk and what we know about it."""

    name: str
    release: str
    vmlinuz: Path
    modules_dir: Path | None
    config_path: Path | None
    system_map: Path | None
    cmdline: str = ""
    version: str = ""  # the Debian package version, or a source build's key
    cache_dir: Path | None = None  # where derived files (vmlinux) may be cached
    commit: str = ""  # source kernels from git: 12 hex digits, "+dirty-<8 hex>" with changes
    config_digest: str = ""  # source kernels: digest of the .config built, 12 hex digits
    debug_vmlinux: Path | None = None  # the build's own vmlinux: symbols, maybe debug info

    @functools.cached_property
    def config(self) -> dict[str, str]:
        """The build configuration (``CONFIG_X`` -> ``y``/``m``/value); empty if unknown."""
        if self.config_path is None:
            return {}
        return parse_config(self.config_path.read_text(errors="replace"))

    def has_config(self, option: str) -> bool:
        """True when ``option`` is built in or a module (``y`` or ``m``)."""
        return self.config.get(option) in ("y", "m")

    @property
    def identity(self) -> str:
        """A digest that changes whenever the kernel's files change; keys derived caches."""
        parts = [self.release, self.version, image_digest(self.vmlinuz, self.cache_dir)]
        return cache.digest(parts)

    def vmlinux(self) -> Path | None:
        """The uncompressed vmlinux with a PVH entry, extracted once and cached.

        Returns None when the kernel has no PVH entry (boot the bzImage instead).
        """
        return _cached_vmlinux(self.vmlinuz, self.cache_dir or self.vmlinuz.parent)


def parse_config(text: str) -> dict[str, str]:
    """Parse a kernel ``.config``; ``# CONFIG_X is not set`` lines are left out."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("CONFIG_") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        options[key] = value.strip('"')
    return options


def image_digest(vmlinuz: Path, cache_dir: Path | None) -> str:
    """SHA-256 of a kernel image; with a cache folder, kept there while the file is unchanged
    (hashing 8 MB costs 10-80 ms, in every process that boots it)."""
    if cache_dir is None:
        return cache.file_digest(vmlinuz)
    return cache.remembered_digest(vmlinuz, cache_dir / f"{vmlinuz.name}.sha256.json")


# Per process: the vmlinux entry of each bzImage (by its identity), so that only the first
# use looks up the bzImage's digest; every use still checks the entry itself (build_once).
_VMLINUX: dict[tuple[object, ...], Path] = {}


def _cached_vmlinux(vmlinuz: Path, cache_dir: Path) -> Path | None:
    identity = (*manifest.file_identity(vmlinuz), str(cache_dir))
    target = _VMLINUX.get(identity)
    if target is None:
        target = cache_dir / f"vmlinux-{image_digest(vmlinuz, cache_dir)[:16]}"
        _VMLINUX[identity] = target
    marker = target.with_name(target.name + ".no-pvh")
    if marker.exists():
        return None

    def build(partial: Path) -> None:
        elf = bzimage.extract_vmlinux(vmlinuz)
        if not bzimage.has_pvh_entry(elf):
            marker.touch()
            raise _NoPvh
        partial.write_bytes(elf)

    try:
        if cache.build_once(target, build, adopt=check_elf):
            log.info("extracted %s from %s", target.name, vmlinuz)
    except _NoPvh:
        log.info("%s has no PVH entry; booting the bzImage", vmlinuz)
        return None
    return target


def check_elf(path: Path) -> None:
    """Check that ``path`` is a whole 64-bit ELF file: every segment the program headers
    name lies inside it (what a truncated vmlinux fails, and what QEMU would load).

    Raises:
        ValueError: it is not, with what is wrong.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(64)
        if len(header) < 64 or header[:5] != b"\x7fELF\x02":
            raise ValueError(f"{path} is not a 64-bit ELF file")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        raise ValueError(f"{path}: program headers cut off at {size} bytes")
    for index in range(phnum):
        (offset,) = struct.unpack_from("<Q", table, index * phentsize + 8)
        (filesz,) = struct.unpack_from("<Q", table, index * phentsize + 0x20)
        if offset + filesz > size:
            raise ValueError(
                f"{path}: segment {index} ends at byte {offset + filesz}, the file has {size}"
            )


class _NoPvh(Exception):
    pass


def provision(entry: KernelEntry, cache_root: Path, *, progress: bool | None = None) -> Kernel:
    """Make ``entry`` bootable: fetch and unpack it if needed, and describe it.

    Idempotent and safe across processes. ``progress`` shows the download's progress
    (default: when stderr is a terminal).

    Raises:
        ConfigError: a local file is missing or the package holds no kernel.
        PackageNotFound: kernels.toml names a package apt does not know (a ConfigError).
        ArchiveUnreachable: the package archive did not answer (an InfraError).
        CacheFull, CacheReadOnly, CacheDenied: the cache's file system refused a write.
        ToolFailed: apt-get, dpkg-deb or depmod failed otherwise (an InfraError).
        MissingToolError: apt-get, dpkg-deb or depmod is not installed.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    if isinstance(entry.source, DebianPackage):
        return _provision_package(entry, entry.source, cache_root, progress)
    if isinstance(entry.source, SourceTree):
        return build_source(entry, cache_root, progress=progress)
    return _describe_local(entry, entry.source, cache_root)


def is_provisioned(entry: KernelEntry, cache_root: Path) -> bool:
    """True when ``entry`` can boot without a download or a build."""
    if isinstance(entry.source, DebianPackage):
        return (_package_dir(entry.source, cache_root) / debian.METADATA).exists()
    if isinstance(entry.source, SourceTree):
        # Only look: no unpacking, no download of a base kernel, no build.
        base = entry.source.base_kernel
        if base is not None and not is_provisioned(base, cache_root):
            return False
        package = entry.source.package
        if package and source.unpacked_package(package, cache_root) is None:
            return False
        try:
            return source.cached(source_plan(entry, cache_root, progress=False)) is not None
        except (ConfigError, InfraError):
            return False
    return entry.source.vmlinuz.exists()


def source_plan(entry: KernelEntry, cache_root: Path, *, progress: bool) -> source.Plan:
    """The build plan of a source kernel (its base kernel provisioned first, if it has one).

    Raises:
        ConfigError, InfraError: see :func:`harness.kernel.source.plan`.
    """
    if not isinstance(entry.source, SourceTree):
        raise ConfigError(f"kernel {entry.name!r} is not built from source")
    base_config = None
    if entry.source.base_kernel is not None:
        base_config = provision(entry.source.base_kernel, cache_root, progress=progress).config_path
    return source.plan(entry.source, cache_root, base_config=base_config, progress=progress)


def build_source(
    entry: KernelEntry, cache_root: Path, *, progress: bool | None = None, force: bool = False
) -> Kernel:
    """Build a source kernel (or take it from the cache) and describe it.

    Raises:
        BuildError: the kernel did not build (INFRA_ERROR; the first error and the log).
        ConfigError: the tree or config is unusable, or a requested option did not survive.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    built = source.build(
        entry.name,
        source_plan(entry, cache_root, progress=progress),
        progress=progress,
        force=force,
    )
    return kernel_of_build(entry, built)


def kernel_of_build(entry: KernelEntry, built: source.Built) -> Kernel:
    """The :class:`Kernel` of a source build."""
    return Kernel(
        name=entry.name,
        release=built.release,
        vmlinuz=built.bzimage,
        modules_dir=built.modules_dir,
        config_path=built.config,
        system_map=built.system_map,
        cmdline=entry.cmdline,
        version=f"build-{built.key[:16]}",
        cache_dir=built.folder,
        commit=built.commit,
        config_digest=built.config_digest,
        debug_vmlinux=built.vmlinux,
    )


def _package_dir(source: DebianPackage, cache_root: Path) -> Path:
    return cache_root / "kernels" / "debian" / source.package


def _provision_package(
    entry: KernelEntry, source: DebianPackage, cache_root: Path, progress: bool
) -> Kernel:
    target = _package_dir(source, cache_root)

    def build(partial: Path) -> None:
        deb = debian.fetch(entry, source.package, cache_root, progress=progress)
        debian.unpack(deb, source.package, partial, progress=progress)

    if cache.build_once(target, build, adopt=_check_unpacked):
        log.info("provisioned %s into %s", source.package, target)
    meta = debian.read_metadata(target)
    root = target / "root"
    release = meta["release"]
    system_map = _optional(root / "boot" / f"System.map-{release}")
    debug_vmlinux = None
    if source.debug_symbols:
        system_map, debug_vmlinux = _debug_symbols(
            source.package, meta.get("version", ""), release, cache_root, progress
        )
    return Kernel(
        name=entry.name,
        release=release,
        vmlinuz=root / meta["vmlinuz"],
        modules_dir=root / "lib" / "modules" / release,
        config_path=_optional(root / "boot" / f"config-{release}"),
        system_map=system_map,
        cmdline=entry.cmdline,
        version=meta.get("version", ""),
        cache_dir=target,
        debug_vmlinux=debug_vmlinux,
    )


def debug_package_of(package: str) -> str:
    """The ``-dbg`` package of a Debian kernel image package (signed or unsigned)."""
    return package.removesuffix("-unsigned") + "-dbg"


def _debug_symbols(
    package: str, version: str, release: str, cache_root: Path, progress: bool
) -> tuple[Path, Path]:
    """The real System.map and the vmlinux with debug info of a Debian kernel, from its
    ``-dbg`` package (Debian's own System.map is a placeholder), fetched once into the cache.
    Only those two files are kept: the package's module debug files are gigabytes."""
    debug = debug_package_of(package)
    target = cache_root / "kernels" / "debian" / f"{debug}_{version}"

    def build(partial: Path) -> None:
        download = partial / "download"
        download.mkdir(parents=True)
        if progress:
            print(f"bootharness: downloading {debug} (large) ...", file=sys.stderr, flush=True)
        wanted = f"{debug}={version}" if version else debug
        _run(
            [tools.require("apt-get"), "download", wanted],
            cwd=download,
            what=f"download {wanted}",
            show=progress,
            hint="debug_symbols needs the -dbg package of the same version",
        )
        debs = sorted(download.glob("*.deb"))
        if len(debs) != 1:
            raise InfraError(f"apt-get download {wanted} produced {len(debs)} .deb files")
        members = [f"./usr/lib/debug/boot/{name}-{release}" for name in ("System.map", "vmlinux")]
        command = (
            f"{tools.require('dpkg-deb')} --fsys-tarfile {shlex.quote(str(debs[0]))} | "
            f"tar -x -C {shlex.quote(str(partial))} " + " ".join(shlex.quote(m) for m in members)
        )
        _run(["sh", "-c", command], what=f"unpack {debs[0].name}")
        for member, name in zip(members, ("System.map", "vmlinux"), strict=True):
            os.replace(partial / member, partial / name)
        shutil.rmtree(partial / "usr")
        shutil.rmtree(download)

    cache.build_once(target, build)
    return target / "System.map", target / "vmlinux"


def _check_unpacked(folder: Path) -> None:
    """The structural check of an unpacked package made by an older harness (no manifest):
    its description, a readable bzImage of that release, and the module index."""
    meta = debian.read_metadata(folder)
    release = str(meta["release"])
    found = bzimage.release_of(folder / "root" / str(meta["vmlinuz"]))
    if found != release:
        raise ValueError(f"its bzImage says release {found!r}, {debian.METADATA} {release!r}")
    modules = folder / "root" / "lib" / "modules" / release
    if modules.is_dir() and not (modules / "modules.dep").is_file():
        raise ValueError(f"{modules} has no modules.dep")


def _describe_local(entry: KernelEntry, source: LocalFiles, cache_root: Path) -> Kernel:
    if not source.vmlinuz.is_file():
        raise ConfigError(
            f"kernel {entry.name!r}: vmlinuz file {source.vmlinuz} does not exist; "
            "build the kernel or fix the path in kernels.toml"
        )
    release = bzimage.release_of(source.vmlinuz)
    derived = cache_root / "kernels" / "local" / cache.digest([str(source.vmlinuz)])[:16]
    derived.mkdir(parents=True, exist_ok=True)
    modules_dir = source.modules
    if modules_dir is not None and not (modules_dir / "modules.dep").exists():
        modules_dir = _depmod_copy(modules_dir, release, derived)
    return Kernel(
        name=entry.name,
        release=release,
        vmlinuz=source.vmlinuz,
        modules_dir=modules_dir,
        config_path=source.config,
        system_map=source.system_map,
        cmdline=entry.cmdline,
        cache_dir=derived,
    )


def _depmod_copy(modules_dir: Path, release: str, derived: Path) -> Path:
    """depmod writes into the folder it indexes; never write into a user's build tree."""
    target = derived / "modroot"

    def build(partial: Path) -> None:
        depmod = tools.require("depmod")
        shutil.copytree(modules_dir, partial / "lib" / "modules" / release, symlinks=False)
        tools.run_tool(
            [depmod, "-b", str(partial), release], what=f"depmod for {release}", writes=partial
        )

    cache.build_once(target, build)
    return target / "lib" / "modules" / release


def _optional(path: Path) -> Path | None:
    return path if path.exists() else None


def _run(
    argv: list[str], *, what: str, cwd: Path | None = None, show: bool = False, hint: str = ""
) -> str:
    log.debug("running %s", argv)
    result = subprocess.run(
        argv,
        cwd=cwd,
        stdout=None if show else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        message = f"could not {what}: {' '.join(argv)} exited {result.returncode}"
        if hint:
            message += f"; {hint}"
        stderr = (result.stderr or "").strip()
        # apt's own words for a name it does not know: the entry is wrong, not the network.
        error = ConfigError if "Unable to locate package" in stderr else InfraError
        raise error(message + "\n" + stderr)
    return result.stdout or ""
