"""Installed as a plain wheel (not editable), from an empty folder, the tool still works: it
finds its templates inside the package and, with no kernels.toml around, the shipped catalogue."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from harness.cache import cache_root

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.boot


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel built from this checkout (its dependencies come
    from the test run's own environment, through a path entry, not an install)."""
    base = tmp_path_factory.mktemp("wheel")
    wheels = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("bootharness-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # Dependencies from this environment; its editable finder (.pth files) is not loaded.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    return venv


def run_tool(venv: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BOOTHARNESS_CACHE": str(cache_root())}
    env.pop("BOOTHARNESS_KERNELS", None)
    env.pop("BOOTHARNESS_TEMPLATES", None)
    code = "import sys; from harness.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_wheel_is_used_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import harness; print(harness.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(installed) in done.stdout and str(REPO) not in done.stdout


def test_kernels_from_an_empty_folder_uses_the_shipped_catalogue(
    installed: Path, tmp_path: Path
) -> None:
    done = run_tool(installed, tmp_path, "kernels")
    assert done.returncode == 0, done.stderr
    assert "using" in done.stderr and "kernels.toml" in done.stderr
    assert "debian-6.1-amd64" in done.stdout


def test_boot_from_an_empty_folder_passes(installed: Path, tmp_path: Path) -> None:
    done = run_tool(installed, tmp_path, "boot", "--accel", "tcg", "--run", "uname -r")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "outcome:  PASS" in done.stdout
