"""Soak: N boots that must pass, at 2x oversubscription, and how many verdicts were false.

Every boot is the default kernel with the default init running `true` and powering off: a
guest with nothing wrong. They run as one `pytest -n WORKERS` (default 4 workers on this
machine's CPUs: 2x oversubscription on 2 cores), cold (no snapshots), without INFRA_ERROR
retries, so each boot's first outcome counts. A KERNEL_FAULT, BOOT_TIMEOUT or TEST_FAIL of such
a guest is a false verdict (the worst thing a harness can say); an INFRA_ERROR is not a
verdict and is counted apart. Prints, each on its own line:
  boots: N at -n W on C CPUs (oversubscription xO)
  outcomes: PASS n, ...               every outcome seen, with its count
  false verdicts: K of N              goal 0
  boot time: median M s, max X s      from QEMU's start to the success marker
  load average: L (1 min, at the end)
and the nodeid and message of each false verdict.
Run: .venv/bin/python bench/soak.py [--boots N] [--workers W] [-- PYTEST ARGS...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = """
import pytest

@pytest.mark.parametrize("n", range({boots}))
def test_soak(boot, n):
    vm = boot(variables={{"commands": ["true"]}})
    vm.expect_pass()
    vm.wait_shutdown()
"""
VERDICTS = ("KERNEL_FAULT", "BOOT_TIMEOUT", "TEST_FAIL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--boots", type=int, default=300, help="boots (default 300)")
    parser.add_argument(
        "--workers", type=int, default=2 * len(os.sched_getaffinity(0)), help="pytest -n"
    )
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as scratch:
        folder = Path(scratch)
        (folder / "test_soak.py").write_text(TEST.format(boots=args.boots))
        results = folder / "results.json"
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist"]
        argv += ["-n", str(args.workers), f"--kernels={REPO / 'kernels.toml'}", "--accel=tcg"]
        argv += ["--snapshots=off", "--infra-retries=0", f"--bootharness-json={results}"]
        argv += ["--no-cache-prune", *args.pytest_args, "test_soak.py"]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False)
        wall = time.monotonic() - started
        if not results.exists():
            sys.exit(f"pytest wrote no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        tests = json.loads(results.read_text())["tests"]
    counts = collections.Counter(t["outcome"] for t in tests)
    false = [t for t in tests if t["outcome"] in VERDICTS]
    times = [t["phases"]["PASS"] for t in tests if "PASS" in t.get("phases", {})]
    print(__doc__.split("\n", 1)[0])
    print(
        f"boots: {len(tests)} at -n {args.workers} on {cpus} CPUs "
        f"(oversubscription x{args.workers / cpus:g}), {wall:.0f} s"
    )
    print("outcomes: " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))
    print(f"false verdicts: {len(false)} of {len(tests)}")
    if times:
        print(f"boot time: median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    print(f"load average: {os.getloadavg()[0]:.1f} (1 min, at the end)")
    for test in false:
        print(f"  {test['nodeid']}: {test['outcome']}: {test['message'][:200]}")
    if len(tests) != args.boots:
        print(
            f"warning: {args.boots} boots asked, {len(tests)} reported (pytest exit "
            f"{done.returncode})"
        )


if __name__ == "__main__":
    main()
