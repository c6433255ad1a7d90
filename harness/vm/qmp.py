"""A small synchronous facade over ``qemu.qmp``: commands, and an event log kept as it happens.

``qemu.qmp`` is asyncio-based. The harness is synchronous (pytest, pexpect), so the client
lives on an event loop in a background thread: events such as ``GUEST_PANICKED`` are
received and time-stamped the moment QEMU sends them, not only while a command is running,
and the console wait can poll them without blocking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from harness.outcome import InfraError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event, with the host's monotonic time at which it arrived."""

    name: str
    data: dict[str, Any]
    received: float

    def to_json(self) -> str:
        return json.dumps({"event": self.name, "data": self.data, "received": self.received})


class QmpError(InfraError):
    """A QMP command failed or the connection broke."""


class Qmp:
    """A connected QMP session; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        address: str | Path | socket.socket,
        *,
        timeout: float = 10.0,
        log_path: Path | None = None,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._client = QMPClient("bootharness")
        self._events: list[QmpEvent] = []
        self._lock = threading.Condition()
        self._log_path = log_path
        self._log = log_path.open("a", buffering=1) if log_path else None
        self._closed = False
        try:
            target = address if isinstance(address, socket.socket) else str(address)
            self._call(self._client.connect(target), timeout, "connect")
        except BaseException:
            self.close()
            raise
        self._watcher_task: asyncio.Task[None] | None = None
        asyncio.run_coroutine_threadsafe(self._start_watcher(), self._loop).result(timeout)

    async def _start_watcher(self) -> None:
        self._watcher_task = asyncio.get_running_loop().create_task(self._watch_events())

    async def _watch_events(self) -> None:
        async for message in self._client.events:
            data = message.get("data", {})
            payload = data if isinstance(data, dict) else {}
            event = QmpEvent(str(message["event"]), payload, time.monotonic())
            with self._lock:
                self._events.append(event)
                if self._log is not None:
                    self._log.write(event.to_json() + "\n")
                self._lock.notify_all()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError as error:
            future.cancel()
            raise QmpError(f"QMP {what} did not answer within {timeout:.1f} s") from error
        except (QMPError, OSError, EOFError) as error:
            raise QmpError(f"QMP {what} failed: {error}") from error

    def command(self, name: str, *, timeout: float = 10.0, **arguments: Any) -> Any:
        """Execute one QMP command and return its result.

        Raises:
            QmpError: QEMU answered with an error, the connection broke, or no answer came.
        """
        args = {key.replace("_", "-"): value for key, value in arguments.items()} or None
        return self._call(self._client.execute(name, args), timeout, name)

    def command_with_fd(
        self, fd: int, name: str, *, timeout: float = 10.0, **arguments: Any
    ) -> Any:
        """Execute ``name`` with the open file ``fd`` passed along (SCM_RIGHTS): ``getfd``
        and ``add-fd`` take the descriptor that arrives with them. Our copy stays open.

        QEMU in its sandbox may neither open files after it dropped privileges nor run
        ``exec:`` helpers; a descriptor we opened is how it reaches a file then.

        Raises:
            QmpError: as :meth:`command`.
        """
        args = {key.replace("_", "-"): value for key, value in arguments.items()} or None

        async def send_and_execute() -> Any:
            # Both on the loop's thread, back to back: QEMU ties the descriptor to the
            # next command it reads.
            self._client.send_fd_scm(fd)
            return await self._client.execute(name, args)

        return self._call(send_and_execute(), timeout, name)

    @property
    def events(self) -> list[QmpEvent]:
        """Every event received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._events)

    def find_event(self, names: Sequence[str], *, since: int = 0) -> QmpEvent | None:
        """The first event among the ones received (from index ``since``) named in ``names``."""
        with self._lock:
            for event in self._events[since:]:
                if event.name in names:
                    return event
        return None

    def wait_event(
        self,
        names: Sequence[str],
        deadline: float,
        *,
        since: int = 0,
        match: Callable[[QmpEvent], bool] | None = None,
    ) -> QmpEvent | None:
        """Wait until an event named in ``names`` arrives or the monotonic ``deadline`` passes."""
        with self._lock:
            while True:
                for event in self._events[since:]:
                    if event.name in names and (match is None or match(event)):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def close(self) -> None:
        """Disconnect and stop the event-loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            future = asyncio.run_coroutine_threadsafe(self._disconnect(), self._loop)
            future.result(2.0)
        except Exception as error:  # a dead QEMU makes disconnect fail; nothing to save
            log.debug("QMP disconnect: %s", error)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()
        if self._log is not None:
            self._log.close()

    async def _disconnect(self) -> None:
        # Cancel the event watcher first: a task left pending when the loop closes is
        # reported by asyncio as destroyed, and its queue get() would fail noisily.
        watcher = getattr(self, "_watcher_task", None)
        if watcher is not None:
            watcher.cancel()
        await self._client.disconnect()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
