"""The command line loads no test runner: ``bootharness`` is a tool, not a pytest session."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from harness.cli.main import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "pytest" or m.startswith("_pytest"))
print("LOADED:", " ".join(loaded))
"""


def loaded_test_modules(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=False
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED:"))
    return line.removeprefix("LOADED:").strip()


def test_help_imports_no_pytest() -> None:
    assert loaded_test_modules("--help") == ""


def test_kernels_command_imports_no_pytest() -> None:
    assert loaded_test_modules("kernels") == ""


def test_the_probe_would_see_pytest() -> None:
    """The probe itself is honest: a process that does import pytest is reported."""
    done = subprocess.run(
        [sys.executable, "-c", "import pytest\n" + PROBE, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "pytest" in done.stdout.split("LOADED:", 1)[1]
