"""Boot speed: the harness against a hand-written QEMU command line doing the same boot.

Measures, in one run, interleaved so machine load affects all alike (median of N rounds):
  harness   Vm.start + expect_pass: from launching QEMU to the init's success marker (the
            timer starts after prepare_vm, whose initramfs is a cache hit after the warm-up;
            the by-hand timer likewise starts at Popen, its files made beforehand)
  by hand   qemu-system-x86_64 with the same kernel image, initramfs and command line,
            the serial console on stdout, read until the same marker
  plain     QEMU's plain defaults: the bzImage, default machine devices (no -nodefaults),
            same initramfs and command line
Prints `ratio:` (harness / by hand; goal at most 1.10) and `speed-up:` (plain / harness).
Run: .venv/bin/python bench/boot.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import cache
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue as config
from harness.kernel import provision as kernels
from harness.vm import boot

REPO = Path(__file__).resolve().parents[1]


def time_harness(kernel: kernels.Kernel, workdir: Path) -> tuple[float, Path, str]:
    request = boot.BootRequest(kernel, InitramfsSpec(), accel="tcg")
    vm = boot.prepare_vm(request, cache_root=cache.cache_root(), workdir=workdir)
    with vm:
        started = time.monotonic()
        vm.start()
        vm.expect_pass()
        elapsed = time.monotonic() - started
        assert vm.spec.initrd is not None
        return elapsed, vm.spec.initrd, vm.spec.cmdline


def time_by_hand(argv: list[str], marker: bytes) -> float:
    started = time.monotonic()
    qemu = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert qemu.stdout is not None
    seen = b""
    try:
        while marker not in seen:
            chunk = qemu.stdout.read1(65536)
            if not chunk:
                raise RuntimeError(f"QEMU exited before the marker: {argv}")
            seen = seen[-4096:] + chunk
        return time.monotonic() - started
    finally:
        qemu.kill()
        qemu.wait()


def hand_argv(image: Path, initrd: Path, cmdline: str, *, fast: bool) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "512", "-smp", "1"]
    argv += ["-display", "none", "-no-reboot", "-serial", "stdio"]
    if fast:
        argv += ["-nodefaults", "-device", "pvpanic"]
    else:
        argv += ["-monitor", "none"]
    return [*argv, "-kernel", str(image), "-initrd", str(initrd), "-append", cmdline]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    catalogue = config.load_catalogue(REPO / "kernels.toml")
    kernel = kernels.provision(catalogue.get(catalogue.default), cache.cache_root())
    vmlinux = kernel.vmlinux()
    assert vmlinux is not None, "the default kernel has a PVH entry"
    print(__doc__)
    print(f"kernel {kernel.name} ({kernel.release}), QEMU {boot.qemu_version()}, TCG")
    results: dict[str, list[float]] = {"harness": [], "by hand": [], "plain": []}
    scratch = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    try:
        time_harness(kernel, scratch / "warmup")  # builds and caches the initramfs
        for round_number in range(args.rounds):
            harness_time, initrd, cmdline = time_harness(kernel, scratch / f"h{round_number}")
            nonce = cmdline.split(f"{boot.NONCE_PARAMETER}=")[1].split()[0]
            marker = f"[bootharness:{nonce}] PASS".encode()
            results["harness"].append(harness_time)
            results["by hand"].append(
                time_by_hand(hand_argv(vmlinux, initrd, cmdline, fast=True), marker)
            )
            results["plain"].append(
                time_by_hand(hand_argv(kernel.vmlinuz, initrd, cmdline, fast=False), marker)
            )
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{name} {times[-1]:.2f} s" for name, times in results.items())
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: statistics.median(times) for name, times in results.items()}
    print("medians: " + ", ".join(f"{name} {value:.2f} s" for name, value in median.items()))
    print(f"ratio: {median['harness'] / median['by hand']:.2f}")
    print(f"speed-up: {median['plain'] / median['harness']:.2f}")


if __name__ == "__main__":
    main()
