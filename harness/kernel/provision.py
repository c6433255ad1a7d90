"""Provision kernels into the cache and describe a provisioned kernel.

A Debian kernel package is downloaded with ``apt-get download`` and unpacked with
``dpkg-deb -x`` (no install, no maintainer scripts); ``depmod -b`` then writes modules.dep,
which Debian's packages leave to their postinst. Everything happens in a scratch folder that
is renamed into place at the end (see :func:`harness.cache.build_once`), so an interrupted
download never counts as provisioned and two processes never provision the same kernel twice.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import cache, tools
from harness.kernel import bzimage
from harness.kernel.catalogue import DebianPackage, KernelEntry, LocalFiles
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)

_METADATA = "kernel.json"
_FORMAT = 1


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


@functools.cache
def _cached_vmlinux(vmlinuz: Path, cache_dir: Path) -> Path | None:
    target = cache_dir / f"vmlinux-{image_digest(vmlinuz, cache_dir)[:16]}"
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
        if cache.build_once(target, build):
            log.info("extracted %s from %s", target.name, vmlinuz)
    except _NoPvh:
        log.info("%s has no PVH entry; booting the bzImage", vmlinuz)
        return None
    return target


class _NoPvh(Exception):
    pass


def provision(entry: KernelEntry, cache_root: Path, *, progress: bool | None = None) -> Kernel:
    """Make ``entry`` bootable: fetch and unpack it if needed, and describe it.

    Idempotent and safe across processes. ``progress`` shows the download's progress
    (default: when stderr is a terminal).

    Raises:
        ConfigError: a local file is missing or the package holds no kernel.
        InfraError: apt-get or dpkg-deb failed (network, unknown package).
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
        return (_package_dir(entry.source, cache_root) / _METADATA).exists()
    return entry.source.vmlinuz.exists()


def _package_dir(source: DebianPackage, cache_root: Path) -> Path:
    return cache_root / "kernels" / "debian" / source.package


def _provision_package(
    entry: KernelEntry, source: DebianPackage, cache_root: Path, progress: bool
) -> Kernel:
    target = _package_dir(source, cache_root)

    def build(partial: Path) -> None:
        _fetch_and_unpack(source.package, partial, progress)

    if cache.build_once(target, build):
        log.info("provisioned %s into %s", source.package, target)
    meta = json.loads((target / _METADATA).read_text())
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


def _fetch_and_unpack(package: str, partial: Path, progress: bool) -> None:
    apt_get = tools.require("apt-get")
    dpkg_deb = tools.require("dpkg-deb")
    depmod = tools.require("depmod")
    download = partial / "download"
    download.mkdir(parents=True)
    if progress:
        print(f"bootharness: downloading {package} ...", file=sys.stderr, flush=True)
    _run(
        [apt_get, "download", package],
        cwd=download,
        what=f"download {package}",
        show=progress,
        hint="check the package name with `apt-cache policy NAME` and run `apt-get update`",
    )
    debs = sorted(download.glob("*.deb"))
    if len(debs) != 1:
        raise InfraError(f"apt-get download {package} produced {len(debs)} .deb files, expected 1")
    deb = debs[0]
    version = _run([dpkg_deb, "-f", str(deb), "Version"], what="read the package version").strip()
    root = partial / "root"
    if progress:
        print(f"bootharness: unpacking {deb.name} ...", file=sys.stderr, flush=True)
    _run([dpkg_deb, "-x", str(deb), str(root)], what=f"unpack {deb.name}")
    shutil.rmtree(download)
    vmlinuz_files = sorted((root / "boot").glob("vmlinuz-*"))
    if len(vmlinuz_files) != 1:
        raise ConfigError(
            f"package {package} holds {len(vmlinuz_files)} boot/vmlinuz-* files, expected 1; "
            "is it a linux-image package?"
        )
    vmlinuz = vmlinuz_files[0]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    modules_dir = root / "lib" / "modules" / release
    if modules_dir.is_dir() and not (modules_dir / "modules.dep").exists():
        _run([depmod, "-b", str(root), release], what=f"depmod for {release}")
    meta = {
        "format": _FORMAT,
        "package": package,
        "version": version,
        "release": release,
        "vmlinuz": str(vmlinuz.relative_to(root)),
    }
    (partial / _METADATA).write_text(json.dumps(meta, indent=2) + "\n")


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
        _run([depmod, "-b", str(partial), release], what=f"depmod for {release}")

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
