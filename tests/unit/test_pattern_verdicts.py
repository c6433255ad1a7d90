"""Console verdicts of an init without markers, through a real socket pair into the real
Console (no QEMU): a failure line is TEST_FAIL naming it, also when it is a prompt without a
newline or the last thing before the console closes; a kernel fault right after it wins."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.outcome import KernelFault, TestFailure
from harness.vm.console import Console, ConsoleClosed, ConsoleRecorder
from harness.vm.patterns import SHIPPED_FAILURES, ConsoleVerdict, LineWatcher

DATA = Path(__file__).resolve().parents[1] / "data" / "console"
NEVER = re.compile("never printed")


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Console, socket.socket]]:
    ours, guest = socket.socketpair()
    rows = ConsoleVerdict(fail=("my own failure",)).failure_rows(markers=False)
    recorder = ConsoleRecorder(time.monotonic(), "0" * 16, watcher=LineWatcher(rows, phases=True))
    console = Console(ours, recorder, log_path=tmp_path / "console.log")
    yield console, guest
    guest.close()
    ours.close()


def test_a_failure_line_is_test_fail_with_the_line(wired: tuple[Console, socket.socket]) -> None:
    console, guest = wired
    guest.sendall(b"[    7.0] Run /init as init process\r\nBegin: Waiting for root file system\r\n")
    guest.sendall(b"Gave up waiting for root file system device.  Common problems:\r\n")
    with pytest.raises(TestFailure) as failure:
        console.expect(NEVER, phase="init", timeout=30.0)
    assert failure.value.message == (
        "initramfs-tools root-device-timeout: Gave up waiting for root file system device.  "
        "Common problems:"
    )
    assert "Gave up waiting" in failure.value.evidence.excerpt
    names = [mark.name for mark in console.recorder.marks]
    assert names[-3:] == ["INIT-START", "root-wait", "fail:root-device-timeout"]


def test_the_tests_own_pattern_comes_first(wired: tuple[Console, socket.socket]) -> None:
    console, guest = wired
    guest.sendall(b"my own failure: Gave up waiting for root file system device\r\n")
    with pytest.raises(TestFailure, match=r"^test fail:1: my own failure"):
        console.expect(NEVER, phase="init", timeout=30.0)


def test_a_prompt_without_newline_is_enough(wired: tuple[Console, socket.socket]) -> None:
    console, guest = wired
    guest.sendall(b"BusyBox v1.35.0 built-in shell (ash)\r\n\r\n(initramfs) \x1b[6n")
    with pytest.raises(TestFailure, match="initramfs-tools initramfs-shell"):
        console.expect(NEVER, phase="init", timeout=30.0)


def test_the_line_before_the_console_closes_is_the_verdict(
    wired: tuple[Console, socket.socket],
) -> None:
    """initramfs-tools with panic=-1 reboots right after its ALERT: QEMU exits (-no-reboot)."""
    console, guest = wired
    guest.sendall(b"ALERT!  LABEL=root does not exist.  Dropping to a shell!\r\n")
    guest.sendall(b"Rebooting automatically due to panic= boot argument")
    guest.close()
    with pytest.raises(TestFailure, match="root-does-not-exist"):
        console.expect(NEVER, phase="init", timeout=30.0)


def test_a_kernel_fault_after_the_line_wins(wired: tuple[Console, socket.socket]) -> None:
    console, guest = wired
    log = (DATA / "kernel-no-root.log").read_text()
    guest.sendall(log.encode())
    with pytest.raises(KernelFault, match="VFS: Unable to mount root fs"):
        console.expect(NEVER, phase="kernel", timeout=30.0)


def test_nothing_matched_and_closed_is_console_closed(
    wired: tuple[Console, socket.socket],
) -> None:
    console, guest = wired
    guest.sendall(b"Begin: Mounting root file system ... done.\r\n")
    guest.close()
    with pytest.raises(ConsoleClosed):
        console.expect(NEVER, phase="init", timeout=30.0)


def test_the_table_is_what_the_verdict_uses() -> None:
    assert ConsoleVerdict().failure_rows(markers=False) == SHIPPED_FAILURES
