"""No QEMU outlives the harness, even when pytest itself is killed with SIGKILL mid-boot: not
a plain pytest run, not the controller of ``pytest -n 2`` (its workers notice and stop their
VMs), not ``bootharness boot``, not a bisect step (its pytest run and its build go along).

As root QEMU drops to another user, and the kernel then forgets the death signal it was
armed with; these tests cover that case too (harness.lifeline's reaper).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
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


def qemus_mentioning(text: str) -> list[int]:
    """Live QEMU processes whose command line holds ``text`` (a test's own folder)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        mentions = argv and b"qemu-system" in argv[0] and text.encode() in b" ".join(argv)
        if mentions and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes (any program) whose command line holds ``text``, other than us."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and int(entry.name) != os.getpid() and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 240.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def leaving_nothing(tag: str) -> Iterator[None]:
    """Whatever a failed test leaves behind (processes mentioning ``tag``) is killed."""
    try:
        yield
    finally:
        for pid in processes_mentioning(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


HOLD_TWO = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import pytest

    @pytest.mark.parametrize("n", [1, 2])
    def test_hold(boot, n):
        vm = boot(variables={"commands": ["sleep 1000"]})
        Path(os.environ["QEMU_PID_DIR"], f"{n}.pid").write_text(str(vm.machine.pid))
        vm.expect_pass()
    """
)


@pytest.mark.boot
def test_sigkill_of_a_pytest_n2_controller_mid_boot_leaves_no_qemu_3s_later(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_inner.py").write_text(HOLD_TWO)
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, QEMU_PID_DIR=str(pids))
    argv = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider"]
    argv += ["--accel", "tcg", "--kernels", str(REPO / "kernels.toml")]
    argv += ["--basetemp", str(tmp_path / "bt"), str(tmp_path / "test_inner.py")]
    with leaving_nothing(str(tmp_path)):
        controller = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: len(list(pids.glob("*.pid"))) == 2, "both workers' VMs")
        assert len(qemus_mentioning(str(tmp_path))) == 2
        controller.send_signal(signal.SIGKILL)
        controller.wait(10)
        time.sleep(3.0)
        assert qemus_mentioning(str(tmp_path)) == [], "QEMU outlived the killed controller"


@pytest.mark.boot
def test_sigkill_of_bootharness_boot_mid_boot_leaves_no_qemu(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "harness.cli.main", "--kernels", str(REPO / "kernels.toml")]
    argv += ["boot", "--accel", "tcg", "--workdir", str(workdir), "--run", "sleep 1000"]
    with leaving_nothing(str(tmp_path)):
        command = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (workdir / "qemu.pid").exists(), "the VM of bootharness boot")
        wait_for(lambda: bool(qemus_mentioning(str(workdir))), "QEMU to run")
        command.send_signal(signal.SIGKILL)
        command.wait(10)
        time.sleep(3.0)
        assert qemus_mentioning(str(tmp_path)) == []


@pytest.mark.boot
def test_sigkill_of_a_bisect_step_leaves_no_pytest_and_no_qemu(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pid_file = tmp_path / "qemu.pid"
    env = dict(os.environ, QEMU_PID_FILE=str(pid_file))
    argv = [sys.executable, "-m", "harness.cli.main", "--kernels", str(REPO / "kernels.toml")]
    argv += ["bisect-step", "--no-cache", "--", "pytest", "test_inner.py::test_hold"]
    argv += ["--accel", "tcg"]
    with leaving_nothing(str(tmp_path)):
        step = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: pid_file.exists() and bool(pid_file.read_text()), "the oracle's VM")
        qemu_pid = int(pid_file.read_text())
        assert _alive(qemu_pid)
        step.send_signal(signal.SIGKILL)
        step.wait(10)
        time.sleep(3.0)
        assert not _alive(qemu_pid), "the oracle's QEMU outlived the killed bisect step"
        assert processes_mentioning("test_inner.py::test_hold") == [], "its pytest run lived on"


def test_sigkill_of_a_bisect_step_mid_build_leaves_no_build(tmp_path: Path) -> None:
    tag = f"{os.getpid()}{time.monotonic_ns() % 1000000}"
    build = f"sleep {tag}; true"  # sh stays: the sleep is a grandchild (make and cc are)
    argv = [sys.executable, "-m", "harness.cli.main", "--kernels", str(REPO / "kernels.toml")]
    argv += ["bisect-step", "--no-cache", "--build", build, "--", "boot"]
    with leaving_nothing(f"sleep {tag}"):
        step = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: len(processes_mentioning(f"sleep {tag}")) >= 2, "the build", 60)
        step.send_signal(signal.SIGKILL)
        step.wait(10)
        time.sleep(3.0)
        assert processes_mentioning(f"sleep {tag}") == [], "the build outlived the bisect step"
