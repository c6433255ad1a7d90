"""Real systems: what a Debian root and its generators' images cost to build, and to boot.

Measures, for the default kernel:
  root cold        mmdebstrap of the default root into an empty scratch cache (downloads
                   from the Debian mirror included)
  root warm        the same build_root() again: a cache hit
  initramfs cold   each generator inside that root (initramfs-tools: mkinitramfs
                   MODULES=most, zstd; dracut: --no-hostonly, gzip), warm: again
  root image cold  the ext4 image with the kernel's modules (mkfs.ext4 -d), warm: again
  boot             from QEMU's start to the login prompt (the root on a GPT partition on
                   AHCI), then to `systemctl is-system-running --wait` answering in the
                   login shell; per generator, median of N rounds interleaved with our own
                   busybox boot (default template to its PASS marker), and as ratios to it
Prints `name: value` lines. The boots use the shared cache (built there first if needed).
Run: .venv/bin/python bench/distro.py [--rounds N] [--no-cold]   (as root; cold ~6 min)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from harness import cache
from harness.image import distro as distro_image
from harness.image.distro import GENERATORS, RootSpec
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue
from harness.kernel import provision as kernels
from harness.storage import layouts
from harness.vm import boot, distro, login

REPO = Path(__file__).resolve().parents[1]
LAYOUT = "gpt"


def timed(what: str, action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    elapsed = time.monotonic() - started
    print(f"{what}: {elapsed:.2f} s", flush=True)
    return elapsed


def cold_and_warm(kernel: kernels.Kernel) -> None:
    """Build everything twice in a scratch cache: the first time from nothing."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-distro-"))
    try:
        spec = RootSpec()
        timed("root cold", lambda: distro_image.build_root(spec, scratch, progress=False))
        timed("root warm", lambda: distro_image.build_root(spec, scratch, progress=False))
        root = distro_image.build_root(spec, scratch, progress=False)
        print(f"root packages: {len(root.packages)}")
        print(f"root mirror date: {root.mirror_date}")
        for generator in GENERATORS:
            config = distro_image.generator_config(generator)
            for kind in ("cold", "warm"):
                make = partial(distro_image.generate, root, kernel, config, scratch, progress=False)
                timed(f"initramfs {generator} {kind}", make)
            image = distro_image.generate(root, kernel, config, scratch, progress=False)
            print(f"initramfs {generator} size: {image.path.stat().st_size / 1e6:.1f} MB")
        for kind in ("cold", "warm"):
            timed(f"root image {kind}", lambda: layouts.root_image(root, kernel, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def time_busybox(kernel: kernels.Kernel, workdir: Path) -> float:
    request = boot.BootRequest(kernel, InitramfsSpec(), accel="tcg")
    vm = boot.prepare_vm(request, cache_root=cache.cache_root(), workdir=workdir)
    with vm:
        started = time.monotonic()
        vm.start()
        vm.expect_pass()
        return time.monotonic() - started


def time_distro(system: distro.DistroSystem, workdir: Path) -> tuple[float, float]:
    """Seconds to the login prompt, and to `systemctl is-system-running --wait` answering."""
    vm = boot.prepare_vm(
        system.boot_request(("ahci",)), cache_root=cache.cache_root(), workdir=workdir
    )
    with vm:
        started = time.monotonic()
        vm.start()
        login.wait_for_login(vm)
        to_login = time.monotonic() - started
        shell = vm.login()
        state = shell.run("systemctl is-system-running --wait").output.strip()
        if state != "running":
            raise RuntimeError(f"{system.generator}: the system says {state!r}")
        return to_login, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the scratch-cache builds")
    args = parser.parse_args()
    table = catalogue.load_catalogue(REPO / "kernels.toml")
    kernel = kernels.provision(table.get(table.default), cache.cache_root())
    print(__doc__)
    print(f"kernel {kernel.name} ({kernel.release}), QEMU {boot.qemu_version()}, TCG")
    if not args.no_cold:
        cold_and_warm(kernel)
    systems = {
        g: distro.prepare(kernel, cache.cache_root(), generator=g, layout=LAYOUT)
        for g in GENERATORS
    }
    results: dict[str, list[float]] = {"busybox": []}
    for generator in GENERATORS:
        results[f"{generator} login"] = []
        results[f"{generator} running"] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-distro-boot-"))
    try:
        time_busybox(kernel, scratch / "warmup")
        for number in range(args.rounds):
            results["busybox"].append(time_busybox(kernel, scratch / f"b{number}"))
            for generator, system in systems.items():
                to_login, to_running = time_distro(system, scratch / f"{generator}{number}")
                results[f"{generator} login"].append(to_login)
                results[f"{generator} running"].append(to_running)
            print(
                f"round {number + 1}: "
                + ", ".join(f"{name} {times[-1]:.1f} s" for name, times in results.items()),
                flush=True,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: statistics.median(times) for name, times in results.items()}
    for name, value in median.items():
        print(f"boot {name}: {value:.2f} s")
    for name, value in median.items():
        if name != "busybox":
            print(f"ratio {name} / busybox: {value / median['busybox']:.1f}")


if __name__ == "__main__":
    main()
