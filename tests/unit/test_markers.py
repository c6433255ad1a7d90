"""``pytest -m "not boot"`` starts no QEMU at all: every test that does (through the ``boot``
fixture, a pytester run, a subprocess or a probe) carries the ``boot`` marker.

The whole suite runs again in a subprocess with ``-m "not boot"`` and a ``qemu-system-x86_64``
first on PATH that only records that it was started (and fails): the record must stay empty.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INNER = "BOOTHARNESS_MARKER_CHECK"

RECORDING_QEMU = """#!/bin/sh
echo "$PPID $*" >> {log}
exit 1
"""

pytestmark = pytest.mark.skipif(
    os.environ.get(INNER) == "1", reason="the outer run of this check is the one that counts"
)


def recording_qemu(folder: Path) -> Path:
    log = folder / "qemu-starts.log"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    for name in ("qemu-system-x86_64", "qemu-img"):
        wrapper = bin_dir / name
        if name == "qemu-img":  # images may be made without booting anything: the real one
            real = shutil.which(name)
            assert real is not None
            wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
        else:
            wrapper.write_text(RECORDING_QEMU.format(log=log))
        wrapper.chmod(0o755)
    return log


def test_not_boot_starts_no_qemu(tmp_path: Path) -> None:
    log = recording_qemu(tmp_path)
    env = {
        **os.environ,
        INNER: "1",
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        # A fresh accelerator cache: a cached verdict must not hide a probe.
        "BOOTHARNESS_CACHE": os.environ.get("BOOTHARNESS_CACHE", ""),
    }
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not boot"),
            *("-p", "xdist", "-n", "2", f"--basetemp={tmp_path / 'inner'}", "tests"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    assert done.returncode == 0, tail
    starts = log.read_text().splitlines() if log.exists() else []
    assert starts == [], f"QEMU started under -m 'not boot': {starts[:5]}"


def test_the_recording_qemu_records(tmp_path: Path) -> None:
    """The check above can fail: a start through PATH is recorded."""
    log = recording_qemu(tmp_path)
    subprocess.run([str(tmp_path / "bin" / "qemu-system-x86_64"), "-version"], check=False)
    assert log.read_text().split()[1:] == ["-version"]
