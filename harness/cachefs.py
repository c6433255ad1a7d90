"""The file system under the cache: a failed write named by its cause, and free space.

A full disk, a read-only mount and a folder we may not write to are three different fixes
for the person reading the message, and none of them is "check the package name". So every
write into the cache goes through :func:`writing`, which turns the ``OSError`` into
:class:`CacheFull` (INFRA_ERROR), :class:`CacheReadOnly` or :class:`CacheDenied`
(CONFIG_ERROR: the cache folder chosen cannot work), and the output of the tools that write
there (apt-get, dpkg-deb, depmod) is read the same way by :func:`tool_error`, with the tool's
own line attached.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from harness.outcome import ConfigError, Evidence, HarnessError, InfraError

_CHOOSE = "or choose another cache folder (--cache, --bootharness-cache or $BOOTHARNESS_CACHE)"


class CacheFull(InfraError):
    """No space left (or the quota is used up) on the cache's file system."""


class CacheReadOnly(ConfigError):
    """The cache is on a read-only file system."""


class CacheDenied(ConfigError):
    """We may not write where the cache needs to (owner or mode of a folder)."""


def free_space(path: Path) -> tuple[int, int]:
    """(free bytes for us, total bytes) of the file system holding ``path`` (or the nearest
    existing folder above it); (0, 0) when unknown."""
    for candidate in (path, *path.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return usage.free, usage.total
    return 0, 0


def size_text(count: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes as a person reads them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def full_error(path: Path, what: str, detail: str = "") -> CacheFull:
    free, total = free_space(path)
    space = f"{size_text(free)} free of {size_text(total)}" if total else "free space unknown"
    return CacheFull(
        f"no space left on the cache's file system while {what} ({path}: {space}); free "
        f"space, run `bootharness cache prune`, {_CHOOSE} on a larger file system",
        Evidence(extra={"tool": detail} if detail else {}),
    )


def read_only_error(path: Path, what: str, detail: str = "") -> CacheReadOnly:
    return CacheReadOnly(
        f"the cache is on a read-only file system: cannot write {path} while {what}; "
        f"remount it read-write {_CHOOSE}",
        Evidence(extra={"tool": detail} if detail else {}),
    )


def denied_error(path: Path, what: str, detail: str = "") -> CacheDenied:
    return CacheDenied(
        f"permission denied writing {path} while {what} ({_owner(path)}; we are uid "
        f"{os.geteuid()}); make that folder writable for us {_CHOOSE}",
        Evidence(extra={"tool": detail} if detail else {}),
    )


def write_error(error: OSError, path: Path, what: str) -> HarnessError | None:
    """The named error for an ``OSError`` raised writing ``path`` (the path the error
    names wins), or None when it is not one of a full, read-only or forbidden file system."""
    where = Path(error.filename) if isinstance(error.filename, str) else path
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return full_error(where, what)
    if error.errno == errno.EROFS:
        return read_only_error(where, what)
    if error.errno in (errno.EACCES, errno.EPERM):
        return denied_error(where, what)
    return None


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn a full, read-only or forbidden file system met inside into its named error.

    Raises:
        CacheFull, CacheReadOnly, CacheDenied: from the ``OSError`` raised inside.
    """
    try:
        yield
    except OSError as error:
        named = write_error(error, path, what)
        if named is None:
            raise
        raise named from error


# Lines of a tool's output that name a file-system failure. apt's "W: Download is performed
# unsandboxed as root ... (13: Permission denied)" is a warning about its own sandbox user
# and not a failure; warnings ("W:", "N:") are skipped.
_TOOL_SIGNS = (
    (("No space left on device", "(28:", "Disk quota exceeded"), full_error),
    (("Read-only file system", "(30:"), read_only_error),
    (("Permission denied", "(13:", "Operation not permitted"), denied_error),
)


def tool_error(output: str, path: Path, what: str) -> HarnessError | None:
    """The named error for a tool that failed writing under ``path``, from its output; the
    tool's line goes into the message. None when the output names no such failure."""
    for line in output.splitlines():
        text = line.strip()
        if not text or text.startswith(("W:", "N:")):
            continue
        for signs, make in _TOOL_SIGNS:
            if any(sign in text for sign in signs):
                error = make(path, what, text)
                error.message += f"\n{text}"
                return error
    return None


def _owner(path: Path) -> str:
    for candidate in (path, *path.parents):
        try:
            info = candidate.stat()
        except OSError:
            continue
        return f"{candidate} is owned by uid {info.st_uid} with mode {info.st_mode & 0o7777:04o}"
    return "owner unknown"
