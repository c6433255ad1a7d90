"""The command line loads no test runner: ``bootharness`` is a tool, not a pytest session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


EXIT_PROBE = """
import gc, sys
from harness.cli import main as cli
sys.argv = ["bootharness", *sys.argv[1:]]
code = cli.run()
print("FROZEN:", gc.get_freeze_count() > 10000, "CODE:", code)
"""


def test_the_installed_script_runs_main_then_hides_its_objects_from_the_exit_collection() -> None:
    """The ``bootharness`` script is ``run``: the command's exit code, and the objects of the
    imports frozen (the interpreter's last collection then skips them)."""
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'bootharness = "harness.cli.main:run"' in pyproject
    done = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, "kernels", "--bogus-option"],
        capture_output=True,
        text=True,
        check=False,
    )
    # 5: the exit code of a usage error, returned as main returns it.
    assert done.stdout.strip() == "FROZEN: True CODE: 5", done.stdout + done.stderr
