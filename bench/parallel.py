"""Parallel speed-up: the same set of boots with ``pytest -n 1``, ``-n 2`` and ``-n auto``.

All run in this one invocation, alternating for --rounds rounds, on the same generated test
file (N real boots of the default kernel to its success marker and power-off, under TCG),
with a warm cache (one boot first builds what the others share). For each run it records the
wall time of the whole pytest process and, from the run's JSON results, the span from the
first boot's start to the last boot's end (what parallelism can speed up; worker start-up
excluded). Then the same with --load busy processes (default: one per CPU) running beside
it, -n 1 against -n auto: a loaded machine, as a shared CI runner is. Prints, each on its
own line:
  speed-up: X                 wall time of -n 1 / wall time of -n 2, median over the rounds
                              (goal at least 1.9 on 2 cores)
  speed-up (boots): Y         the same for the boots' span only
  auto vs 1 under load: Z     wall time of -n 1 / wall time of -n auto with the load beside
                              (goal: never below 1.0, i.e. -n auto never slower than -n 1)
  auto workers under load: W  the workers -n auto started then
Run: .venv/bin/python bench/parallel.py [--boots N] [--rounds R] [--load K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# As at a person's terminal: bytecode kept (some CI images set PYTHONDONTWRITEBYTECODE, which
# makes every pytest process compile the whole package again, -n 2 three times over).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
TEST = """
import pytest

@pytest.mark.parametrize("n", range({boots}))
def test_boot(boot, n):
    vm = boot()
    vm.expect_pass()
    vm.wait_shutdown()
"""


def run(folder: Path, workers: int | str, boots: int) -> tuple[float, float, float, int]:
    """Wall seconds of the pytest process, seconds from the first boot's start to the last
    one's end, the mean seconds one boot took (longer under -n 2 only if CPU-starved), and
    the workers xdist started."""
    results = folder / f"results-n{workers}.json"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "xdist",
        "-n",
        str(workers),
        f"--kernels={REPO / 'kernels.toml'}",
        "--accel=tcg",
        f"--bootharness-json={results}",
        "test_parallel.py",
    ]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, check=False, env=ENV)
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"pytest -n {workers} failed:\n{done.stdout}\n{done.stderr}")
    tests = json.loads(results.read_text())["tests"]
    if len(tests) != boots:
        sys.exit(f"expected {boots} boots, the results hold {len(tests)}")
    span = max(t["started"] + t["duration"] for t in tests) - min(t["started"] for t in tests)
    mean = sum(t["duration"] for t in tests) / len(tests)
    created = re.search(r"created: (\d+)/\d+ worker", done.stdout)
    return wall, span, mean, int(created.group(1)) if created else 0


@contextlib.contextmanager
def busy(count: int) -> Iterator[None]:
    """``count`` processes spinning on a CPU each, stopped (by PID) when the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them show in the idle count -n auto takes
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    # 20 boots amortise pytest and xdist start-up, which -n 2 pays more of than -n 1.
    parser.add_argument("--boots", type=int, default=20, help="boots per run (default 20)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating -n 1/-n 2 rounds (median; default 2)"
    )
    parser.add_argument(
        "--load",
        type=int,
        default=os.cpu_count() or 1,
        help="busy processes beside the loaded -n 1/-n auto rounds (default: one per CPU)",
    )
    args = parser.parse_args()
    walls: list[float] = []
    spans: list[float] = []
    loaded: list[float] = []
    auto_workers: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bh-parallel-") as tmp:
        folder = Path(tmp)
        (folder / "pytest.ini").write_text("[pytest]\n")
        (folder / "test_parallel.py").write_text(TEST.format(boots=args.boots))
        (folder / "warm").mkdir()
        (folder / "warm" / "pytest.ini").write_text("[pytest]\n")
        (folder / "warm" / "test_parallel.py").write_text(TEST.format(boots=1))
        run(folder / "warm", 1, 1)  # fills the caches both measured runs then share
        print(f"cpus: {os.cpu_count()}, boots per run: {args.boots}, rounds: {args.rounds}")
        for round_number in range(1, args.rounds + 1):
            # Alternating, so a burst of other load on the machine hits both alike.
            load = os.getloadavg()[0]
            one_wall, one_span, one_mean, _ = run(folder, 1, args.boots)
            two_wall, two_span, two_mean, _ = run(folder, 2, args.boots)
            walls.append(one_wall / two_wall)
            spans.append(one_span / two_span)
            print(
                f"round {round_number} (load before {load:.2f}): "
                f"-n 1 {one_wall:.1f} s wall, {one_mean:.2f} s per boot; "
                f"-n 2 {two_wall:.1f} s wall, {two_mean:.2f} s per boot"
            )
        for round_number in range(1, args.rounds + 1):
            with busy(args.load):
                load = os.getloadavg()[0]
                if round_number % 2:  # alternating which goes first, as above
                    auto_wall, _, auto_mean, workers = run(folder, "auto", args.boots)
                    one_wall, _, one_mean, _ = run(folder, 1, args.boots)
                else:
                    one_wall, _, one_mean, _ = run(folder, 1, args.boots)
                    auto_wall, _, auto_mean, workers = run(folder, "auto", args.boots)
            loaded.append(one_wall / auto_wall)
            auto_workers.append(workers)
            print(
                f"loaded round {round_number} ({args.load} busy, load {load:.2f}): "
                f"-n auto ({workers} workers) {auto_wall:.1f} s wall, {auto_mean:.2f} s per "
                f"boot; -n 1 {one_wall:.1f} s wall, {one_mean:.2f} s per boot"
            )
    print(f"speed-up: {statistics.median(walls):.2f}")
    print(f"speed-up (boots): {statistics.median(spans):.2f}")
    print(f"auto vs 1 under load: {statistics.median(loaded):.2f}")
    print(f"auto workers under load: {', '.join(str(w) for w in auto_workers)}")


if __name__ == "__main__":
    main()
