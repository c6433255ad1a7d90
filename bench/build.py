"""Benchmark: a cold build of the minimal kernel from source, and a rebuild after a one-line change.

Run from the repository: ``.venv/bin/python bench/build.py [--ccache] [--keep]``.

Debian's ``linux-source-6.1`` is unpacked into the cache (once), copied into a temporary
folder (the tree the bench edits) and built with the harness's minimal configuration into a
fresh, temporary cache:

  cold         configure and build bzImage, vmlinux and modules from nothing (ccache off
               unless ``--ccache``: a real first build)
  incremental  the same tree after a one-line change in ``init/main.c``: a new tree state,
               so a new cache entry, built in the same output folder, where make rebuilds
               only what depends on the change

Lines ``cold: S``, ``incremental: S`` and ``ratio: X`` (cold / incremental) follow, with the
machine's load average before and after (other work on the machine slows both).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cache
from harness.kernel import source
from harness.kernel.catalogue import SourceTree

PACKAGE = "linux-source-6.1"
EDITED = Path("init") / "main.c"
ONE_LINE = "int bootharness_bench_line __attribute__((used));\n"


def timed_build(name: str, tree: Path, cache_root: Path) -> tuple[float, source.Built]:
    plan = source.plan(SourceTree(tree=tree), cache_root, progress=False)
    started = time.monotonic()
    built = source.build(name, plan, progress=sys.stderr.isatty())
    return time.monotonic() - started, built


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--ccache", action="store_true", help="let ccache serve the cold build")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = parser.parse_args()
    if not args.ccache:
        os.environ["CCACHE_DISABLE"] = "1"
    tree, version = source.unpack_package(PACKAGE, cache.cache_root(), progress=True)
    work = Path(tempfile.mkdtemp(prefix="bootharness-bench-build-"))
    try:
        copy = work / "linux"
        started = time.monotonic()
        subprocess.run(["cp", "-a", str(tree), str(copy)], check=True)
        print(f"tree: {PACKAGE} {version} copied in {time.monotonic() - started:.1f} s")
        print(f"load before: {os.getloadavg()[0]:.2f}")
        cold, built = timed_build("bench-cold", copy, work / "cache")
        print(f"kernel: {built.release}, bzImage {built.bzimage.stat().st_size // 1024} KiB")
        with (copy / EDITED).open("a") as handle:
            handle.write(ONE_LINE)
        incremental, again = timed_build("bench-incremental", copy, work / "cache")
        assert again.key != built.key, "the one-line change must give a new tree state"
        print(f"load after: {os.getloadavg()[0]:.2f}")
        print(f"cold: {cold:.1f}")
        print(f"incremental: {incremental:.1f}")
        print(f"ratio: {cold / incremental:.2f}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
