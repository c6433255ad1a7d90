"""The synchronous QMP client against a scripted peer on a socket pair: greeting and
capabilities, replies matched by id, events logged as they arrive, errors, a peer that
closes, a peer that never answers. (Real QEMU: every boot test talks to it through here.)"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.vm.qmp import Qmp, QmpError

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}
Script = Callable[[dict[str, Any]], list[dict[str, Any]]]


def serve(peer: socket.socket, script: Script, *, greet: bool = True) -> threading.Thread:
    """Answer each request with what ``script`` returns for it (replies and events)."""

    def run() -> None:
        if greet:
            peer.sendall(json.dumps(GREETING).encode() + b"\n")
        pending = b""
        with peer:
            while data := peer.recv(4096):
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    request = json.loads(line)
                    for message in script(request):
                        peer.sendall(json.dumps(message).encode() + b"\r\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def ok(request: dict[str, Any], value: Any = None) -> dict[str, Any]:
    return {"return": {} if value is None else value, "id": request["id"]}


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()


def test_commands_get_their_own_replies_and_events_are_logged(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    ours, theirs = pair

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "query-status":
            event = {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}
            return [event, ok(request, {"status": "paused", "running": False})]
        if request["execute"] == "echo":
            return [ok(request, request["arguments"])]
        return [ok(request)]

    serve(theirs, script)
    with Qmp(ours, timeout=5.0, log_path=tmp_path / "events.jsonl") as qmp:
        assert qmp.command("query-status") == {"status": "paused", "running": False}
        assert qmp.command("echo", device_id="d0") == {"device-id": "d0"}
        assert [e.name for e in qmp.events] == ["STOP"]
        assert qmp.find_event(["STOP"]) is not None
        assert qmp.wait_event(["RESUME"], time.monotonic() + 0.1) is None
    assert json.loads((tmp_path / "events.jsonl").read_text())["event"] == "STOP"


def test_an_error_reply_raises_with_qemus_words(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "device_del":
            refusal = {"class": "DeviceNotFound", "desc": "Device 'x' not found"}
            return [{"error": refusal, "id": request["id"]}]
        return [ok(request)]

    serve(theirs, script)
    with Qmp(ours, timeout=5.0) as qmp, pytest.raises(QmpError, match="Device 'x' not found"):
        qmp.command("device_del", id="x")


def test_a_peer_that_closes_fails_the_waiting_command(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["execute"] == "quit":
            theirs.shutdown(socket.SHUT_RDWR)
            return []
        return [ok(request)]

    serve(theirs, script)
    with Qmp(ours, timeout=5.0) as qmp, pytest.raises(QmpError, match=r"closed|broke"):
        qmp.command("quit", timeout=5.0)


def test_no_greeting_is_an_error_within_the_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    serve(theirs, lambda request: [], greet=False)
    with pytest.raises(QmpError, match="no greeting"):
        Qmp(ours, timeout=0.2)


def test_a_command_nobody_answers_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        return [ok(request)] if request["execute"] == "qmp_capabilities" else []

    serve(theirs, script)
    with Qmp(ours, timeout=5.0) as qmp, pytest.raises(QmpError, match="did not answer"):
        qmp.command("query-status", timeout=0.2)


def test_a_command_can_carry_an_open_file(
    pair: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    """``command_with_fd``: the descriptor arrives with the command (SCM_RIGHTS), as QEMU's
    ``getfd``/``add-fd`` want it; our copy stays open."""
    ours, theirs = pair
    theirs.sendall(json.dumps(GREETING).encode() + b"\n")
    received: list[bytes] = []

    def peer() -> None:
        pending = b""
        while True:
            data, fds, _, _ = socket.recv_fds(theirs, 4096, 4)
            if not data:
                return
            for fd in fds:
                received.append(os.pread(fd, 100, 0))
                os.close(fd)
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                theirs.sendall(json.dumps(ok(request)).encode() + b"\n")

    threading.Thread(target=peer, daemon=True).start()
    stream = tmp_path / "state"
    stream.write_bytes(b"migration stream")
    with stream.open("rb") as handle, Qmp(ours, timeout=5.0) as qmp:
        assert qmp.command_with_fd(handle.fileno(), "getfd", fdname="stream") == {}
        assert handle.read() == b"migration stream"  # still ours, still open
    assert received == [b"migration stream"]
