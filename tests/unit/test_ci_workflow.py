"""The example nightly pipelines are valid YAML and their matrix steps really run bootharness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from harness.config import load_catalogue

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _nightly_kernels() -> list[str]:
    return [k.name for k in load_catalogue(REPO / "kernels.toml").select(["tag:nightly"])]


def _shell(command: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a CI step's command as the runner would after .ci/setup: the venv's programs and
    this repository's kernels.toml, but in a scratch folder so no output lands in the tree."""
    full_env = {**os.environ, "BOOTHARNESS_KERNELS": str(REPO / "kernels.toml"), **env}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command.replace(".venv/bin/", f"{VENV_BIN}/")],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_github_nightly_matrix_step_runs_bootharness_matrix(tmp_path: Path) -> None:
    workflow: dict[Any, Any] = yaml.safe_load((REPO / ".github/workflows/nightly.yml").read_text())
    jobs = workflow["jobs"]
    step = next(s for s in jobs["matrix"]["steps"] if s.get("id") == "matrix")
    assert "bootharness matrix" in step["run"]
    output = tmp_path / "github_output"
    output.write_text("")
    done = _shell(step["run"], tmp_path, GITHUB_OUTPUT=str(output))
    assert done.returncode == 0, done.stderr
    name, _, value = output.read_text().strip().partition("=")
    assert name == "matrix"
    matrix = json.loads(value)
    assert [job["kernel"] for job in matrix["include"]] == _nightly_kernels()
    # The boot job fans out over exactly that output, caches kernels by kernels.toml's hash
    # and publishes the junit file and the HTML report.
    boot = jobs["boot"]
    assert boot["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert jobs["matrix"]["outputs"]["matrix"] == "${{ steps.matrix.outputs.matrix }}"
    steps = boot["steps"]
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache"))
    assert "hashFiles('kernels.toml')" in cache["with"]["key"]
    pytest_step = next(s for s in steps if "pytest" in str(s.get("run", "")))
    for option in ("--junitxml=reports/junit.xml", "--bootharness-html", "${{ matrix.kernel }}"):
        assert option in pytest_step["run"]
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "reports/"


def test_gitlab_example_generates_a_child_pipeline_of_valid_jobs(tmp_path: Path) -> None:
    pipeline: dict[str, Any] = yaml.safe_load((REPO / "examples/ci/gitlab-ci.yml").read_text())
    template: dict[str, Any] = yaml.safe_load(
        (REPO / "examples/ci/gitlab-nightly-job.yml").read_text()
    )
    command = next(line for line in pipeline["matrix"]["script"] if "bootharness matrix" in line)
    done = _shell(command, tmp_path)
    assert done.returncode == 0, done.stderr
    child: dict[str, Any] = yaml.safe_load((tmp_path / "nightly-jobs.yml").read_text())
    include = child.pop("include")
    assert (REPO / include[0]["local"]).is_file()
    assert [job["variables"]["KERNEL"] for job in child.values()] == _nightly_kernels()
    assert all(job["extends"] in template for job in child.values())
    trigger = pipeline["boot"]["trigger"]["include"][0]
    assert trigger == {"artifact": "nightly-jobs.yml", "job": "matrix"}
    assert template[".bootharness-nightly"]["cache"]["key"]["files"] == ["kernels.toml"]
