"""The login step's waiting for the prompt: passphrase prompts answered, a refused passphrase a
TEST_FAIL (the generator's line, or one prompt more than the tries), all through a real socket
pair into the real Console, with a thread playing the initramfs (no QEMU needed)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from harness.outcome import Evidence, TestFailure
from harness.vm import login
from harness.vm.console import Console, ConsoleRecorder
from harness.vm.deadlines import Deadlines
from harness.vm.guest import Guest
from harness.vm.patterns import SHIPPED_FAILURES, LineWatcher

ITOOLS_PROMPT = "Please unlock disk root: "
SYSTEMD_PROMPT = (
    "\x1b[0;1;39mPlease enter passphrase for disk QEMU_HARDDISK (luks-1234): "
    "(press TAB for no echo) \x1b[0m"
)
LOGIN = "\r\nDebian GNU/Linux 12 bootharness ttyS0\r\n\r\nbootharness login: "


class FakeMachine:
    def __init__(self, console: Console) -> None:
        self.console = console

    def wait(self, timeout: float) -> int:
        return 0


class FakeGuest:
    """Just what the login step uses of a VM."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.machine = FakeMachine(console)
        self.deadlines = Deadlines(init=20.0, command=20.0)

    def evidence(self, phase: str) -> Evidence:
        return Evidence(phase=phase, console_tail=self.console.recorder.tail())


Script = Callable[[socket.socket], None]


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Guest, socket.socket]]:
    ours, theirs = socket.socketpair()
    recorder = ConsoleRecorder(time.monotonic(), "0123456789abcdef")
    recorder.watcher = LineWatcher(SHIPPED_FAILURES)
    console = Console(ours, recorder, log_path=tmp_path / "console.log")
    yield cast(Guest, FakeGuest(console)), theirs
    theirs.close()
    ours.close()


def play(guest_side: socket.socket, steps: list[str]) -> tuple[threading.Thread, list[str]]:
    """Send each step, and after each one that ends in a prompt, read the line typed."""
    typed: list[str] = []

    def run() -> None:
        for step in steps:
            guest_side.sendall(step.encode())
            if step.endswith((": ", "\x1b[0m")):
                line = b""
                while not line.endswith(b"\n"):
                    chunk = guest_side.recv(1)
                    if not chunk:
                        return
                    line += chunk
                typed.append(line.decode().strip())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, typed


def test_initramfs_tools_passphrase_then_login(wired: tuple[Guest, socket.socket]) -> None:
    vm, guest_side = wired
    thread, typed = play(
        guest_side,
        [
            "Begin: Running /scripts/local-top ... ",
            ITOOLS_PROMPT,
            "cryptsetup: root: set up successfully\r\n",
            LOGIN,
        ],
    )
    prompt = login.wait_for_login(vm, passphrase="secret")
    thread.join(5)
    assert typed == ["secret"]
    assert prompt == "bootharness login:"
    names = [m.name for m in vm.machine.console.recorder.marks]
    assert names[-3:] == ["unlock:1", "login-prompt", "PASS"]
    assert login.passed(vm)


def test_systemd_asks_again_and_the_same_passphrase_is_typed_each_time(
    wired: tuple[Guest, socket.socket],
) -> None:
    vm, guest_side = wired
    failed = (
        "\r\n[   45.0] systemd[1]: Failed to start systemd-cryptsetup@luks\\x2d1234.service - "
        "Cryptography Setup for luks-1234.\r\n"
    )
    thread, typed = play(guest_side, [SYSTEMD_PROMPT, SYSTEMD_PROMPT, SYSTEMD_PROMPT, failed])
    with pytest.raises(TestFailure, match="Failed to start systemd-cryptsetup@luks") as error:
        login.wait_for_login(vm, passphrase="wrong")
    thread.join(5)
    assert typed == ["wrong", "wrong", "wrong"]
    assert error.value.message.startswith("systemd unit-failed: ")


def test_a_prompt_beyond_the_tries_is_a_failure(wired: tuple[Guest, socket.socket]) -> None:
    vm, guest_side = wired
    thread, typed = play(guest_side, [ITOOLS_PROMPT, ITOOLS_PROMPT])
    with pytest.raises(TestFailure, match="refused 1 times"):
        login.wait_for_login(vm, passphrase="wrong", tries=1)
    thread.join(5)
    assert typed == ["wrong"]


def test_a_prompt_without_a_passphrase_is_a_failure(wired: tuple[Guest, socket.socket]) -> None:
    vm, guest_side = wired
    guest_side.sendall(SYSTEMD_PROMPT.encode())
    with pytest.raises(TestFailure, match="asks for a passphrase"):
        login.wait_for_login(vm)
