"""Live progress of one boot on the terminal: each phase as it is reached, said once.

``bootharness boot`` prints its report as the boot goes: the head (kernel, QEMU) first, then
one line per point of progress the moment the console shows it (kernel warnings included: a
warning is a ``fault:warning`` mark, one line each), then the outcome. On a terminal a status
line below them counts the seconds of the current phase and is redrawn in place, then erased,
so the screen ends up holding exactly the plain report; written to a file or a pipe, the
lines come as they are reached and nothing else is written.

The boot runs in the calling thread; a watcher thread reads the VM's marks (an append-only
list) a few times a second and does all the writing, under one lock with :meth:`finish`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, TextIO

from harness.vm.boot import mark_line
from harness.vm.console import Mark

ERASE = "\r\x1b[K"  # back to the start of the line, clear to its end
# The phase a boot is in once it has seen a mark; before any, the firmware's.
PHASE_AFTER = {
    "qemu-started": "firmware",
    "first-byte": "kernel",
    "kernel-banner": "kernel",
    "INIT-START": "init",
    "PASS": "shutdown",
}


class Watched(Protocol):
    """What the watcher needs from a VM: its marks so far and when its QEMU started."""

    @property
    def marks(self) -> list[Mark]: ...

    def elapsed(self) -> float | None: ...


class BootProgress:
    """Writes a boot's marks to ``stream`` as they appear; a status line when ``live``.

    Use as a context manager around the boot, then :meth:`finish` with the boot's final
    marks, which writes those the watcher has not written yet.
    """

    def __init__(self, vm: Watched, stream: TextIO, *, live: bool, interval: float = 0.1) -> None:
        self.vm = vm
        self.stream = stream
        self.live = live
        self.interval = interval
        self.written = 0  # marks written so far
        self._status = False  # a status line is on the screen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="boot-progress", daemon=True)

    def __enter__(self) -> BootProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()

    def finish(self, marks: Sequence[Mark]) -> None:
        """Stop watching; write the marks of ``marks`` not written yet, and no status line."""
        self._halt()
        with self._lock:
            self._write_marks(marks)

    def _halt(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._erase()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            marks = self.vm.marks
            with self._lock:
                if self._stop.is_set():
                    return
                self._write_marks(marks)
                if self.live:
                    self._draw(marks)

    def _write_marks(self, marks: Sequence[Mark]) -> None:
        fresh = marks[self.written :]
        if not fresh:
            return
        self._erase()
        for mark in fresh:
            self.stream.write(mark_line(mark) + "\n")
        self.written = len(marks)
        self.stream.flush()

    def _draw(self, marks: Sequence[Mark]) -> None:
        elapsed = self.vm.elapsed()
        if elapsed is None:
            text = "  starting QEMU…"
        else:
            names = [m.name for m in reversed(marks) if m.name in PHASE_AFTER]
            phase = PHASE_AFTER[names[0]] if names else "firmware"
            text = f"  {elapsed:8.1f} s  ({phase}…)"
        self.stream.write(ERASE + text)
        self.stream.flush()
        self._status = True

    def _erase(self) -> None:
        if self._status:
            self.stream.write(ERASE)
            self.stream.flush()
            self._status = False
