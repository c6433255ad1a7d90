"""Whole-command speed: ``bootharness boot`` against the same boot by a hand-written QEMU script.

Measures whole processes, as a person at a terminal or a CI step runs them, in one run,
interleaved (the order rotates each round) so machine load affects all alike; medians:
  cli        ``bootharness boot --run true --accel tcg``: Python start-up, imports, the warm
             cache lookups, QEMU, the boot to power-off, the report
  script     a shell script with the QEMU command line written by hand: the same vmlinux,
             initramfs and kernel command line (read from the cli's own run), the console to
             a file, then grep for the success marker
  snapshot   ``bootharness boot --run true --accel tcg --snapshot``: the cli from the
             snapshot of the same definition (made before the first round)
Prints, each on its own line:
  ratio: R              cli / script (goal at most 1.15)
  snapshot speed-up: S  cli / snapshot (goal at least 5)
  lookups: L ms         the warm lookups of one boot command in-process (catalogue, kernel,
                        accelerator verdict, initramfs and vmlinux records), median
Run: .venv/bin/python bench/cli.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import cache
from harness.cli import common
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue, provision
from harness.vm import boot

REPO = Path(__file__).resolve().parents[1]
# The installed command, as a person runs it (its entry point script, same interpreter).
_SCRIPT = Path(sys.executable).with_name("bootharness")
BOOTHARNESS = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "harness.cli.main"]
NONCE = "0123456789abcdef"
SCRIPT = """#!/bin/sh
# The boot `bootharness boot --run true` does, written by hand.
log=$(mktemp)
{qemu} -machine pc -accel tcg -m 512 -smp 1 -display none -no-reboot -nodefaults {bios}\\
  -device pvpanic -serial file:"$log" </dev/null \\
  -kernel {kernel} -initrd {initrd} -append {cmdline}
grep -q '^\\[bootharness:{nonce}\\] PASS' "$log"; status=$?
rm -f "$log"
exit $status
"""


# As at a person's terminal: Python keeps the bytecode of what it imported. Some machines (CI
# images, this project's own build hosts) set PYTHONDONTWRITEBYTECODE, which makes every start
# compile the whole package again (~0.3 s more per command here); the bench measures without.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(argv: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, env=ENV)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout.decode()}")
    return elapsed


def cli_argv(workdir: Path, *extra: str) -> list[str]:
    boot_options = ["--run", "true", "--accel", "tcg", "--workdir", str(workdir)]
    return [*BOOTHARNESS, "boot", *boot_options, *extra]


def write_script(folder: Path, argv_file: Path) -> Path:
    """The hand-written script for the boot recorded in ``argv_file`` (a cli run's)."""
    argv = argv_file.read_text().splitlines()
    value = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("-")}
    words = [
        f"{boot.NONCE_PARAMETER}={NONCE}" if w.startswith(f"{boot.NONCE_PARAMETER}=") else w
        for w in value["-append"].split()
    ]
    script = folder / "boot.sh"
    script.write_text(
        SCRIPT.format(
            qemu=shlex.quote(argv[0]),
            bios=f"-bios {shlex.quote(value['-bios'])} " if "-bios" in value else "",
            kernel=shlex.quote(value["-kernel"]),
            initrd=shlex.quote(value["-initrd"]),
            cmdline=shlex.quote(" ".join(words)),
            nonce=NONCE,
        )
    )
    script.chmod(0o755)
    return script


def lookups(rounds: int) -> float:
    """Milliseconds of the warm lookups `bootharness boot` does before QEMU starts."""
    times = []
    root = cache.cache_root()
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
            started = time.perf_counter()
            found = catalogue.load_catalogue(catalogue.find_catalogue(None, REPO))
            kernel = provision.provision(found.get(found.default), root, progress=False)
            accel = common.accelerator("tcg", root)
            spec = InitramfsSpec(variables={"commands": ["true"]})
            request = boot.BootRequest(kernel, spec, accel=accel)
            boot.prepare_vm(request, cache_root=root, workdir=Path(tmp))
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)  # single TCG boots vary by +-15%
    args = parser.parse_args()
    print(__doc__)
    if "PYTHONDONTWRITEBYTECODE" in os.environ:
        print("note: PYTHONDONTWRITEBYTECODE is set here; the measured commands run without it")
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folder = Path(tmp)
        # Warm-up: fills the caches (initramfs, vmlinux, records) and makes the snapshot.
        run(cli_argv(folder / "warm"))
        run(cli_argv(folder / "warm-snapshot", "--snapshot"))
        script = write_script(folder, folder / "warm" / "qemu.argv")
        print(f"script: {script.read_text()}")
        times: dict[str, list[float]] = {"cli": [], "script": [], "snapshot": []}
        commands = {
            "cli": lambda n: cli_argv(folder / f"cli{n}"),
            "script": lambda n: ["sh", str(script)],
            "snapshot": lambda n: cli_argv(folder / f"snap{n}", "--snapshot"),
        }
        names = list(commands)
        for n in range(args.rounds):
            load = os.getloadavg()[0]
            for name in names[n % 3 :] + names[: n % 3]:
                times[name].append(run(commands[name](n)))
            print(
                f"round {n + 1} (load {load:.1f}): "
                + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names),
                flush=True,
            )
    median = {name: statistics.median(values) for name, values in times.items()}
    print("medians: " + ", ".join(f"{name} {value:.2f} s" for name, value in median.items()))
    print(f"ratio: {median['cli'] / median['script']:.2f}")
    print(f"snapshot speed-up: {median['cli'] / median['snapshot']:.1f}")
    print(f"lookups: {lookups(5):.1f} ms")


if __name__ == "__main__":
    main()
