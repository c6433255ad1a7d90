"""Each ``bootharness`` command loads only what it uses: the entry point imports the one
command module it runs, by name; ``--help`` loads nothing but the parser, and ``boot`` no
report, plugin or bisect module and no pytest. Checked on ``sys.modules`` of a fresh
interpreter (the real boot is checked in tests/boot/test_speed.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, json, sys
from harness.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)))
"""
NEVER_FOR_BOOT = (
    "pytest",
    "_pytest",
    "harness.report",
    "harness.plugin",
    "harness.bisect",
    "jinja2",
)


def loaded(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return modules


def test_help_loads_only_the_parser() -> None:
    ours = [m for m in loaded("--help") if m == "harness" or m.startswith("harness.")]
    assert ours == [
        "harness",
        "harness.cli",
        "harness.cli.main",
        "harness.cli.parsing",
        "harness.outcome",
    ]
    assert "jinja2" not in loaded("--help")


@pytest.mark.parametrize(
    "argv", [["boot", "--help"], ["-v", "--cache", "/nonexistent", "boot", "--help"]]
)
def test_boot_loads_no_report_plugin_bisect_or_pytest(argv: list[str]) -> None:
    modules = loaded(*argv)
    assert "harness.cli.boot" in modules
    assert [m for m in modules if m.startswith(NEVER_FOR_BOOT)] == []
    boot_only = ("main", "parsing", "common", "boot", "progress")
    cli = [m.removeprefix("harness.cli.") for m in modules if m.startswith("harness.cli.")]
    assert [m for m in cli if m not in boot_only] == []


def test_a_command_module_is_loaded_only_for_its_command() -> None:
    assert "harness.cli.report" in loaded("report", "--help")
    assert "harness.cli.report" not in loaded("kernels", "--help")
