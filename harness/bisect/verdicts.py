"""The verdict cache: what a boot said about a kernel, so a bisection never boots it twice.

A verdict is stored under a digest of everything that decides it: the kernel's identity
(:attr:`harness.kernel.provision.Kernel.identity`, which changes with its files), the initramfs
(:attr:`harness.image.initramfs.Initramfs.digest`, which covers the rendered init, busybox, modules
and files) and the oracle (a description of what was asked: template commands come in through
the initramfs, deadlines and the extra command line through the oracle).

Only verdicts on the guest are cached: PASS, TEST_FAIL, KERNEL_FAULT and BOOT_TIMEOUT. An
INFRA_ERROR says nothing about the guest and may go away on a retry, and a CONFIG_ERROR must
be fixed, so neither is ever stored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import cache
from harness.outcome import Outcome

log = logging.getLogger(__name__)

_FORMAT = 1
CACHEABLE = frozenset({Outcome.PASS, Outcome.TEST_FAIL, Outcome.KERNEL_FAULT, Outcome.BOOT_TIMEOUT})


def verdict_key(kernel_identity: str, inputs_digest: str, oracle: str) -> str:
    """The cache key of one verdict: kernel, initramfs (or test file) digest and oracle."""
    return cache.digest([f"verdict-{_FORMAT}", kernel_identity, inputs_digest, oracle])


@dataclass(frozen=True)
class CachedVerdict:
    """A stored verdict and the evidence of the boot that gave it."""

    outcome: Outcome
    kernel: str
    message: str
    log_path: Path | None
    seconds: float
    recorded: float  # time.time() when stored


class VerdictCache:
    """Verdicts as small JSON files under ``folder``, one per key, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> CachedVerdict | None:
        """The verdict stored under ``key``, or None (also for an unreadable entry)."""
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
            outcome = Outcome[data["outcome"]]
            if data.get("format") != _FORMAT or outcome not in CACHEABLE:
                return None
            log_path = data.get("log_path")
            return CachedVerdict(
                outcome=outcome,
                kernel=str(data.get("kernel", "")),
                message=str(data.get("message", "")),
                log_path=Path(log_path) if log_path else None,
                seconds=float(data.get("seconds", 0.0)),
                recorded=float(data.get("recorded", 0.0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            # A damaged entry is a miss, not an error: the boot just runs again.
            log.warning("ignoring unreadable verdict %s: %s", path, error)
            return None

    def put(
        self,
        key: str,
        outcome: Outcome,
        *,
        kernel: str = "",
        message: str = "",
        log_path: Path | None = None,
        seconds: float = 0.0,
    ) -> bool:
        """Store a verdict; returns False (storing nothing) for an outcome never cached."""
        if outcome not in CACHEABLE:
            return False
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": _FORMAT,
            "outcome": outcome.name,
            "kernel": kernel,
            "message": message,
            "log_path": str(log_path) if log_path else None,
            "seconds": round(seconds, 3),
            "recorded": time.time(),
        }
        # Write then rename: a concurrent reader sees the old entry or the new one, never half.
        handle, scratch = tempfile.mkstemp(prefix=f".{key[:16]}.", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(data, out, indent=2)
            os.replace(scratch, path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
        return True
