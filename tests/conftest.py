"""Checks that hold for the whole suite."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cache import cache_root, file_digest
from harness.outcome import HarnessError
from harness.storage import firmware


def qemu_children(parent: int) -> list[int]:
    """PIDs of QEMU processes whose parent is ``parent``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and name.startswith("qemu-system"):
            found.append(int(stat.parent.name))
    return found


BOOT_TESTS = Path(__file__).resolve().parent / "boot"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/boot starts QEMU, with or without the ``boot`` fixture: each gets
    the ``boot`` marker, so ``-m "not boot"`` runs no VM (tests/unit/test_markers.py checks)."""
    for item in items:
        if BOOT_TESTS in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.boot)


@pytest.fixture(scope="session", autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    """No test may leave a QEMU process running: checked when the session (or worker) ends."""
    yield
    left = qemu_children(os.getpid())
    assert not left, f"QEMU processes left running after the suite: {left}"


def _firmware_files() -> list[Path]:
    files = list(firmware.seabios().files)
    # No OVMF here: the UEFI boot paths fail, naming the package to install.
    with contextlib.suppress(HarnessError):
        files += firmware.ovmf().files
    return files


@pytest.fixture(scope="session", autouse=True)
def firmware_files_unchanged() -> Iterator[None]:
    """The installed firmware (SeaBIOS, OVMF's code and variable store template) is the same
    after the suite: every VM writes its own copy of the store, never the template."""
    before = {path: file_digest(path) for path in _firmware_files()}
    yield
    after = {path: file_digest(path) for path in before}
    assert after == before, "firmware files changed during the suite"


# pytester points HOME at a temporary folder; pin the cache so inner runs reuse the
# provisioned kernels instead of downloading them again.
os.environ.setdefault("BOOTHARNESS_CACHE", str(cache_root()))
