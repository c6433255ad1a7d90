"""Boot paths: each path's time to the init's success marker, as a ratio to pvh.

The same kernel and initramfs (with the boot disk's controller driver) boot on every path
(harness/storage/bootpaths.py), the boot disk on the chosen controller; interleaved rounds so
machine load affects all paths alike, median of N rounds. The time is QEMU's start to the
PASS marker (from the console recorder), so building a boot disk is not counted; it is
printed on its own (`<path> disk: s`). Also printed per path: the medians of its phases
(firmware, loader, kernel, init).
Prints `<path>: <seconds>` and `<path> ratio: <x>` (x = path / pvh).
Run: .venv/bin/python bench/boot_paths.py [--rounds N] [--controller ahci|ide] [--path NAME]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from harness import cache
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue, provision
from harness.report.model import first_marks, phase_split
from harness.storage import bootpaths, controllers
from harness.storage.bootpaths import BootSpec
from harness.vm import boot

REPO = Path(__file__).resolve().parents[1]


def one_boot(
    kernel: provision.Kernel, path: bootpaths.BootPath, controller: str, workdir: Path
) -> tuple[float, float, dict[str, float]]:
    """(seconds to PASS from QEMU's start, seconds to prepare the VM, phases)."""
    spec = InitramfsSpec(modules=controllers.get(controller).modules)
    request = boot.BootRequest(
        kernel, spec, accel="tcg", boot=BootSpec(path, controller=controller)
    )
    started = time.monotonic()
    vm = boot.prepare_vm(request, cache_root=cache.cache_root(), workdir=workdir)
    prepared = time.monotonic() - started
    with vm:
        vm.start()
        vm.expect_pass()
        marks = first_marks(vm.marks)
    return marks["PASS"], prepared, phase_split(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--controller", default="ahci", choices=("ahci", "ide"))
    parser.add_argument("--path", action="append", default=[], help="paths (default: all)")
    args = parser.parse_args()
    cat = catalogue.load_catalogue(REPO / "kernels.toml")
    kernel = provision.provision(cat.get(cat.default), cache.cache_root())
    paths = bootpaths.select(args.path or [bootpaths.ALL])
    if paths[0].name != "pvh":
        paths = [bootpaths.get("pvh"), *paths]
    print(__doc__)
    print(f"kernel {kernel.name} ({kernel.release}), QEMU {boot.qemu_version()}, TCG, ")
    print(f"boot disk on {args.controller}, {args.rounds} rounds")
    times: dict[str, list[float]] = {p.name: [] for p in paths}
    builds: dict[str, list[float]] = {p.name: [] for p in paths}
    phases: dict[str, dict[str, list[float]]] = {p.name: {} for p in paths}
    scratch = Path(tempfile.mkdtemp(prefix="bench-boot-paths-"))
    try:
        for round_number in range(args.rounds):
            for path in paths:
                folder = scratch / f"{path.name}-{round_number}"
                seconds, prepared, split = one_boot(kernel, path, args.controller, folder)
                times[path.name].append(seconds)
                builds[path.name].append(prepared)
                for name, value in split.items():
                    phases[path.name].setdefault(name, []).append(value)
                shutil.rmtree(folder, ignore_errors=True)
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        split = ", ".join(
            f"{phase} {statistics.median(values):.2f}" for phase, values in phases[name].items()
        )
        print(f"{name}: {value:.2f}  ({split})")
        print(f"{name} disk: {statistics.median(builds[name]):.2f}")
    for name, value in median.items():
        print(f"{name} ratio: {value / median['pvh']:.1f}")


if __name__ == "__main__":
    main()
