"""Checks that hold for the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.cache import cache_root


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


@pytest.fixture(scope="session", autouse=True)
def no_qemu_left_behind() -> Iterator[None]:
    """No test may leave a QEMU process running: checked when the session (or worker) ends."""
    yield
    left = qemu_children(os.getpid())
    assert not left, f"QEMU processes left running after the suite: {left}"


# pytester points HOME at a temporary folder; pin the cache so inner runs reuse the
# provisioned kernels instead of downloading them again.
os.environ.setdefault("BOOTHARNESS_CACHE", str(cache_root()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "nightly: too slow for the default run (kernel builds, git bisections); runs when the "
        "-m expression names nightly, or with BOOTHARNESS_NIGHTLY=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "nightly" in (config.getoption("-m") or "") or os.environ.get("BOOTHARNESS_NIGHTLY"):
        return
    skip = pytest.mark.skip(reason="nightly: run with -m nightly or BOOTHARNESS_NIGHTLY=1")
    for item in items:
        if item.get_closest_marker("nightly") is not None:
            item.add_marker(skip)
