"""Boot speed: the harness against a hand-written QEMU command line doing the same boot.

Measures, in one run, interleaved so machine load affects all alike (median of N rounds):
  harness   Vm.start + expect_pass: from launching QEMU to the init's success marker (the
            timer starts after prepare_vm, whose initramfs is a cache hit after the warm-up;
            the by-hand timer likewise starts at Popen, its files made beforehand)
  by hand   qemu-system-x86_64 with the same kernel image, initramfs and command line,
            the serial console on stdout, read until the same marker
  plain     QEMU's and the kernel's plain defaults, as a person boots the same initramfs
            without the harness: the bzImage through SeaBIOS, default machine devices (no
            -nodefaults), and a plain command line (console=ttyS0, plus what the init and
            the catalogue's kernel need: the nonce and the kernel's own parameters)
  plain, same cmdline  the same with the harness's command line: splits the speed-up into
            QEMU's part and the kernel command line's part (the calibration the harness
            skips with tsc_early_khz, the crypto self-tests it turns off)
  unconfined  the harness with QEMU's sandbox off (no seccomp filter, no change of user)
Prints `ratio:` (harness / by hand; goal at most 1.10), `speed-up:` (plain / harness; goal
at least 3), `speed-up, same cmdline:` (plain, same cmdline / harness),
`sandbox cost:` (harness - unconfined, in seconds and percent) and `sandbox launch cost:`
(QEMU's start to QMP ready, sandboxed - unconfined, median of 3 launches per round: less
noisy than whole boots on a loaded machine).
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
from harness.vm import boot, sandbox
from harness.vm.machine import Machine, MachineSpec
from harness.vm.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[1]


def time_harness(
    kernel: kernels.Kernel, workdir: Path, confined: Sandbox = sandbox.DEFAULT
) -> tuple[float, Path, str, Path | None]:
    options = {"sandbox": confined}
    request = boot.BootRequest(kernel, InitramfsSpec(), accel="tcg", machine_options=options)
    vm = boot.prepare_vm(request, cache_root=cache.cache_root(), workdir=workdir)
    with vm:
        started = time.monotonic()
        vm.start()
        vm.expect_pass()
        elapsed = time.monotonic() - started
        assert vm.spec.initrd is not None
        return elapsed, vm.spec.initrd, vm.spec.cmdline, vm.spec.firmware


def time_launch(kernel: kernels.Kernel, workdir: Path, confined: Sandbox) -> float:
    """Seconds from starting QEMU (paused) to its QMP answering."""
    image = kernel.vmlinux() or kernel.vmlinuz
    machine = Machine(MachineSpec(kernel=image, sandbox=confined), workdir, nonce="launch")
    started = time.monotonic()
    machine.launch()
    elapsed = time.monotonic() - started
    machine.stop()
    return elapsed


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


def hand_argv(
    image: Path, initrd: Path, cmdline: str, *, fast: bool, bios: Path | None = None
) -> list[str]:
    argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-m", "512", "-smp", "1"]
    argv += ["-display", "none", "-no-reboot", "-serial", "stdio"]
    if fast:
        argv += ["-nodefaults", "-device", "pvpanic"]
    else:
        argv += ["-monitor", "none"]
    if bios is not None:
        argv += ["-bios", str(bios)]
    return [*argv, "-kernel", str(image), "-initrd", str(initrd), "-append", cmdline]


def plain_cmdline(kernel: kernels.Kernel, nonce: str) -> str:
    """The command line a person writes for this boot: the serial console, and what the
    init (the nonce of its markers) and the catalogue's kernel entry need."""
    return " ".join(["console=ttyS0", f"{boot.NONCE_PARAMETER}={nonce}", kernel.cmdline]).strip()


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
    names = ("harness", "by hand", "plain", "plain, same cmdline", "unconfined")
    launches: dict[str, list[float]] = {"sandboxed": [], "unconfined": []}
    results: dict[str, list[float]] = {name: [] for name in names}
    scratch = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    try:
        time_harness(kernel, scratch / "warmup")  # builds and caches the initramfs
        for round_number in range(args.rounds):
            run = time_harness(kernel, scratch / f"h{round_number}")
            harness_time, initrd, cmdline, bios = run
            nonce = cmdline.split(f"{boot.NONCE_PARAMETER}=")[1].split()[0]
            marker = f"[bootharness:{nonce}] PASS".encode()
            results["harness"].append(harness_time)
            results["by hand"].append(
                time_by_hand(hand_argv(vmlinux, initrd, cmdline, fast=True, bios=bios), marker)
            )
            plain = plain_cmdline(kernel, nonce)
            results["plain"].append(
                time_by_hand(hand_argv(kernel.vmlinuz, initrd, plain, fast=False), marker)
            )
            results["plain, same cmdline"].append(
                time_by_hand(hand_argv(kernel.vmlinuz, initrd, cmdline, fast=False), marker)
            )
            unconfined = scratch / f"u{round_number}"
            results["unconfined"].append(time_harness(kernel, unconfined, sandbox.OFF)[0])
            for n in range(3):
                for name, confined in (("sandboxed", sandbox.DEFAULT), ("unconfined", sandbox.OFF)):
                    folder = scratch / f"l-{name}-{round_number}-{n}"
                    launches[name].append(time_launch(kernel, folder, confined))
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
    print(f"speed-up, same cmdline: {median['plain, same cmdline'] / median['harness']:.2f}")
    cost = median["harness"] - median["unconfined"]
    print(f"sandbox cost: {cost:+.2f} s ({100 * cost / median['unconfined']:+.1f}%)")
    launch = statistics.median(launches["sandboxed"]) - statistics.median(launches["unconfined"])
    print(f"sandbox launch cost: {1000 * launch:+.0f} ms")


if __name__ == "__main__":
    main()
