"""While the kernel's log streams the console is read in fewer, larger chunks (one read per
``gather`` seconds at most), and a chunk after a quiet spell is read at once."""

from __future__ import annotations

import os
import threading
import time

import pexpect
import pytest

from harness.vm.console import ConsoleSpawn


def spawn() -> tuple[ConsoleSpawn, int]:
    source, writer = os.pipe()
    child = ConsoleSpawn(source, source, encoding="utf-8", timeout=None, maxread=65536)
    return child, writer


def test_a_streaming_console_is_read_at_most_once_per_gather_interval() -> None:
    child, writer = spawn()
    child.gather = 0.01
    lines = 300

    def stream() -> None:
        for n in range(lines):
            os.write(writer, f"line {n:04d}\n".encode())
            time.sleep(0.0005)
        os.close(writer)

    feeder = threading.Thread(target=stream)
    started = time.monotonic()
    feeder.start()
    reads, text = 0, ""
    try:
        while True:
            text += child.read_nonblocking(65536, timeout=5)
            reads += 1
    except pexpect.EOF:
        pass
    elapsed = time.monotonic() - started
    feeder.join()
    assert text.splitlines() == [f"line {n:04d}" for n in range(lines)]  # nothing lost
    # Each read comes at least `gather` after the one before (the first at once).
    assert reads <= elapsed / child.gather + 2, (reads, elapsed)


def test_a_chunk_after_a_quiet_spell_is_read_without_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    child, writer = spawn()
    child.gather = 0.05
    pauses: list[float] = []
    clock = time.monotonic
    monkeypatch.setattr(time, "sleep", pauses.append)
    os.write(writer, b"first\n")
    assert child.read_nonblocking(100, timeout=5) == "first\n"
    os.write(writer, b"second\n")
    assert child.read_nonblocking(100, timeout=5) == "second\n"  # streaming: it waited
    assert len(pauses) == 1 and 0 < pauses[0] <= 0.05
    monkeypatch.setattr(time, "monotonic", lambda: clock() + 1.0)
    os.write(writer, b"after a quiet second\n")
    assert child.read_nonblocking(100, timeout=5) == "after a quiet second\n"
    assert len(pauses) == 1  # no pause for it
    os.close(writer)
