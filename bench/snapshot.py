"""Snapshot speed: a suite of 20 tests on one configuration, booted cold and from a snapshot.

Runs a generated pytest suite (20 tests, each with its own commands, all on one kernel,
template and machine) in pytest subprocesses. Every test runs twice, once with
``boot(snapshot=False)`` and once with ``boot(snapshot=True)``, interleaved so machine load
affects both alike. Each test measures its own boot time: from calling ``boot(...)`` to the
init's ``RUN 1`` marker, the point where the test's own commands start.

  session 1  the snapshot does not exist yet: the first snapshot test makes it
  session 2  the same suite again, the snapshot already in the cache (the usual case)

The cache is a private folder (kernels linked from the usual cache), removed at the end.
Prints the sums, the mechanism used, and `ratio:` (cold / snapshot boot time of the suite,
session 2) and `ratio including snapshot creation:` (session 1). Every test must pass both
ways, and every snapshot test must really have resumed from a snapshot.
Run: .venv/bin/python bench/snapshot.py [--tests N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import cache

REPO = Path(__file__).resolve().parents[1]

SUITE = """
import json, os, time
import pytest

COUNT = int(os.environ["BENCH_TESTS"])
ORDER = [(i, mode) for i in range(COUNT) for mode in ("cold", "snapshot")]


@pytest.mark.parametrize(("i", "mode"), ORDER, ids=[f"{i}-{m}" for i, m in ORDER])
def test_case(boot, i, mode):
    commands = [
        f"test $(({i} * {i} + 1)) -eq {i * i + 1}",
        f"echo case-{i} > /tmp/case && grep -qx case-{i} /tmp/case",
        "test -c /dev/null && test -d /sys/class",
    ]
    started = time.monotonic()
    vm = boot(variables={"commands": commands}, snapshot=(mode == "snapshot"))
    vm.expect_marker("RUN", phase="init")
    boot_time = time.monotonic() - started
    vm.expect_pass()
    vm.wait_shutdown()
    mechanism = getattr(vm, "boot_mechanism", "cold")
    with open(os.environ["BENCH_RESULTS"], "a") as out:
        out.write(json.dumps({"i": i, "mode": mode, "seconds": boot_time,
                              "mechanism": mechanism}) + "\\n")
"""


def run_session(suite: Path, cache_dir: Path, results: Path, tests: int) -> list[dict[str, object]]:
    results.unlink(missing_ok=True)
    env = dict(os.environ, BENCH_RESULTS=str(results), BENCH_TESTS=str(tests))
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--accel",
        "tcg",
        "--kernels",
        str(REPO / "kernels.toml"),
        "--bootharness-cache",
        str(cache_dir),
        "-W",
        "always::UserWarning",
        str(suite),
    ]
    done = subprocess.run(argv, env=env, cwd=suite.parent, capture_output=True, text=True)
    tail = "\n".join(done.stdout.splitlines()[-3:])
    print(f"  pytest: {tail}")
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:])
        raise SystemExit(f"the suite failed (exit {done.returncode}): every test must pass")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    if len(rows) != 2 * tests:
        raise SystemExit(f"expected {2 * tests} results, got {len(rows)}")
    fell_back = [r for r in rows if r["mode"] == "snapshot" and r["mechanism"] == "cold"]
    if fell_back:
        raise SystemExit(f"{len(fell_back)} snapshot tests booted cold: see the warnings")
    return rows


def summary(rows: list[dict[str, object]], label: str) -> float:
    cold = [float(str(r["seconds"])) for r in rows if r["mode"] == "cold"]
    snap = [float(str(r["seconds"])) for r in rows if r["mode"] == "snapshot"]
    mechanisms = sorted({str(r["mechanism"]) for r in rows if r["mode"] == "snapshot"})
    print(
        f"  {label}: cold {sum(cold):.2f} s (median {statistics.median(cold):.2f} s), "
        f"snapshot {sum(snap):.2f} s (median {statistics.median(snap):.3f} s, "
        f"first {snap[0]:.2f} s), mechanism {', '.join(mechanisms)}"
    )
    return sum(cold) / sum(snap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20)
    args = parser.parse_args()
    print(__doc__)
    scratch = Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    try:
        private = scratch / "cache"
        private.mkdir()
        shared = cache.cache_root()
        for name in ("kernels", "accel"):
            if (shared / name).exists():
                (private / name).symlink_to(shared / name)
        suite = scratch / "test_suite.py"
        suite.write_text(SUITE)
        results = scratch / "results.jsonl"
        print("session 1 (makes the snapshot):")
        first = summary(run_session(suite, private, results, args.tests), "session 1")
        print("session 2 (snapshot cached):")
        second = summary(run_session(suite, private, results, args.tests), "session 2")
        print(f"every test passed both ways ({args.tests} tests x 2 modes x 2 sessions)")
        print(f"ratio including snapshot creation: {first:.1f}")
        print(f"ratio: {second:.1f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
