"""Children that must not outlive their harness process (harness.lifeline), with real processes.

Each scenario runs a small Python "harness" in a subprocess, lets it start children, kills it
with SIGKILL (the signal nothing can catch) and looks for the children 3 s later. Children are
found by a unique number on their command line, so other processes on the machine never count.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import lifeline

REPO = Path(__file__).resolve().parents[2]


def with_tag(tag: str) -> list[int]:
    """Live (not zombie) processes whose command line holds ``tag``, other than ourselves."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if tag in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def gone_within(tag: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := with_tag(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def tag() -> Iterator[str]:
    """A unique ``sleep`` duration to find our grandchildren by; they are killed at the end."""
    value = str(10_000_000 + secrets.randbelow(10_000_000))
    yield value
    for pid in with_tag(value):
        os.kill(pid, signal.SIGKILL)


def harness(script: str, tag: str) -> subprocess.Popen[str]:
    """A Python process importing harness.lifeline that runs ``script``, then sleeps; it
    prints ``ready`` when its children are started. ``TAG`` in the script is the tag (spelt
    backwards in the code, so that this process itself is not found by it)."""
    code = (
        f"TAG = {tag[::-1]!r}[::-1]\n"
        + textwrap.dedent(script)
        + "\nprint('ready', flush=True)\nimport time\ntime.sleep(600)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def settled(condition: Callable[[], bool], wait: float = 10.0) -> bool:
    """Whether ``condition`` holds within ``wait`` seconds (what a child process does
    after the harness returned happens on its own time)."""
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready", "the harness process did not start"


def test_a_guarded_child_and_its_own_children_die_with_a_sigkilled_parent(tag: str) -> None:
    # sh stays (two commands), so the sleep is a grandchild: only the group kill reaches it.
    parent = harness(
        """
        from harness import lifeline
        lifeline.start_guarded(["sh", "-c", f"sleep {TAG}; true"])
        """,
        tag,
    )
    wait_ready(parent)
    # sh forks the sleep on its own time, after start_guarded has returned.
    assert settled(lambda: len(with_tag(tag)) == 2)  # sh and sleep
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert gone_within(tag, 3.0) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a child's user needs root")
def test_a_child_that_changed_its_user_still_dies_with_its_parent(tag: str) -> None:
    """The kernel clears PR_SET_PDEATHSIG when a process changes its user (as QEMU does
    with -runas); the reaper holds on regardless."""
    parent = harness(
        """
        import subprocess
        from harness import lifeline
        child = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "sleep", TAG],
            start_new_session=True, preexec_fn=lifeline.die_with_parent(),
        )
        lifeline.adopt(child.pid)
        """,
        tag,
    )
    wait_ready(parent)
    (pid,) = with_tag(tag)

    def runs_as_nobody() -> bool:  # setpriv changes its user, then execs sleep
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return status.startswith("Name:\tsleep") and status.count("\t65534") >= 4

    assert settled(runs_as_nobody)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert gone_within(tag, 3.0) == []


def test_a_released_child_is_left_alone(tag: str) -> None:
    parent = harness(
        """
        import subprocess
        from harness import lifeline
        child = lifeline.start_guarded(["sleep", "0.1"])
        child.wait()
        lifeline.release(child.pid)
        # Not guarded at all: only the reaper could kill it, and it must not.
        subprocess.Popen(["sleep", TAG], start_new_session=True)
        """,
        tag,
    )
    wait_ready(parent)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(1.0)
    assert len(with_tag(tag)) == 1


def test_an_orphaned_watcher_kills_its_children_and_exits(tag: str, tmp_path: Path) -> None:
    """An xdist worker's view: its parent (the controller) dies; the worker ends its
    children and exits by itself instead of running on."""
    status_file = tmp_path / "worker.pid"
    worker_code = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from harness import lifeline
        lifeline.start_guarded(["sh", "-c", f"sleep {sys.argv[1][::-1]}; true"])
        lifeline.watch_parent(interval=0.1)
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(600)
        """
    )
    controller = harness(
        f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", {worker_code!r}, TAG[::-1], {str(status_file)!r}])
        """,
        tag,
    )
    wait_ready(controller)
    deadline = time.monotonic() + 30
    while not status_file.exists() or not status_file.read_text():
        if time.monotonic() > deadline:
            pytest.fail("the worker did not start")
        time.sleep(0.05)
    worker = int(status_file.read_text())
    controller.send_signal(signal.SIGKILL)
    controller.wait()
    assert gone_within(tag, 3.0) == []
    assert gone_within(f"sleep {tag}", 0.1) == []
    # The worker exited by itself (its parent is now init or a subreaper, which reaps it).
    deadline = time.monotonic() + 3.0
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{worker}").exists(), "the orphaned worker kept running"


def test_run_guarded_kills_the_group_on_timeout(tag: str) -> None:
    # Children adopted before (a spare QEMU an earlier test of this worker left waiting for
    # the next restore) are not this test's: run_guarded must only leave none of its own.
    before = lifeline.adopted()
    with pytest.raises(subprocess.TimeoutExpired):
        lifeline.run_guarded(["sh", "-c", f"sleep {tag}; true"], timeout=0.5)
    assert gone_within(tag, 3.0) == []
    assert lifeline.adopted() == before


def test_run_guarded_returns_what_run_returns() -> None:
    before = lifeline.adopted()  # see above
    done = lifeline.run_guarded(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    assert lifeline.adopted() == before
