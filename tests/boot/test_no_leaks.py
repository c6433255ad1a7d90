"""No QEMU outlives the harness, even when pytest itself is killed with SIGKILL mid-boot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

INNER_TEST = textwrap.dedent(
    """
    import os
    from pathlib import Path

    def test_hold(boot):
        vm = boot(variables={"commands": ["sleep 1000"]})
        Path(os.environ["QEMU_PID_FILE"]).write_text(str(vm.machine.pid))
        vm.expect_pass()
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.boot
def test_sigkill_of_pytest_mid_boot_leaves_no_qemu(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pid_file = tmp_path / "qemu.pid"
    env = dict(os.environ, QEMU_PID_FILE=str(pid_file))
    inner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--accel",
            "tcg",
            "--kernels",
            str(REPO / "kernels.toml"),
            str(tmp_path / "test_inner.py"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    qemu_pid = 0
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert inner.poll() is None, "the inner pytest ended before its VM booted"
            if time.monotonic() > deadline:
                pytest.fail("the inner VM never started")
            time.sleep(0.1)
        qemu_pid = int(pid_file.read_text())
        assert _alive(qemu_pid)
        inner.send_signal(signal.SIGKILL)
        inner.wait(10)
        gone_by = time.monotonic() + 5
        while _alive(qemu_pid) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not _alive(qemu_pid), f"QEMU {qemu_pid} outlived the SIGKILLed pytest"
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
        if qemu_pid and _alive(qemu_pid):  # the test failed: still leave nothing behind
            os.kill(qemu_pid, signal.SIGKILL)
