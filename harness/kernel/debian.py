"""Debian kernel packages: fetched with ``apt-get download``, kept, unpacked with ``dpkg-deb``.

The ``.deb`` is a cache entry of its own (``kernels/debian/PACKAGE.deb``, with a manifest), so a
damaged unpacked tree is rebuilt from it without the network, and a damaged ``.deb`` is fetched
again. Nothing is installed and no maintainer script runs; ``depmod -b`` writes the
``modules.dep`` that Debian leaves to its postinst.

apt's failures are told apart, because each has its own fix:

* a name apt does not know: :class:`PackageNotFound` (CONFIG_ERROR), naming the kernels.toml
  entry, how to list the versions apt has, and the closest names it knows;
* the package archive not answering: :class:`ArchiveUnreachable` (INFRA_ERROR, retryable);
* the cache's file system full, read-only or forbidden: :mod:`harness.cachefs`'s errors.

apt's own line is attached to each.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import cache, lazyimport, tools
from harness.kernel.catalogue import KernelEntry
from harness.outcome import ConfigError, Evidence, InfraError

if TYPE_CHECKING:
    import difflib
else:  # only the "did you mean" of an error message uses it
    difflib = lazyimport.module("difflib")

log = logging.getLogger(__name__)

METADATA = "kernel.json"
FORMAT = 1

# apt's words for a name (or version) it does not have: the entry is wrong, not the network.
_NOT_FOUND = (
    "Unable to locate package",
    "Couldn't find any package by",
    "has no installation candidate",
    "was not found",
)
# apt's words for an archive it could not reach or that answered wrongly.
_UNREACHABLE = (
    "Failed to fetch",
    "Could not resolve",
    "Temporary failure resolving",
    "Could not connect",
    "Connection failed",
    "Connection timed out",
    "Unable to connect",
    "Unable to fetch some archives",
    "Hash Sum mismatch",
    "Network is unreachable",
)


class PackageNotFound(ConfigError):
    """kernels.toml names a Debian package apt does not know."""


class ArchiveUnreachable(InfraError):
    """The package archive did not answer (network, proxy, mirror); worth a retry."""


def deb_path(package: str, cache_root: Path) -> Path:
    """Where the package's ``.deb`` is kept."""
    return cache_root / "kernels" / "debian" / f"{package}.deb"


def fetch(entry: KernelEntry, package: str, cache_root: Path, *, progress: bool) -> Path:
    """The package's ``.deb`` in the cache, downloaded if it is not there (or is damaged).

    Raises:
        PackageNotFound, ArchiveUnreachable: see the module docstring.
        CacheFull, CacheReadOnly, CacheDenied: the cache's file system refused the download.
        MissingToolError: apt-get is not installed.
    """
    target = deb_path(package, cache_root)

    def download(partial: Path) -> None:
        apt_get = tools.require("apt-get")
        # apt names the file after the version; the scratch folder holds nothing else.
        folder = partial.parent
        if progress:
            print(f"bootharness: downloading {package} ...", file=sys.stderr, flush=True)
        try:
            tools.run_tool(
                [apt_get, "download", package],
                what=f"download {package}",
                writes=folder,
                cwd=folder,
                show=progress,
            )
        except tools.ToolFailed as failure:
            raise classify(entry, package, failure) from None
        debs = sorted(folder.glob("*.deb"))
        if len(debs) != 1:
            raise InfraError(
                f"apt-get download {package} produced {len(debs)} .deb files, expected 1"
            )
        debs[0].rename(partial)

    if cache.build_once(target, download):
        log.info("downloaded %s into %s", package, target)
    return target


def unpack(deb: Path, package: str, partial: Path, *, progress: bool) -> None:
    """Unpack ``deb`` into ``partial/root``, index its modules, and describe it in
    ``partial/kernel.json``.

    Raises:
        ConfigError: the package holds no single ``boot/vmlinuz-*``.
        CacheFull, CacheReadOnly, CacheDenied, ToolFailed: dpkg-deb or depmod failed.
    """
    dpkg_deb = tools.require("dpkg-deb")
    depmod = tools.require("depmod")
    partial.mkdir(parents=True, exist_ok=True)
    version = tools.run_tool(
        [dpkg_deb, "-f", str(deb), "Version"], what="read the package version", writes=partial
    ).strip()
    root = partial / "root"
    if progress:
        print(f"bootharness: unpacking {deb.name} ...", file=sys.stderr, flush=True)
    tools.run_tool([dpkg_deb, "-x", str(deb), str(root)], what=f"unpack {deb.name}", writes=root)
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
        tools.run_tool(
            [depmod, "-b", str(root), release], what=f"depmod for {release}", writes=root
        )
    meta = {
        "format": FORMAT,
        "package": package,
        "version": version,
        "release": release,
        "vmlinuz": str(vmlinuz.relative_to(root)),
    }
    (partial / METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def read_metadata(folder: Path) -> dict[str, Any]:
    """The ``kernel.json`` of an unpacked package.

    Raises:
        ValueError: missing, unreadable or without the fields it must have.
    """
    try:
        meta = json.loads((folder / METADATA).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder / METADATA}: {error}") from None
    if not isinstance(meta, dict) or not {"release", "vmlinuz"} <= meta.keys():
        raise ValueError(f"{folder / METADATA}: not a description of an unpacked kernel")
    return meta


def classify(entry: KernelEntry, package: str, failure: tools.ToolFailed) -> Exception:
    """The error a failed ``apt-get download`` means (see the module docstring)."""
    lines = [line.strip() for line in failure.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("W:", "N:"))] or lines
    said = "\n".join(errors)
    where = f"kernel {entry.name!r}" + (f" in {entry.origin}" if entry.origin else "")
    evidence = Evidence(stderr=failure.stderr)
    if any(sign in said for sign in _NOT_FOUND):
        close = close_names(package)
        hint = f" Close names apt knows: {', '.join(close)}." if close else ""
        return PackageNotFound(
            f"{where}: debian_package = {package!r} is not a package apt knows.{hint} Fix the "
            "name in kernels.toml; list the versions apt has with `apt-cache search "
            f"--names-only '^{_family(package)}'` (or `apt-cache policy {package}`), and run "
            f"`apt-get update` if apt's lists are old.\napt-get said: {said}",
            evidence,
        )
    if any(sign in said for sign in _UNREACHABLE):
        return ArchiveUnreachable(
            f"{where}: could not download {package}: the package archive did not answer "
            "(network, proxy or mirror); check them and retry, this is worth a retry later."
            f"\napt-get said: {said}",
            evidence,
        )
    return InfraError(f"{where}: {failure.message}", evidence)


def close_names(package: str, limit: int = 3) -> list[str]:
    """Package names apt knows that look like ``package`` (from apt's local lists; no
    network). Empty when apt cannot say."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache is None:
        return []
    try:
        listed = subprocess.run(
            [apt_cache, "pkgnames", _family(package)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    return difflib.get_close_matches(package, listed, n=limit, cutoff=0.6)


def _family(package: str) -> str:
    """``linux-image-6.1.0-56-amd64`` -> ``linux-image-``: the name up to its version."""
    match = re.match(r"[a-z-]*?-(?=\d)", package)
    return match.group(0) if match else package.split("-", 1)[0] + "-"
