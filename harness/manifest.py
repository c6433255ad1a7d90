"""What a cache entry held when it was made, and the checks that it still does.

Every entry :func:`harness.cache.build_once` makes (a provisioned kernel's folder, an extracted
vmlinux, an initramfs image, a disk image) gets a manifest written at creation: each file's
size, modification time, content digest and a sampled digest (a few blocks of it). A full
disk, a copy cut short or bit rot then shows as a mismatch, and the entry is rebuilt instead of
booted. Two checks:

* **cheap**, on every use: every file's size and modification time, and the sampled digest
  of the files whose identity (inode, size, times) this process has not seen verified yet
  (for a folder, of its largest files: a copy cut short truncates those first). Microseconds
  for a file, ~0.1 s for a Debian kernel's 4000 files.
* **full**, on demand (``bootharness cache verify``) or when the cheap one sees a changed
  time: every file's content digest.

A folder's manifest lives inside it (:data:`FOLDER_MANIFEST`, renamed into place with the
folder); a file's beside it (``NAME`` + :data:`SIDECAR_SUFFIX`). A snapshot keeps its own
manifest (``harness.snapshot.store``) with the same file records and the sparse-aware
:func:`content_digest`, so one checker reads both.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

FORMAT = "bootharness-manifest-1"
FOLDER_MANIFEST = ".bootharness-manifest.json"
SIDECAR_SUFFIX = ".manifest.json"
# Digest methods: plain SHA-256 of the bytes, or the sparse-aware one (holes and zero pages
# skipped) used for guest RAM files, which are mostly holes.
SHA256 = "sha256"
CONTENT = "content"
_SAMPLE_BLOCK = 64 * 1024
_SAMPLED_FILES = 8  # a folder's largest files get their samples read by the cheap check
_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)


class ManifestError(Exception):
    """A manifest is missing, unreadable or of another format (the message says which)."""


class FileRecord(NamedTuple):
    """One file (or symlink) of an entry, as it was made. (A named tuple: a kernel package's
    manifest makes ~4000 of them on every first use in a process.)"""

    size: int
    mtime_ns: int
    digest: str
    sample: str = ""
    link: str | None = None  # a symlink's target (size, times and digests then unused)

    def to_json(self) -> dict[str, Any]:
        if self.link is not None:
            return {"link": self.link}
        return {
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "digest": self.digest,
            "sample": self.sample,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileRecord:
        if "link" in data:
            return cls(0, 0, "", "", str(data["link"]))
        return cls(
            int(data["size"]),
            int(data.get("mtime_ns", 0)),
            str(data["digest"]),
            str(data.get("sample", "")),
        )


@dataclass(frozen=True)
class Manifest:
    """The files of one entry (paths relative to the entry; ``""`` for a file entry)."""

    entry: Path
    files: Mapping[str, FileRecord]
    method: str = SHA256
    created: float = 0.0
    details: Mapping[str, Any] | None = None

    def path_of(self, name: str) -> Path:
        return self.entry / name if name else self.entry

    @property
    def size(self) -> int:
        """Bytes the entry's files hold (their apparent size)."""
        return sum(record.size for record in self.files.values())

    def problems(self, *, full: bool = False) -> list[str]:
        """What no longer matches, one line per file: empty when the entry is intact.

        ``full`` digests every file; otherwise sizes and times are compared and the sampled
        digest read where this process has not verified the file as it is now.
        """
        found: list[str] = []
        # Plain strings, not Path objects: a kernel package's entry holds ~4000 files and
        # this runs on every use of it.
        base = str(self.entry)
        prefix = base.rstrip("/") + "/"
        sampled = {name for name, _ in self._largest(_SAMPLED_FILES)}
        for name, record in self.files.items():
            path = prefix + name if name else base
            problem = _problem(path, record, self.method, full=full, sample=name in sampled)
            if problem:
                found.append(f"{path}: {problem}")
        return found

    def _largest(self, count: int) -> list[tuple[str, FileRecord]]:
        """The ``count`` largest files: a copy cut short truncates those first."""
        return heapq.nlargest(count, self.files.items(), key=lambda item: item[1].size)

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "method": self.method,
            "created": self.created,
            "details": dict(self.details or {}),
            "files": {name: record.to_json() for name, record in sorted(self.files.items())},
        }
        return json.dumps(data, indent=1, sort_keys=True) + "\n"


def location(entry: Path) -> Path:
    """Where the manifest of ``entry`` lives (inside a folder, beside a file)."""
    if entry.is_dir() and not entry.is_symlink():
        return entry / FOLDER_MANIFEST
    return entry.with_name(entry.name + SIDECAR_SUFFIX)


def make(
    entry: Path,
    *,
    method: str = SHA256,
    exclude: Iterable[str] = (),
    details: Mapping[str, Any] | None = None,
) -> Manifest:
    """Record ``entry`` (a file or a folder, walked without following symlinks) as it is.

    Raises:
        OSError: a file cannot be read.
    """
    skip = {FOLDER_MANIFEST, *exclude}
    files: dict[str, FileRecord] = {}
    if entry.is_dir() and not entry.is_symlink():
        for folder, subfolders, names in os.walk(entry):
            subfolders.sort()
            for name in sorted(names) + [d for d in subfolders if Path(folder, d).is_symlink()]:
                path = Path(folder, name)
                relative = path.relative_to(entry).as_posix()
                if relative in skip:
                    continue
                files[relative] = record_of(path, method)
    else:
        files[""] = record_of(entry, method)
    return Manifest(entry, files, method, time.time(), details)


def record_of(path: Path, method: str = SHA256) -> FileRecord:
    """The record of one file as it is now."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return FileRecord(0, 0, "", link=os.readlink(path))
    return FileRecord(
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        digest=digest_of(path, method),
        sample=sample_digest(path, info.st_size),
    )


def write(manifest: Manifest, where: Path) -> None:
    """Write ``manifest`` to ``where`` atomically (a temporary file renamed into place)."""
    partial = where.with_name(f".{where.name}.{os.getpid()}.partial")
    partial.write_text(manifest.to_json())
    os.replace(partial, where)


def read(entry: Path, where: Path | None = None) -> Manifest:
    """The manifest of ``entry`` (from :func:`location`, or ``where``).

    A snapshot's own manifest (``harness.snapshot.store``) reads as one too.

    Raises:
        ManifestError: no manifest, an unreadable one, or one of another format.
    """
    path = where or location(entry)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{entry} has no manifest ({path.name})") from None
    except (OSError, ValueError) as error:
        raise ManifestError(f"{entry}: unreadable manifest {path}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ManifestError(f"{entry}: {path} is not a manifest")
    snapshot = str(data.get("format", "")).startswith("bootharness-snapshot-")
    if data.get("format") != FORMAT and not snapshot:
        raise ManifestError(f"{entry}: manifest {path} has format {data.get('format')!r}")
    try:
        files = {str(k): FileRecord.from_json(v) for k, v in data["files"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ManifestError(f"{entry}: manifest {path} has a bad file record: {error}") from None
    method = CONTENT if snapshot else str(data.get("method", SHA256))
    created = float(data.get("created", 0.0) or 0.0)
    return Manifest(entry, files, method, created, data.get("details"))


# -- digests


def digest_of(path: Path, method: str = SHA256) -> str:
    """The digest of ``path`` by ``method`` (:data:`SHA256` or :data:`CONTENT`)."""
    if method == CONTENT:
        return content_digest(path)
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sample_digest(path: Path, size: int) -> str:
    """SHA-256 of three blocks of the file (start, middle, end) and its size: cheap to read
    again, and different after most truncations, overwrites and copies cut short."""
    hasher = hashlib.sha256(size.to_bytes(8, "little"))
    offsets = sorted({0, max(0, size // 2 - _SAMPLE_BLOCK // 2), max(0, size - _SAMPLE_BLOCK)})
    with path.open("rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            hasher.update(handle.read(_SAMPLE_BLOCK))
    return hasher.hexdigest()


# A file's path, device, inode, size, modification and change times.
Identity = tuple[str, int, int, int, int, int]
# Per process: file identities whose content was verified, so repeated cheap checks of an
# unchanged file cost one stat.
_VERIFIED: set[Identity] = set()
_DIGESTS: dict[Identity, str] = {}


def file_identity(path: str | Path) -> Identity:
    """``path``, its device, inode, size and times: what changes when the file may have.

    Raises:
        OSError: ``path`` cannot be stat'ed.
    """
    return _identity(path, os.stat(path))


def _identity(path: str | Path, st: os.stat_result) -> Identity:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_digest(path: Path) -> str:
    """SHA-256 of the content of ``path``: each non-zero 4 KiB page with its offset, and the size.

    Guest RAM files are sparse (a 512 MiB guest touches ~100 MiB at a snapshot's ready
    point), so only the file's data extents are read and holes are skipped; zero pages count
    as holes, so the digest depends on the content alone, not on how it is laid out on disk
    (a sparse or a full copy digest the same). Cached per process while the file's size,
    inode and times stay the same.
    """
    identity = file_identity(path)
    known = _DIGESTS.get(identity)
    if known is not None:
        return known
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        done = 0  # pages before this offset have been digested
        while done < size:
            try:
                start = os.lseek(fd, done, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            offset = max(done, start - start % _PAGE)
            handle.seek(offset)
            while offset < end:
                chunk = handle.read(min(1 << 20, end - offset + (-end) % _PAGE))
                if not chunk:
                    break
                for at in range(0, len(chunk), _PAGE):
                    page = chunk[at : at + _PAGE]
                    if page != _ZERO_PAGE[: len(page)]:
                        hasher.update((offset + at).to_bytes(8, "little"))
                        hasher.update(page)
                offset += len(chunk)
            done = max(offset, end)
        hasher.update(size.to_bytes(8, "little"))
    value = hasher.hexdigest()
    _DIGESTS[identity] = value
    return value


def _problem(path: str | Path, record: FileRecord, method: str, *, full: bool, sample: bool) -> str:
    """What is wrong with one file, or ``""``."""
    if record.link is not None:
        try:
            target = os.readlink(path)
        except OSError as error:
            return f"symlink missing ({error.strerror})"
        return "" if target == record.link else f"symlink points to {target}, not {record.link}"
    try:
        info = os.stat(path)
    except OSError as error:
        return f"missing ({error.strerror})"
    size = info.st_size
    if size != record.size:
        return f"{size} bytes, the manifest says {record.size}: truncated or overwritten"
    changed_time = record.mtime_ns and info.st_mtime_ns != record.mtime_ns
    if not (full or changed_time or (sample and record.sample)):
        return ""  # the common case, one stat: a kernel package's ~4000 files on every use
    identity = _identity(path, info)
    if not (full or changed_time) and identity in _VERIFIED:
        return ""
    try:
        if full or changed_time:
            if digest_of(Path(path), method) != record.digest:
                return "content differs from the manifest's digest"
        elif sample_digest(Path(path), size) != record.sample:
            return "sampled content differs from the manifest's"
    except OSError as error:
        return f"unreadable ({error.strerror})"
    _VERIFIED.add(identity)
    return ""
