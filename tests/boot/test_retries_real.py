"""A real boot whose first QEMU dies at start: retried once, passes, and the report says so.

The fault is injected by a wrapper that fails its first start (as a QEMU that cannot get its
resources would) and runs the real QEMU after that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_QEMU = """#!/bin/sh
count="$(dirname "$0")/starts"
n=$(cat "$count" 2>/dev/null || echo 0)
case "$*" in *--version*|-help) exec qemu-system-x86_64 "$@" ;; esac
echo $((n + 1)) > "$count"
if [ "$n" = 0 ]; then echo "injected: cannot allocate guest RAM" >&2; exit 1; fi
exec qemu-system-x86_64 "$@"
"""


def test_infra_error_at_start_is_retried_and_marked(pytester: pytest.Pytester) -> None:
    fake = pytester.path / "fake-qemu"
    fake.write_text(FAKE_QEMU)
    fake.chmod(0o755)
    pytester.makepyfile(
        f"""
        def test_boots(boot):
            vm = boot(qemu={str(fake)!r})
            vm.expect_pass()
            vm.wait_shutdown()
        """
    )
    result = pytester.runpytest(
        f"--kernels={REPO / 'kernels.toml'}",
        "--accel=tcg",
        "--bootharness-json=out/results.json",
        "--bootharness-html=out/report.html",
    )
    result.assert_outcomes(passed=1)
    assert (pytester.path / "starts").read_text().strip() == "2"
    result.stdout.fnmatch_lines(["*test_boots?debian-6.1-amd64?: INFRA_ERROR -> PASS (retried)*"])
    record = json.loads((pytester.path / "out" / "results.json").read_text())["tests"][0]
    assert (record["outcome"], record["attempts"], record["retried"]) == (
        "PASS",
        2,
        ["INFRA_ERROR"],
    )
    assert "retried after INFRA_ERROR" in (pytester.path / "out" / "report.html").read_text()
