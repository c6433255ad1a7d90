"""KVM in CI: the example pipelines pass /dev/kvm into the job's container when the machine
has one, and only then. Parsed from the workflow files and run with a recording ``docker``
(and a stand-in device path), so no container starts here."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RECORDING_DOCKER = """#!/bin/sh
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$DOCKER_ARGS"
"""


def docker_argv(command: str, tmp_path: Path, device: str) -> list[str]:
    """The docker command line a CI step's ``command`` runs, with ``device`` standing for
    /dev/kvm (a character device, or a path that is none)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    docker = tmp_path / "bin" / "docker"
    docker.write_text(RECORDING_DOCKER)
    docker.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "DOCKER_ARGS": str(tmp_path / "args"),
        "KVM_DEVICE": device,
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return (tmp_path / "args").read_text().splitlines()


def github_boot_step() -> dict[str, Any]:
    workflow: dict[str, Any] = yaml.safe_load((REPO / ".github/workflows/nightly.yml").read_text())
    boot = workflow["jobs"]["boot"]
    # A container job's options are fixed before any step: the boot job must run on the
    # runner machine and start its container itself.
    assert "container" not in boot
    step: dict[str, Any] = next(s for s in boot["steps"] if "in-container" in str(s.get("run")))
    return step


def gitlab_templates() -> dict[str, Any]:
    text = (REPO / "examples/ci/gitlab-nightly-job.yml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


@pytest.mark.parametrize(("device", "passed"), [("/dev/null", True), ("/nonexistent/kvm", False)])
def test_github_boot_job_passes_the_kvm_device_only_when_there_is_one(
    tmp_path: Path, device: str, passed: bool
) -> None:
    command = github_boot_step()["run"].replace("${{ matrix.kernel }}", "debian-6.1-amd64")
    argv = docker_argv(command, tmp_path, device)
    assert argv[:2] == ["run", "--rm"]
    if passed:
        at = argv.index("--device")
        assert argv[at : at + 2] == ["--device", device]
    else:
        assert "--device" not in argv
    image = argv.index("debian:12")
    assert argv[image + 1 :] == ["bash", ".ci/nightly-boot", "debian-6.1-amd64", "reports"]
    assert "BOOTHARNESS_CACHE" in argv[argv.index("-e") + 1]


@pytest.mark.parametrize(("device", "passed"), [("/dev/null", True), ("/nonexistent/kvm", False)])
def test_gitlab_shell_executor_job_passes_the_kvm_device_only_when_there_is_one(
    tmp_path: Path, device: str, passed: bool
) -> None:
    templates = gitlab_templates()
    shell = templates[".bootharness-nightly-shell"]
    assert shell["extends"] == ".bootharness-nightly"
    (line,) = shell["script"]
    argv = docker_argv(f"KERNEL=k1; {line}", tmp_path, device)
    assert ("--device" in argv) == passed
    assert argv[-4:] == ["bash", ".ci/nightly-boot", "k1", "reports/k1"]


def test_gitlab_docker_executor_job_says_how_to_get_kvm_and_which_it_got() -> None:
    text = (REPO / "examples/ci/gitlab-nightly-job.yml").read_text()
    assert 'devices = ["/dev/kvm"]' in text and "--docker-devices /dev/kvm" in text
    job = gitlab_templates()[".bootharness-nightly"]
    assert job["script"] == ['bash .ci/nightly-boot "$KERNEL" "reports/$KERNEL"']


def test_the_nightly_job_says_its_accelerator_then_runs_the_boot_tests() -> None:
    words = shlex.split((REPO / ".ci/nightly-boot").read_text(), comments=True)
    assert words.index(".venv/bin/bootharness") < words.index(".venv/bin/pytest")
    assert words[words.index(".venv/bin/bootharness") + 1] == "accel"
    for option in ("--kernel", "--controller", "--bootharness-json", "--bootharness-html"):
        assert option in words
    assert "--junitxml=$reports/junit.xml" in words
