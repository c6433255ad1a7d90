"""Provision kernels into the cache and describe a provisioned kernel.

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
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import cache, manifest, tools
from harness.kernel import bzimage, debian
from harness.kernel.catalogue import DebianPackage, KernelEntry, LocalFiles
from harness.outcome import ConfigError

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
    version: str = ""  # the Debian package version, when there is one
    cache_dir: Path | None = None  # where derived files (vmlinux) may be cached

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
        parts = [self.release, self.version, cache.file_digest(self.vmlinuz)]
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


# Per process: the vmlinux entry of each bzImage (by its identity), so that only the first
# use digests the bzImage; every use still checks the entry itself (cache.build_once).
_VMLINUX: dict[tuple[object, ...], Path] = {}


def _cached_vmlinux(vmlinuz: Path, cache_dir: Path) -> Path | None:
    identity = (*manifest.file_identity(vmlinuz), str(cache_dir))
    target = _VMLINUX.get(identity)
    if target is None:
        target = cache_dir / f"vmlinux-{cache.file_digest(vmlinuz)[:16]}"
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
    return _describe_local(entry, entry.source, cache_root)


def is_provisioned(entry: KernelEntry, cache_root: Path) -> bool:
    """True when ``entry`` can boot without a download."""
    if isinstance(entry.source, DebianPackage):
        return (_package_dir(entry.source, cache_root) / debian.METADATA).exists()
    return entry.source.vmlinuz.exists()


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
    return Kernel(
        name=entry.name,
        release=release,
        vmlinuz=root / meta["vmlinuz"],
        modules_dir=root / "lib" / "modules" / release,
        config_path=_optional(root / "boot" / f"config-{release}"),
        system_map=_optional(root / "boot" / f"System.map-{release}"),
        cmdline=entry.cmdline,
        version=meta.get("version", ""),
        cache_dir=target,
    )


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
