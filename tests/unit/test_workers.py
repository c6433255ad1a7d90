"""``pytest -n auto`` starts one worker per CPU left free (harness.vm.loadscale.auto_workers),
within the process's CPU quota; on a loaded machine that is one worker, as ``-n 1``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.vm import loadscale


@pytest.mark.parametrize(
    ("free", "limit", "workers"),
    [(2.0, 2, 2), (1.6, 2, 2), (1.4, 2, 1), (0.0, 2, 1), (7.9, 4, 4), (3.2, 16, 3)],
)
def test_workers_follow_the_idle_cpus(free: float, limit: int, workers: int) -> None:
    assert loadscale.auto_workers(free=free, limit=limit) == workers


def test_a_cgroup_quota_caps_the_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = tmp_path / "cpu.max"
    monkeypatch.setattr(loadscale, "cpu_count", lambda: 64)
    monkeypatch.setattr(loadscale, "_QUOTA_FILES", ((str(v2), None),))
    v2.write_text("200000 100000\n")
    assert loadscale.cpu_limit() == 2
    v2.write_text("max 100000\n")
    assert loadscale.cpu_limit() == 64
    quota, period = tmp_path / "cfs_quota_us", tmp_path / "cfs_period_us"
    quota.write_text("150000\n")
    period.write_text("100000\n")
    monkeypatch.setattr(loadscale, "_QUOTA_FILES", ((str(quota), str(period)),))
    assert loadscale.cpu_limit() == 2  # 1.5 CPUs of time, rounded
    quota.write_text("-1\n")
    assert loadscale.cpu_limit() == 64


def test_idle_cpus_is_measured_from_proc_stat() -> None:
    free = loadscale.idle_cpus(0.05)
    assert free is not None and 0.0 <= free <= (os.cpu_count() or 1) + 0.01


def test_n_auto_asks_the_plugin(tmp_path: Path) -> None:
    """Through pytest-xdist: PYTEST_XDIST_AUTO_NUM_WORKERS still wins, so the choice is ours
    only when nobody said otherwise; with it unset the plugin's count is what xdist starts."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    argv = [sys.executable, "-m", "pytest", "-p", "xdist", "-n", "auto", "-p", "no:cacheprovider"]
    env_said = subprocess.run(
        [*argv, "test_one.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTEST_XDIST_AUTO_NUM_WORKERS": "3"},
        check=False,
    )
    assert "created: 3/3 workers" in env_said.stdout, env_said.stdout
    # A machine with no CPU left idle: the plugin says one worker, where xdist's own count
    # would be one per CPU (so on more than one CPU this tells the two apart).
    (tmp_path / "conftest.py").write_text(
        "from harness.vm import loadscale\nloadscale.idle_cpus = lambda seconds=0.25: 0.0\n"
    )
    ours = subprocess.run(
        [*argv, "test_one.py"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert "created: 1/1 worker" in ours.stdout, ours.stdout
