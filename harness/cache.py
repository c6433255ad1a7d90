"""The content-addressed cache: where it lives and how an entry is built exactly once.

Provisioned kernels, extracted vmlinux files and initramfs images are all built the same
way: under a file lock, into a temporary sibling, then renamed into place. A reader never
sees a half-built entry, and two processes (or xdist workers) building the same entry wait
for each other instead of racing.

**Records** (:func:`remember`, :func:`recall`) keep what a warm run would otherwise work out
again in every process (which image a spec builds, a file's digest, QEMU's version): a small
JSON file holding a key, a value and the identity (size, inode, times) of every file the
value was made from. A record is used only while its key matches and none of those files has
changed, so it never says more than the files do; make/ccache trust the same identity.
The locks are ``flock(2)`` locks: released by the kernel when a process dies, and nothing
to import beyond the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

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
    with locked(str(target) + ".lock"):
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


# -- locks

_LOCK_POLL = 0.05


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], *, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) for the block.

    Other processes (and other open descriptions in this one) wait; the kernel releases the
    lock when the holder exits, however it dies. The lock file is left in place.

    Raises:
        TimeoutError: ``timeout`` seconds passed without getting the lock.
        OSError: the lock file cannot be created.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"the lock {path} is held elsewhere") from None
                    time.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- records

Identity = tuple[str, int, int, int, int, int]


def file_identity(path: Path) -> Identity:
    """``path``, its device, inode, size and times: what changes when the file may have.

    Raises:
        OSError: ``path`` cannot be stat'ed.
    """
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def recall(record: Path, key: str) -> Any:
    """The value :func:`remember` kept in ``record`` under ``key``; None when there is none,
    the key differs, or a file it was made from has changed (or is gone)."""
    try:
        data = json.loads(record.read_text())
        if data.get("key") != key:
            return None
        for item in data["inputs"]:
            if list(file_identity(Path(item[0]))) != item:
                return None
        return data["value"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def remember(record: Path, key: str, value: Any, inputs: Iterable[Identity]) -> None:
    """Keep ``value`` (JSON) in ``record`` under ``key``, valid while every file keeps the
    identity given in ``inputs`` (taken *before* the files were read, so a file changed
    meanwhile invalidates the record). Written atomically; a cache that cannot be written
    only means the next run works the value out again."""
    try:
        data = {"key": key, "inputs": [list(identity) for identity in inputs], "value": value}
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(json.dumps(data) + "\n")
        os.replace(partial, record)
    except OSError as error:
        log.debug("record %s not kept: %s", record, error)


def remembered_digest(path: Path, record: Path, digest: Callable[[Path], str] = file_digest) -> str:
    """``digest(path)`` (SHA-256 of the content by default), kept in ``record`` while the
    file's identity stays the same.

    Raises:
        OSError: ``path`` cannot be read.
    """
    key = f"{digest.__module__}.{digest.__qualname__} {path}"
    known = recall(record, key)
    if isinstance(known, str):
        return known
    before = file_identity(path)
    value = digest(path)
    remember(record, key, value, [before])
    return value
