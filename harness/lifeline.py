"""Child processes that must not outlive the process that started them.

QEMU, kernel builds and the pytest runs of a bisect oracle are started by a harness process
that may die at any moment, SIGKILL included (a CI job cancelled, an OOM kill, a controller
of ``pytest -n`` killed). Three lines of defence, each covering what the one before cannot:

1. :func:`die_with_parent`: the kernel sends the child SIGKILL when this process dies
   (``PR_SET_PDEATHSIG``). Instant, but the kernel clears it when the child changes its user
   (QEMU's ``-runas``), and it never reaches the child's own children (``make`` under ``sh``).
2. The reaper: one small helper process per harness process, started on first
   :func:`adopt`. It holds a pidfd of every adopted child, received over a socket whose
   other end only this process holds; when this process dies, however it dies, the socket
   reaches end of file and the reaper SIGKILLs each adopted child's process group. A pidfd
   names one process for ever, so a recycled process id is never hit.
3. :func:`watch_parent`: a process whose *parent* is what matters (a pytest-xdist worker and
   its controller) polls its parent id; when the parent is gone it kills every adopted
   child at once and exits, instead of running its tests on for nobody.

Adopted children run in their own process group (``start_new_session=True``): the group is
what gets killed, so grandchildren go too.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# How often a watcher looks at its parent: a killed controller's VMs end within this plus
# the kill itself (measured: 0 QEMUs 0.9 s after SIGKILL of a `pytest -n 2` controller).
WATCH_INTERVAL = 0.2
ORPHAN_EXIT = 70  # the exit status of a process that ended because its parent died
_MESSAGE = 64

_lock = threading.Lock()
_adopted: dict[int, int] = {}  # pid -> our pidfd of it
_reaper: subprocess.Popen[bytes] | None = None
_channel: socket.socket | None = None
_watcher: threading.Thread | None = None


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive SIGKILL when this process dies.

    Capture it in the parent (it records the parent's pid), pass it to ``subprocess.Popen``.
    """
    parent = os.getpid()

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def adopt(pid: int) -> None:
    """Make sure the process group led by ``pid`` (a child of this process, not yet waited
    for) dies with this process, even when it changes its user or this process gets SIGKILL.

    Never raises: without a reaper (no pidfd support, no Python to run it) the child keeps
    only the protection it was started with, and a warning says so.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as error:  # already reaped, or a kernel without pidfds (< 5.3)
        log.debug("no pidfd for %d: %s", pid, error)
        return
    with _lock:
        old = _adopted.pop(pid, None)
        if old is not None:
            os.close(old)
        _adopted[pid] = pidfd
        _send(f"A {pid}", pidfd)


def release(pid: int) -> None:
    """Forget ``pid``: it ended and was waited for (or is about to be). Safe to repeat."""
    with _lock:
        pidfd = _adopted.pop(pid, None)
        if pidfd is None:
            return
        os.close(pidfd)
        _send(f"R {pid}", None)


def adopted() -> list[int]:
    """Process ids of the children adopted and not yet released."""
    with _lock:
        return sorted(_adopted)


def kill_adopted() -> None:
    """SIGKILL the process group of every adopted child now (they are not waited for)."""
    with _lock:
        targets = list(_adopted.items())
    for pid, pidfd in targets:
        _kill_group(pid, pidfd)


def watch_parent(
    interval: float = WATCH_INTERVAL, on_orphan: Callable[[], None] | None = None
) -> None:
    """Watch this process's parent from a daemon thread; when it dies, SIGKILL every adopted
    child, run ``on_orphan`` and exit with :data:`ORPHAN_EXIT`. Idempotent per process.

    For processes that only make sense while their parent lives: a pytest-xdist worker
    whose controller was killed would otherwise run its tests, VMs and all, for nobody.
    """
    global _watcher
    with _lock:
        if _watcher is not None and _watcher.is_alive():
            return
        parent = os.getppid()
        _watcher = threading.Thread(
            target=_watch, args=(parent, interval, on_orphan), name="lifeline", daemon=True
        )
        _watcher.start()


def start_guarded(argv: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv)`` in a process group of its own that dies with this process
    (SIGKILL at our death through :func:`die_with_parent`, and the whole group through the
    reaper). Wait for it and then :func:`release` it, or use :func:`run_guarded`."""
    process: subprocess.Popen[bytes] = subprocess.Popen(
        list(argv), start_new_session=True, preexec_fn=die_with_parent(), **popen
    )
    adopt(process.pid)
    return process


def run_guarded(
    argv: Sequence[str], *, timeout: float | None = None, **popen: Any
) -> subprocess.CompletedProcess[Any]:
    """Like ``subprocess.run(argv)`` (without ``check``), for a child that must not outlive
    us and whose own children must not outlive it: a kernel build, a pytest oracle run.

    On a timeout or an interruption (KeyboardInterrupt included) the whole process group is
    killed before the exception propagates.

    Raises:
        subprocess.TimeoutExpired: ``timeout`` passed (the group was killed).
    """
    given = popen.pop("input", None)
    if given is not None:
        popen.setdefault("stdin", subprocess.PIPE)
    if popen.pop("capture_output", False):
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    process = start_guarded(argv, **popen)
    try:
        out, err = process.communicate(given, timeout=timeout)
    except BaseException:
        stop_group(process)
        raise
    finally:
        release(process.pid)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stop_group(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGKILL ``process``'s group and reap it (bounded by ``grace`` seconds)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)


# -- the harness side of the reaper


def _send(message: str, pidfd: int | None) -> None:
    """Tell the reaper (called with _lock held). A reaper that is not running is started,
    and a fresh reaper is told every adopted child, so it needs no message of its own."""
    if _reaper is None or _channel is None or _reaper.poll() is not None:
        _stop_reaper()
        if pidfd is not None:  # nothing to forget in a reaper that is not running
            _start_reaper()
        return
    try:
        socket.send_fds(_channel, [message.encode()], [pidfd] if pidfd is not None else [])
    except OSError as error:
        log.warning("lifeline reaper unreachable (%s); restarting it", error)
        _stop_reaper()
        _start_reaper()


def _start_reaper() -> None:
    """Start the reaper and tell it every adopted child (called with _lock held)."""
    global _reaper, _channel
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        f"from harness.lifeline import reap; reap({theirs.fileno()})"
    )
    try:
        _reaper = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(),),
            # Its own session: a Ctrl-C meant for the harness must not kill the reaper first.
            start_new_session=True,
        )
    except OSError as error:
        log.warning("cannot start the lifeline reaper (%s): children may outlive us", error)
        ours.close()
        return
    finally:
        theirs.close()
    _channel = ours
    for pid, pidfd in _adopted.items():
        socket.send_fds(ours, [f"A {pid}".encode()], [pidfd])


@atexit.register
def _close() -> None:
    """At a normal exit: end the reaper (it kills whatever is still adopted) and wait for it."""
    with _lock:
        _stop_reaper()


def _stop_reaper() -> None:
    global _reaper, _channel
    if _channel is not None:
        _channel.close()
    if _reaper is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _reaper.wait(1.0)
    _reaper, _channel = None, None


def _watch(parent: int, interval: float, on_orphan: Callable[[], None] | None) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    started = time.monotonic()
    kill_adopted()
    log.error(
        "parent process %d is gone: killed %d child process group(s) in %.3f s; exiting",
        parent,
        len(adopted()),
        time.monotonic() - started,
    )
    if on_orphan is not None:
        with contextlib.suppress(Exception):
            on_orphan()
    os._exit(ORPHAN_EXIT)


def _kill_group(pid: int, pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, 0)  # still running (or an unreaped zombie)
    except ProcessLookupError:
        return  # gone: its id may already name another process; leave the group alone
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


# -- the reaper process


def reap(fd: int) -> None:
    """The reaper's main loop (runs in its own process; see the module docstring): keep the
    pidfds sent over ``fd``; at end of file, SIGKILL every group still alive, then exit."""
    channel = socket.socket(fileno=fd)
    held: dict[int, int] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only end of file ends the watch
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, _MESSAGE, 1)
        except OSError:
            data, fds = b"", []
        if not data:
            break
        kind, _, number = data.decode().partition(" ")
        pid = int(number)
        if kind == "A" and fds:
            old = held.pop(pid, None)
            if old is not None:
                os.close(old)
            held[pid] = fds[0]
        elif kind == "R":
            old = held.pop(pid, None)
            if old is not None:
                os.close(old)
    for pid, pidfd in held.items():
        _kill_group(pid, pidfd)
    os._exit(0)
