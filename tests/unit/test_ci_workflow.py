"""The example nightly pipelines are valid YAML and their matrix steps really run bootharness."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from harness.kernel.catalogue import load_catalogue
from tests.unit.test_history_merge import write_job

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
    # The boot step runs .ci/nightly-boot for its kernel, writing under reports/ (its pytest
    # options: tests/unit/test_ci_kvm.py).
    boot_step = next(s for s in steps if ".ci/nightly-boot" in str(s.get("run", "")))
    assert boot_step["run"].endswith('.ci/nightly-boot "${{ matrix.kernel }}" reports')
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


def _night(folder: Path, created: str, broken: str) -> None:
    """Two kernel jobs' downloaded artifacts; ``broken`` names the one failing controller."""
    for kernel in ("k1", "k2"):
        cells = {
            c: ("KERNEL_FAULT" if c == broken and kernel == "k2" else "PASS")
            for c in ("ahci", "nvme")
        }
        write_job(folder / kernel, kernel, cells, created=created)


def test_github_report_job_merges_every_kernel_into_one_page_with_history(tmp_path: Path) -> None:
    workflow: dict[Any, Any] = yaml.safe_load((REPO / ".github/workflows/nightly.yml").read_text())
    boot, report = workflow["jobs"]["boot"], workflow["jobs"]["report"]
    assert report["needs"] == "boot" and report["if"] == "always()"
    steps = report["steps"]
    upload = next(s for s in boot["steps"] if str(s.get("uses", "")).startswith("actions/upload"))
    download = next(s for s in steps if str(s.get("uses", "")).startswith("actions/download"))
    prefix = upload["with"]["name"].split("${{")[0]
    assert download["with"]["pattern"] == f"{prefix}*"
    folder = download["with"]["path"]  # each artifact lands in <folder>/<artifact name>/
    cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache"))
    assert cache["with"]["restore-keys"] and cache["with"]["path"] == "history"
    merge_step = next(s for s in steps if s.get("id") == "merge")
    assert "bootharness report merge" in merge_step["run"]
    keep = next(s for s in steps if "history/" in str(s.get("run", "")))
    publish = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload"))

    # Two nights, run as the runner would: the second page knows what broke since the first.
    for number, (created, broken) in enumerate(
        [("2025-06-01T02:30:00+00:00", "-"), ("2025-06-02T02:30:00+00:00", "nvme")], 1
    ):
        shutil.rmtree(tmp_path / folder, ignore_errors=True)
        _night(tmp_path / folder, created, broken)
        done = _shell(merge_step["run"], tmp_path)
        assert done.returncode == 0, done.stderr
        kept = keep["run"].replace("${{ github.run_number }}", str(number))
        done = _shell(kept, tmp_path)
        assert done.returncode == 0, done.stderr
    published = publish["with"]["path"].split()
    page = tmp_path / published[0]
    assert page.suffix == ".html"
    text = page.read_text()
    assert 'data-kernel="k2" data-column="nvme" data-outcome="KERNEL_FAULT"' in text
    assert "new tonight (passed 2025-06-01 02:30 UTC [run-1.json])" in text
    assert "bootharness replay k2/bundles/" in text
    logs = tmp_path / published[1]
    assert len(list(logs.iterdir())) == 4  # every cell's console log is in the published folder
    assert all((tmp_path / p).exists() for p in published)
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == ["run-1.json", "run-2.json"]


def test_gitlab_report_job_merges_the_kernel_jobs_artifacts(tmp_path: Path) -> None:
    template: dict[str, Any] = yaml.safe_load(
        (REPO / "examples/ci/gitlab-nightly-job.yml").read_text()
    )
    boot, report = template[".bootharness-nightly"], template["nightly-report"]
    assert report["stage"] == ".post" and report["when"] == "always"
    boot_line = next(line for line in boot["script"] if ".ci/nightly-boot" in line)
    assert boot_line == 'bash .ci/nightly-boot "$KERNEL" "reports/$KERNEL"'
    _night(tmp_path / "reports", "2025-06-02T02:30:00+00:00", "ahci")
    for line in report["script"]:
        if ".ci/setup" in line:
            continue
        done = _shell(line, tmp_path, CI_PIPELINE_IID="12")
        assert done.returncode == 0, done.stderr
    text = (tmp_path / report["artifacts"]["paths"][0] / "index.html").read_text()
    assert 'data-kernel="k2" data-column="ahci" data-outcome="KERNEL_FAULT"' in text
    assert "bootharness replay ../reports/k2/bundles/" in text
    assert (tmp_path / "history" / "run-12.json").is_file()
