"""Saved snapshots in the cache: the folder, its manifest, its checks, and discarding it.

A snapshot folder holds the migration stream (:data:`STATE_FILE`), with the ``shared-ram``
mechanism the guest's RAM (:data:`RAM_FILE`), and the manifest (:data:`MANIFEST`: format,
mechanism, each file's size and digest), written last, so an entry without one is incomplete.
Before first use every file is checked against it (content digest over the file's data
extents, kept as a record while the file's size, inode and times stay the same), so a
truncated or corrupt snapshot is found before QEMU sees it and is never half used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cache
from harness.manifest import content_digest as content_digest  # re-exported
from harness.manifest import file_identity as file_identity
from harness.snapshot.errors import SnapshotCorrupt

log = logging.getLogger(__name__)

FORMAT = "bootharness-snapshot-1"
MECHANISMS = ("shared-ram", "stream")
STATE_FILE = "state.mig"
RAM_FILE = "ram.img"
MANIFEST = "manifest.json"

# -- digests: the sparse-aware content digest of harness.manifest (guest RAM files are
# mostly holes), cached per process by file identity


def verified_digest(path: Path) -> str:
    """:func:`content_digest` of a snapshot file, kept next to it (``.<name>.digest.json``)
    while the file's size, inode and times stay the same: every process checks a snapshot
    before its first use, and digesting a RAM file costs more than the restore itself (a
    ``bootharness boot --snapshot`` is one process per restore)."""
    return cache.remembered_digest(
        path, path.with_name(f".{path.name}.digest.json"), content_digest
    )


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
        identity = file_identity(manifest_path)
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
        if verified_digest(file) != expected["digest"]:
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
    with cache.locked(str(path) + ".lock"):
        if not path.exists():
            return False
        if only is not None:
            try:
                if file_identity(path / MANIFEST) != only.manifest_identity:
                    return False
            except OSError:
                pass  # no manifest any more: not a usable snapshot either way
        # Rename first: the entry disappears at once, and nothing is left half-removed.
        trash = path.parent / f".discarded-{path.name}-{os.urandom(4).hex()}"
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    log.warning("discarded snapshot %s: %s", path, reason)
    return True


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
            name: {"size": (target / name).stat().st_size, "digest": verified_digest(target / name)}
            for name in files
        },
    }
    partial = target / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(partial, target / MANIFEST)
