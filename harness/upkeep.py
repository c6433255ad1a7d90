"""Keep the cache true and bounded: verify every entry, report what it holds, prune it.

Without pruning nothing ever leaves the cache: every boot adds a folder under ``runs/`` and
every template change a snapshot (~100 MB). :func:`prune` applies a :class:`Policy` of age
and size per area, oldest use first:

=============  ============================================  ==================
area           what                                          default policy
=============  ============================================  ==================
runs           ``runs/*``: one folder per CLI boot or bisect  7 days, 2 GiB
snapshots      ``snapshots/*``                               14 days, 4 GiB
images         ``initramfs/*`` and other derived images      30 days, 2 GiB
kernels        ``kernels/*`` (packages, their trees, vmlinux)  60 days unused
=============  ============================================  ==================

"Use" is the last time the harness used an entry (:func:`harness.cache.touch`) or made it.
Nothing used within the last hour goes whatever the caps say (a running job's files), and
no entry whose build lock is held. Debris goes too: folders of interrupted builds, entries
discarded but not yet deleted, lock files and manifests whose entry is gone. The pytest
plugin and the CLI prune at the end of a run, at most once an hour (:func:`prune_now`).

:func:`verify` checks every entry that has a manifest in full (each file's digest) and
discards what fails, so its next use builds it again; :func:`usage` sizes each area.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import cache, manifest

log = logging.getLogger(__name__)

DAY = 86400.0
GIB = 1 << 30
AREAS = ("runs", "snapshots", "images", "kernels", "other")
RECENT = 3600.0  # seconds: what was used this recently is never pruned
PRUNE_EVERY = 3600.0  # seconds between automatic prunes of one cache
_STAMP = ".last-prune"
SNAPSHOT_MANIFEST = "manifest.json"  # what harness.snapshot.store writes in a snapshot
# build_once's scratch folder for an entry NAME: ".NAME." and tempfile's 8 characters.
_SCRATCH = re.compile(r"^\.(.+)\.[a-z0-9_]{8}$")


@dataclass(frozen=True)
class Policy:
    """How old (days since last use) and how big (bytes) each area may grow; None: no
    limit. A size cap removes the least recently used entries first."""

    runs_age: float | None = 7
    runs_size: int | None = 2 * GIB
    snapshots_age: float | None = 14
    snapshots_size: int | None = 4 * GIB
    images_age: float | None = 30
    images_size: int | None = 2 * GIB
    kernels_age: float | None = 60
    kernels_size: int | None = None

    def limits(self, area: str) -> tuple[float | None, int | None]:
        age: float | None = getattr(self, f"{area}_age", None)
        size: int | None = getattr(self, f"{area}_size", None)
        return age, size


@dataclass
class Entry:
    """One thing in the cache that is used and removed as a whole."""

    path: Path
    area: str
    managed: bool  # it has a manifest
    bytes: int = 0  # allocated on disk (sparse files count what they use)
    used: float = 0.0  # last use or creation, seconds since the epoch


@dataclass
class Report:
    """What a verify or prune did (or would do, dry)."""

    removed: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    freed: int = 0
    damaged: list[tuple[Path, list[str]]] = field(default_factory=list)
    unmanaged: list[Path] = field(default_factory=list)  # no manifest: not verified
    intact: int = 0


def entries(root: Path) -> Iterator[Entry]:
    """Every entry of the cache at ``root``, with its area, size and last use."""
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or child.name.endswith(cache.LOCK_SUFFIX):
            continue
        if child.name == "runs" and child.is_dir():
            for run in sorted(child.iterdir()):
                if run.is_dir() and not run.name.startswith("."):
                    yield _entry(run, "runs", managed=False)
        elif child.name == "snapshots" and child.is_dir():
            yield from (e for e in _built(child, "snapshots") if e.path.is_dir())
        elif child.is_dir():
            area = "kernels" if child.name == "kernels" else "images"
            if child.name in ("accel", "verdicts"):
                area = "other"
            yield from _built(child, area)


def usage(root: Path) -> dict[str, tuple[int, int]]:
    """Area -> (entries, bytes on disk); plus ``debris`` (interrupted builds, leftovers)."""
    totals: dict[str, tuple[int, int]] = {area: (0, 0) for area in AREAS}
    for entry in entries(root):
        count, size = totals[entry.area]
        totals[entry.area] = (count + 1, size + entry.bytes)
    debris = list(_debris(root, older_than=0.0))
    totals["debris"] = (len(debris), sum(_allocated(path) for path in debris))
    return totals


def verify(root: Path, *, discard: bool = True) -> Report:
    """Check every entry with a manifest in full; discard (unless told not to) each one
    that fails, so that its next use builds it again."""
    report = Report()
    for entry in entries(root):
        if entry.area in ("runs", "other"):
            continue
        if not entry.managed:
            report.unmanaged.append(entry.path)
            continue
        try:
            problems = _full_problems(entry)
        except manifest.ManifestError as error:
            problems = [str(error)]
        if not problems:
            report.intact += 1
            continue
        report.damaged.append((entry.path, problems))
        if discard and _remove(entry, report, "damaged: " + problems[0]):
            log.warning("discarded damaged cache entry %s: %s", entry.path, problems[0])
    return report


def prune(root: Path, policy: Policy = Policy(), *, dry_run: bool = False) -> Report:
    """Remove what ``policy`` does not keep, and debris (see the module docstring)."""
    report = Report()
    now = time.time()
    by_area: dict[str, list[Entry]] = {}
    for entry in entries(root):
        by_area.setdefault(entry.area, []).append(entry)
    doomed: list[tuple[Entry, str]] = []
    for area, found in by_area.items():
        age, size = policy.limits(area)
        kept = 0
        for entry in sorted(found, key=lambda e: e.used, reverse=True):  # newest first
            idle = now - entry.used
            why = ""
            if idle > RECENT:
                if age is not None and idle > age * DAY:
                    why = f"unused for {idle / DAY:.1f} days (policy: {age:g})"
                elif size is not None and kept + entry.bytes > size:
                    why = f"over the {area} size cap of {size / GIB:g} GiB"
            if why:
                doomed.append((entry, why))
            else:
                kept += entry.bytes
    # Outer entries first: what lives inside one (a package's vmlinux) goes with it.
    gone: list[Path] = []
    for entry, why in sorted(doomed, key=lambda item: len(item[0].path.parts)):
        if any(entry.path.is_relative_to(outer) for outer in gone):
            continue
        if _remove(entry, report, why, dry_run=dry_run):
            gone.append(entry.path)
    for path in _debris(root, older_than=RECENT):
        report.freed += _allocated(path)
        report.removed.append((path, "left over"))
        if not dry_run:
            _delete(path)
    return report


def prune_now(root: Path, policy: Policy = Policy()) -> Report | None:
    """Prune ``root`` unless that was done less than an hour ago (the end of a run calls
    this). Never raises: a cache that cannot be pruned still serves; a warning says why."""
    stamp = root / _STAMP
    try:
        if time.time() - stamp.stat().st_mtime < PRUNE_EVERY:
            return None
    except OSError:
        pass
    try:
        root.mkdir(parents=True, exist_ok=True)
        stamp.touch()
        report = prune(root, policy)
    except OSError as error:
        log.warning("could not prune the cache %s: %s", root, error)
        return None
    if report.removed:
        log.info(
            "pruned %d cache entries from %s, %s freed",
            len(report.removed),
            root,
            _size(report.freed),
        )
    return report


def describe(report: Report) -> list[str]:
    """Lines for a person: what was removed or found, and the total freed."""
    lines = [f"removed {path} ({why})" for path, why in report.removed]
    for path, problems in report.damaged:
        lines.append(f"DAMAGED {path}:")
        lines += [f"    {problem}" for problem in problems[:5]]
    return lines


# -- entries


def _built(folder: Path, area: str) -> Iterator[Entry]:
    """Entries made by :func:`harness.cache.build_once` below ``folder``.

    Every such entry, of this harness or an older one, has its lock file beside it
    (``NAME.lock``): that is what makes a path an entry. A folder without one is a namespace
    (``kernels/debian``), looked into; a file without one is someone else's and left alone,
    so pruning never takes a file out of a structure it does not know.
    """
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    names = {child.name for child in children}
    for child in children:
        name = child.name
        if name.startswith(".") or name.endswith((cache.LOCK_SUFFIX, manifest.SIDECAR_SUFFIX)):
            continue
        if name + cache.LOCK_SUFFIX in names:
            yield _entry(child, area, managed=_has_manifest(child))
            if child.is_dir() and not child.is_symlink():
                yield from _nested(child, area)
        elif child.is_dir() and not child.is_symlink():
            yield from _built(child, area)


def _has_manifest(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return (path / manifest.FOLDER_MANIFEST).exists() or (path / SNAPSHOT_MANIFEST).exists()
    return path.with_name(path.name + manifest.SIDECAR_SUFFIX).exists()


def _nested(folder: Path, area: str) -> Iterator[Entry]:
    """File entries kept inside a folder entry (a package's extracted vmlinux)."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    names = {child.name for child in children}
    for child in children:
        if child.is_file() and child.name + cache.LOCK_SUFFIX in names:
            yield _entry(child, area, managed=_has_manifest(child))


def _entry(path: Path, area: str, *, managed: bool) -> Entry:
    size = _allocated(path)
    sidecar = path.with_name(path.name + manifest.SIDECAR_SUFFIX)
    if sidecar.exists():
        size += _allocated(sidecar)
    used = cache.last_used(path)
    if area == "kernels" and path.suffix == ".deb":
        # A package's .deb is read only to unpack it again: it lives as long as its tree.
        used = max(used, cache.last_used(path.with_suffix("")))
    if area == "runs":
        with contextlib.suppress(OSError):
            used = max([used, *(child.stat().st_mtime for child in path.iterdir())])
    return Entry(path, area, managed, size, used)


def _full_problems(entry: Entry) -> list[str]:
    if entry.area == "snapshots":
        where = entry.path / SNAPSHOT_MANIFEST
        return manifest.read(entry.path, where).problems(full=True)
    return cache.check(entry.path, full=True)


def _remove(entry: Entry, report: Report, why: str, *, dry_run: bool = False) -> bool:
    """Remove one entry under its build lock (skipped if busy); True if it went."""
    lock_path = Path(str(entry.path) + cache.LOCK_SUFFIX)
    if dry_run:
        report.removed.append((entry.path, why))
        report.freed += entry.bytes
        return True
    size = entry.bytes
    if entry.area == "runs":  # a run's folder has no lock: its age keeps a live one
        _delete(entry.path)
        report.removed.append((entry.path, why))
        report.freed += size
        return True
    try:
        with cache.locked(lock_path, timeout=0):
            cache.discard(entry.path)
    except TimeoutError:
        log.info("cache entry %s is in use; kept", entry.path)
        return False
    except OSError as error:
        log.warning("could not remove %s: %s", entry.path, error)
        return False
    with contextlib.suppress(OSError):
        lock_path.unlink()
    report.removed.append((entry.path, why))
    report.freed += size
    return True


def _debris(root: Path, *, older_than: float) -> Iterator[Path]:
    """Leftovers: interrupted builds (``.NAME.xxxx`` folders), discarded entries not yet
    deleted, ``*.partial`` files, and lock files or manifests whose entry is gone."""
    now = time.time()
    if not root.is_dir():
        return
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        names = set(files) | set(subfolders)
        candidates = [*subfolders, *files]
        entry_inside = (here / manifest.FOLDER_MANIFEST).exists() or "kernel.json" in names
        if entry_inside or here.name == "runs" or SNAPSHOT_MANIFEST in names:
            subfolders[:] = []  # an entry's own files, or runs (pruned by age and size)
        for name in candidates:
            path = here / name
            if not _old(path, now, older_than):
                continue
            if name.startswith(".discarded-") or name.endswith(".partial"):
                yield path
            elif name not in files and (match := _SCRATCH.match(name)):
                # An interrupted build's folder, unless that build is still going on.
                if _lock_is_free(here / (match.group(1) + cache.LOCK_SUFFIX)):
                    yield path
            elif name.endswith(cache.LOCK_SUFFIX):
                owner = name.removesuffix(cache.LOCK_SUFFIX)
                if owner not in names and _lock_is_free(path):
                    yield path
            elif name.endswith(manifest.SIDECAR_SUFFIX) and (
                name.removesuffix(manifest.SIDECAR_SUFFIX) not in names
            ):
                yield path
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]


def _lock_is_free(path: Path) -> bool:
    try:
        with cache.locked(path, timeout=0):
            return True
    except OSError:  # TimeoutError included
        return False


def _old(path: Path, now: float, older_than: float) -> bool:
    try:
        return now - path.lstat().st_mtime >= older_than
    except OSError:
        return False


def _allocated(path: Path) -> int:
    """Bytes on disk under ``path`` (allocated blocks: a sparse RAM file counts its data)."""
    try:
        info = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return info.st_blocks * 512
    total = info.st_blocks * 512
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def stamp_info(root: Path) -> str:
    """When the cache was last pruned, for ``cache du``."""
    try:
        when = (root / _STAMP).stat().st_mtime
    except OSError:
        return "never pruned"
    return "last pruned " + time.strftime("%Y-%m-%d %H:%M", time.localtime(when))


def policy_from(values: dict[str, float | None]) -> Policy:
    """A policy from ``AREA_age`` (days) and ``AREA_size`` (GiB) values, a negative value
    meaning no limit; None keeps the default."""
    policy = Policy()
    for name, value in values.items():
        if value is None:
            continue
        chosen: float | int | None = None
        if value >= 0:
            chosen = int(value * GIB) if name.endswith("_size") else float(value)
        changes: dict[str, Any] = {name: chosen}
        policy = dataclasses.replace(policy, **changes)
    return policy


def dump(report: Report) -> str:
    """The report as JSON (for scripts)."""
    return json.dumps(
        {
            "removed": [[str(p), why] for p, why in report.removed],
            "freed": report.freed,
            "damaged": [[str(p), problems] for p, problems in report.damaged],
            "unmanaged": [str(p) for p in report.unmanaged],
            "intact": report.intact,
        },
        indent=1,
    )
