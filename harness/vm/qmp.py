"""QMP, synchronously: commands, and an event log kept as it happens.

QMP is one JSON object per line over a socket: a greeting, then replies (matched to their
command by ``id``) and asynchronous events. One reader thread receives everything the moment
QEMU sends it, so events such as ``GUEST_PANICKED`` are time-stamped when they arrive, not
only while a command is running, and the console wait can poll them without blocking.
Commands are written from the caller's thread and wait on a condition for their reply.

Plain sockets and a thread, not an asyncio client: a boot needs a handful of commands, and an
event loop costs ~50 ms of CPU to import and start in every process (a quarter of the whole
overhead of ``bootharness boot`` around the guest's own boot time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.outcome import InfraError

log = logging.getLogger(__name__)

_READ_SIZE = 65536


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
    """A connected QMP session (capabilities negotiated); use as a context manager or call
    :meth:`close`.

    Raises (from the constructor):
        QmpError: no greeting within ``timeout`` seconds, or the connection closed first.
    """

    def __init__(
        self,
        address: str | Path | socket.socket,
        *,
        timeout: float = 10.0,
        log_path: Path | None = None,
    ):
        if isinstance(address, socket.socket):
            self._socket = address
        else:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._socket.connect(str(address))
            except OSError as error:
                self._socket.close()
                raise QmpError(f"QMP connect to {address} failed: {error}") from error
        self._socket.setblocking(True)
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self._events: list[QmpEvent] = []
        self._replies: dict[str, dict[str, Any]] = {}
        self._greeting: dict[str, Any] | None = None
        self._ended: str | None = None  # why the connection ended, once it has
        self._ids = itertools.count(1)
        self._log = log_path.open("a", buffering=1) if log_path else None
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="qmp", daemon=True)
        self._thread.start()
        try:
            deadline = time.monotonic() + timeout
            with self._lock:
                self._lock.wait_for(
                    lambda: self._greeting is not None or self._ended is not None, timeout
                )
                if self._greeting is None:
                    why = self._ended or f"no greeting within {timeout:.1f} s"
                    raise QmpError(f"QMP connect failed: {why}")
            self.command("qmp_capabilities", timeout=max(deadline - time.monotonic(), 0.1))
        except BaseException:
            self.close()
            raise

    def _receive(self) -> None:
        """The reader thread: every line QEMU sends, until end of file."""
        pending = b""
        why = "QEMU closed the QMP connection"
        try:
            while data := self._socket.recv(_READ_SIZE):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if line.strip():
                        self._dispatch(json.loads(line))
        except (OSError, ValueError) as error:  # a closed socket, or not JSON
            why = f"QMP connection broke: {error}"
        with self._lock:
            self._ended = why
            self._lock.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._lock:
            if "event" in message:
                data = message.get("data", {})
                event = QmpEvent(
                    str(message["event"]), data if isinstance(data, dict) else {}, time.monotonic()
                )
                self._events.append(event)
                if self._log is not None:
                    self._log.write(event.to_json() + "\n")
            elif "QMP" in message:
                self._greeting = message
            elif "id" in message:
                self._replies[str(message["id"])] = message
            else:
                log.debug("QMP message ignored: %s", message)
            self._lock.notify_all()

    def command(self, name: str, *, timeout: float = 10.0, **arguments: Any) -> Any:
        """Execute one QMP command and return its result.

        Raises:
            QmpError: QEMU answered with an error, the connection broke, or no answer came.
        """
        return self._execute(name, arguments, timeout, None)

    def _execute(self, name: str, arguments: dict[str, Any], timeout: float, fd: int | None) -> Any:
        ident = str(next(self._ids))
        request: dict[str, Any] = {"execute": name, "id": ident}
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        if args:
            request["arguments"] = args
        data = json.dumps(request).encode() + b"\n"
        try:
            with self._send_lock:
                if fd is None:
                    self._socket.sendall(data)
                else:  # QEMU ties the descriptor to the command it arrives with
                    sent = socket.send_fds(self._socket, [data], [fd])
                    self._socket.sendall(data[sent:])
        except OSError as error:
            raise QmpError(f"QMP {name} failed: {error}") from error
        with self._lock:
            answered = self._lock.wait_for(
                lambda: ident in self._replies or self._ended is not None, timeout
            )
            reply = self._replies.pop(ident, None)
            ended = self._ended
        if reply is None:
            if not answered:
                raise QmpError(f"QMP {name} did not answer within {timeout:.1f} s")
            raise QmpError(f"QMP {name} failed: {ended}")
        if "error" in reply:
            refusal = reply["error"]
            raise QmpError(f"QMP {name} failed: {refusal.get('desc', refusal)}")
        return reply.get("return")

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
        return self._execute(name, arguments, timeout, fd)

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
        """Disconnect and stop the reader thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        # shutdown() wakes the reader's recv() at once; close() alone would not.
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)
        self._socket.close()
        if self._log is not None:
            with self._lock:
                self._log.close()
                self._log = None

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
