"""``bootharness boot`` on a terminal and in a log: every line said once, the KVM fallback too.

Two real boots of the default kernel through the installed command: one with its output to
pipes (a CI log), one on a pseudo-terminal (a person at a shell). On the pipe the report is
plain lines; on the terminal a status line is redrawn while the boot runs and erased, so what
the screen finally shows is the same plain report. Either way each phase, the outcome and
the accelerator fallback (when ``auto`` falls back to TCG, as on a host whose KVM does not
work) appear exactly once.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ERASE = "\r\x1b[K"
FALLBACK = "bootharness: using tcg"


def _command(workdir: Path) -> list[str]:
    tool = Path(sys.executable).parent / "bootharness"
    return [str(tool), "--kernels", str(REPO / "kernels.toml"), "boot", "--workdir", str(workdir)]


def _screen(output: str) -> list[str]:
    """The lines a terminal shows after ``output`` (carriage returns from the pty dropped)."""
    lines = [""]
    for part in re.split(r"(\r\x1b\[K|\r?\n)", output):
        if part in ("\n", "\r\n"):
            lines.append("")
        elif part == ERASE:
            lines[-1] = ""
        else:
            lines[-1] += part
    return [line for line in lines if line]


def _check_report(lines: list[str]) -> None:
    """A PASS report, each phase once, the fallback said once when the boot fell back."""
    marks = [line.split(" s  ", 1)[1] for line in lines if re.match(r"^\s+\d+\.\d{3} s  ", line)]
    names = [m.split()[0] for m in marks]
    assert names[0] == "qemu-started" and "INIT-START" in names and names[-1] == "shutdown"
    assert len(names) == len(set(names)), names  # nothing twice
    assert lines.count("outcome:  PASS") == 1
    assert sum(1 for line in lines if line.startswith("kernel:   debian-6.1-amd64")) == 1
    accel = next(line for line in lines if line.startswith("qemu:"))
    fallbacks = [line for line in lines if "KVM" in line or FALLBACK in line]
    if accel.endswith("accel tcg"):
        assert len(fallbacks) == 1 and fallbacks[0].startswith(FALLBACK), fallbacks
    else:
        assert fallbacks == []


def test_boot_report_in_a_log_says_each_line_once(tmp_path: Path) -> None:
    done = subprocess.run(
        _command(tmp_path / "run"), capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout and "\x1b" not in done.stdout  # no status line in a log
    _check_report(done.stderr.splitlines() + done.stdout.splitlines())


def test_boot_report_on_a_terminal_shows_live_progress_then_the_same_report(
    tmp_path: Path,
) -> None:
    main, child = pty.openpty()
    process = subprocess.Popen(
        _command(tmp_path / "run"), stdin=child, stdout=child, stderr=child, close_fds=True
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                break
            continue
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert process.wait(timeout=30) == 0
    output = b"".join(chunks).decode(errors="replace")
    assert ERASE in output and re.search(r"\d+\.\d s  \((firmware|kernel|init)…\)", output)
    _check_report(_screen(output))
