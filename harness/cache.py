"""The content-addressed cache: where it lives and how an entry is built exactly once.

Provisioned kernels, extracted vmlinux files and initramfs images are all built the same
way: under a file lock, into a temporary sibling, then renamed into place. A reader never
sees a half-built entry, and two processes (or xdist workers) building the same entry wait
for each other instead of racing. Each entry gets a manifest at creation and is checked
against it on every use (:mod:`harness.manifest`): a damaged entry is rebuilt, never used.
Writes that the file system refuses become errors that name why (:mod:`harness.cachefs`).

**Records** (:func:`remember`, :func:`recall`) keep what a warm run would otherwise work out
again in every process (which image a spec builds, a file's digest, QEMU's version): a small
JSON file holding a key, a value and the identity (size, inode, times) of every file the
value was made from. A record is used only while its key matches and none of those files has
changed, so it never says more than the files do; make/ccache trust the same identity.
The locks are ``flock(2)`` locks (:func:`locked`): released by the kernel when a process
dies, and nothing to import beyond the standard library.
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
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from harness import cachefs, manifest

T = TypeVar("T")

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


class CacheCorruptWarning(UserWarning):
    """A cache entry no longer matched its manifest; it was discarded and built again."""


# Entries without a manifest were made by an older harness. ``adopt`` (a structural check
# of the entry) lets them stay, with a manifest written for them; without it they are
# rebuilt. Their last use is the time of their lock file (see :func:`touch`).
Adopt = Callable[[Path], None]
LOCK_SUFFIX = ".lock"
_TOUCH_EVERY = 3600.0  # seconds: a use refreshes the entry's last-use time at most hourly
# Per process: parsed manifests by the manifest file's identity.
_MANIFESTS: dict[tuple[str, int, int, int, int, int], manifest.Manifest] = {}


def build_once(
    target: Path,
    build: Callable[[Path], None],
    *,
    verify: bool = True,
    adopt: Adopt | None = None,
) -> bool:
    """Make ``target`` exist and hold what it was built with, building it at most once
    across processes.

    ``build`` receives a temporary path next to ``target`` (same file system) and must
    create the file or folder there; a manifest of it is written (:mod:`harness.manifest`)
    and it is renamed into place only if ``build`` returns. On every use the entry gets the
    cheap check against its manifest; an entry that fails it is discarded with a
    :class:`CacheCorruptWarning` and built again, never used. ``verify=False`` is for
    entries that keep and check a manifest of their own (snapshots).

    Returns True when this call built the entry, False on a cache hit.

    Raises:
        CacheFull, CacheReadOnly, CacheDenied: the cache's file system refused a write.
        Whatever ``build`` raises (the entry is then not created).
    """
    if _intact(target, verify):
        touch(target)
        return False
    what = f"building cache entry {target.name}"
    with cachefs.writing(target, what):
        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(str(target) + LOCK_SUFFIX):
            # Another process may have built (or repaired) it while we waited for the lock.
            problem = _problem(target, verify, adopt) if _exists(target) else None
            if problem == "":
                return False
            if problem is not None:
                message = (
                    f"cache entry {target} is damaged ({problem}); discarded, building it again"
                )
                log.warning("%s", message)
                warnings.warn(CacheCorruptWarning(message), stacklevel=2)
                discard(target)
            scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            partial = scratch / target.name
            try:
                build(partial)
                if verify:
                    _write_manifest(partial, target)
                os.replace(partial, target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    log.debug("built cache entry %s", target)
    return True


def check(target: Path, *, full: bool = False) -> list[str]:
    """What no longer matches ``target``'s manifest (empty: intact).

    Raises:
        ManifestError: ``target`` has no (readable) manifest.
    """
    return _manifest_of(target).problems(full=full)


def discard(target: Path) -> None:
    """Take ``target`` (and its manifest) out of the cache at once: renamed away, then
    deleted. Call it holding the entry's lock; a process that has its files open keeps them."""
    sidecar = target.with_name(target.name + manifest.SIDECAR_SUFFIX)
    trash = target.with_name(f".discarded-{target.name}-{os.urandom(4).hex()}")
    if sidecar.exists():
        sidecar.unlink()
    if _exists(target):
        os.replace(target, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)


def touch(target: Path) -> None:
    """Note that ``target`` was used now (its lock file's time), at most once an hour;
    pruning keeps what was used recently. Never raises (a read-only cache still serves)."""
    lock = Path(str(target) + LOCK_SUFFIX)
    try:
        if time.time() - lock.stat().st_mtime > _TOUCH_EVERY:
            os.utime(lock)
    except OSError:
        pass


def last_used(target: Path) -> float:
    """When ``target`` was last used or made (seconds since the epoch); 0 when unknown."""
    times = []
    for path in (Path(str(target) + LOCK_SUFFIX), target):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


def _exists(target: Path) -> bool:
    return target.exists() or target.is_symlink()


def _intact(target: Path, verify: bool) -> bool:
    """The lock-free fast path: the entry exists and passes the cheap check."""
    if not _exists(target):
        return False
    if not verify:
        return True
    try:
        return not _manifest_of(target).problems()
    except manifest.ManifestError:
        return False


def _problem(target: Path, verify: bool, adopt: Adopt | None) -> str:
    """Why the existing ``target`` may not be used ("" when it may); adopts an entry of an
    older harness when ``adopt`` accepts it. Called holding the entry's lock."""
    if not verify:
        return ""
    try:
        problems = _manifest_of(target).problems()
    except manifest.ManifestError as error:
        if adopt is None:
            return f"{error}: made by an older harness or interrupted"
        try:
            adopt(target)
            _write_manifest(target, target)
        except Exception as failure:  # the check names what it found wrong
            return f"{error}, and it fails the check of an older entry: {failure}"
        log.info("adopted cache entry %s (made by an older harness)", target)
        return ""
    return "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")


def _manifest_of(target: Path) -> manifest.Manifest:
    where = manifest.location(target)
    try:
        identity = manifest.file_identity(where)
    except OSError:
        raise manifest.ManifestError(f"{target} has no manifest ({where.name})") from None
    known = _MANIFESTS.get(identity)
    if known is None:
        known = manifest.read(target, where)
        _MANIFESTS[identity] = known
    return known


def _write_manifest(entry: Path, target: Path) -> None:
    """Write the manifest of ``entry`` (built for ``target``): inside a folder, where it
    moves with it; beside a file, at the target's sidecar (before the file moves in, so an
    entry is never seen without its manifest)."""
    made = manifest.make(entry)
    if entry.is_dir() and not entry.is_symlink():
        manifest.write(made, entry / manifest.FOLDER_MANIFEST)
    else:
        manifest.write(made, target.with_name(target.name + manifest.SIDECAR_SUFFIX))


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

# A file's identity, as manifests compare it (:func:`harness.manifest.file_identity`).
Identity = manifest.Identity
file_identity = manifest.file_identity


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


def remembered(record: Path, key: str, source: Path, work_out: Callable[[], T]) -> T:
    """``work_out()`` (JSON data made from the file ``source``: its digest, what a binary
    says of itself), kept in ``record`` under ``key`` while ``source``'s identity stays the
    same.

    Raises:
        OSError: ``source`` cannot be stat'ed; whatever ``work_out`` raises.
    """
    known = recall(record, key)
    if known is not None:
        return cast(T, known)
    before = file_identity(source)
    value = work_out()
    remember(record, key, value, [before])
    return value


def remembered_digest(path: Path, record: Path, digest: Callable[[Path], str] = file_digest) -> str:
    """``digest(path)`` (SHA-256 of the content by default), kept in ``record`` while the
    file's identity stays the same.

    Raises:
        OSError: ``path`` cannot be read.
    """
    key = f"{digest.__module__}.{digest.__qualname__} {path}"
    return str(remembered(record, key, path, lambda: digest(path)))
