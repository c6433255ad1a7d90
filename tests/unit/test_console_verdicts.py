"""The console's verdict when a fault and the success marker come in the same read: the fault
wins. Fed through a real socket pair into the real Console (no QEMU needed)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.outcome import KernelFault
from harness.vm.console import Console, ConsoleRecorder, marker_regex

NONCE = "0123456789abcdef"
DATA = Path(__file__).resolve().parents[1] / "data" / "console"


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[tuple[Console, socket.socket]]:
    ours, guest = socket.socketpair()
    recorder = ConsoleRecorder(time.monotonic(), NONCE)
    console = Console(ours, recorder, log_path=tmp_path / "console.log")
    yield console, guest
    guest.close()
    ours.close()


def test_fault_and_pass_marker_in_one_chunk_is_a_kernel_fault(
    wired: tuple[Console, socket.socket],
) -> None:
    console, guest = wired
    panic = (DATA / "init-exit.log").read_text()
    start = panic.index("Kernel panic")
    chunk = f"[bootharness:{NONCE}] PASS\n" + panic[panic.rindex("\n", 0, start) + 1 :]
    guest.sendall(chunk.encode())
    with pytest.raises(KernelFault, match="Attempted to kill init"):
        console.expect(marker_regex(NONCE, "PASS"), phase="init", timeout=5.0)


def test_pass_marker_alone_is_a_pass(wired: tuple[Console, socket.socket]) -> None:
    """The counterpart: the same marker without the panic is matched, not a fault."""
    console, guest = wired
    guest.sendall(f"[    1.000000] random: crng init done\n[bootharness:{NONCE}] PASS\n".encode())
    match = console.expect(marker_regex(NONCE, "PASS"), phase="init", timeout=5.0)
    assert match.group("event") == "PASS"
