"""The content-addressed cache: where it lives and how an entry is built exactly once.

Provisioned kernels, extracted vmlinux files and initramfs images are all built the same
way: under a file lock, into a temporary sibling, then renamed into place. A reader never
sees a half-built entry, and two processes (or xdist workers) building the same entry wait
for each other instead of racing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

CACHE_ENV = "BOOTHARNESS_CACHE"


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: an explicit override, else $BOOTHARNESS_CACHE, else XDG's cache."""
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "bootharness"


def digest(parts: Iterable[bytes | str]) -> str:
    """A stable hex digest of a sequence of parts; parts are length-prefixed so
    ``("ab", "c")`` and ``("a", "bc")`` differ."""
    hasher = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
    return hasher.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def build_once(target: Path, build: Callable[[Path], None]) -> bool:
    """Make ``target`` exist, building it at most once across processes.

    ``build`` receives a temporary path next to ``target`` (same file system) and must
    create the file or folder there; it is renamed into place only if ``build`` returns.
    Returns True when this call built the entry, False on a cache hit.
    """
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # another process built it while we waited for the lock
            return False
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        partial = scratch / target.name
        try:
            build(partial)
            os.replace(partial, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.debug("built cache entry %s", target)
        return True
