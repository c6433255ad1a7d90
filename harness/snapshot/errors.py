"""The errors of snapshots (:mod:`harness.snapshot.restore`): each means the test boots cold."""

from __future__ import annotations

from pathlib import Path

from harness.outcome import Evidence, InfraError


class SnapshotError(InfraError):
    """A snapshot could not be made, checked or restored; the test boots cold instead."""


class SnapshotUnsupported(SnapshotError):
    """This test cannot use a snapshot (its template has no ready point), or a mechanism
    does not work with this QEMU (``lasting``: for this QEMU binary, not just this once)."""

    def __init__(self, message: str, evidence: Evidence | None = None, *, lasting: bool = False):
        super().__init__(message, evidence)
        self.lasting = lasting


class SnapshotCorrupt(SnapshotError):
    """A saved snapshot does not match its manifest (truncated, changed, incomplete)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class SnapshotWarning(UserWarning):
    """A test that asked for a snapshot booted cold; the message says why."""
