"""Foreign images: what Debian's own initramfs costs, and how fast a verdict comes without markers.

Measures, for the default kernel (run as root; Debian's mkinitramfs needs a mount namespace):
  mkinitramfs_cold_s     building an initramfs-tools image (MODULES=list ahci sd_mod ext4)
  mkinitramfs_cached_s   the same spec again: a cache hit (hashing and package versions only)
  extract_s / repack_s   `initramfs extract` and `repack` of that image (early + zstd main)
  boot_to_pass_s         QEMU start to the root's init line, judged by --expect
  missing_driver_verdict_after_wait_s
                         the image built for virtio-blk, the root on ahci: seconds from
                         initramfs-tools' "Begin: Waiting for root file system" (mark
                         root-wait) to the TEST_FAIL
  missing_driver_verdict_after_init_s
                         the same from the kernel's "Run /init as init process"
  initramfs_tools_rootdelay_s   the wait initramfs-tools gives a missing root (30 s unless
                         rootdelay= asks more); the verdict comes within a second of its end
Prints `name: value` lines. Run: sudo .venv/bin/python bench/foreign.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from harness import cache
from harness.image import foreign, mkinitramfs, rootfs
from harness.image.initramfs import InitramfsSpec
from harness.kernel import catalogue, provision
from harness.outcome import TestFailure
from harness.storage import attach, disks
from harness.storage.controllers import Disk
from harness.vm import boot
from harness.vm.patterns import ConsoleVerdict

REACHED = "bench-root: reached /sbin/init"
ROOTDELAY = 30  # scripts/local: max(30, rootdelay)


def main() -> None:
    root_cache = cache.cache_root()
    cat = catalogue.load_catalogue(catalogue.find_catalogue(None))
    kernel = provision.provision(cat.get(cat.default), root_cache, progress=False)
    spec = mkinitramfs.InitramfsToolsSpec(
        drivers=("ahci", "sd_mod", "ext4"),
        settings={"BOOTHARNESS_BENCH": str(time.time_ns())},  # a new image: a cold build
    )
    started = time.monotonic()
    image = mkinitramfs.build(kernel, spec, root_cache)
    print(f"mkinitramfs_cold_s: {time.monotonic() - started:.2f}")
    started = time.monotonic()
    mkinitramfs.build(kernel, spec, root_cache)
    print(f"mkinitramfs_cached_s: {time.monotonic() - started:.2f}")
    image.unlink()
    image = mkinitramfs.build(
        kernel, mkinitramfs.InitramfsToolsSpec(drivers=("ahci", "sd_mod", "ext4")), root_cache
    )
    virtio = mkinitramfs.build(
        kernel,
        mkinitramfs.InitramfsToolsSpec(drivers=("virtio_pci", "virtio_blk", "ext4")),
        root_cache,
    )
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        started = time.monotonic()
        foreign.extract(image, base / "x")
        print(f"extract_s: {time.monotonic() - started:.2f}")
        started = time.monotonic()
        foreign.repack(base / "x", base / "r.img")
        print(f"repack_s: {time.monotonic() - started:.2f}")
        tree = rootfs.build(base / "tree", init=f"#!/bin/sh\necho {REACHED}\npoweroff -f\n")
        disk = disks.filesystem(tree.path, base / "root.raw", label="bench", size="16M")
        storage = attach.plan([Disk(disk, "ahci")])

        def request(initrd: Path) -> boot.BootRequest:
            return boot.BootRequest(
                kernel,
                InitramfsSpec(),
                cmdline="root=LABEL=bench",
                storage=storage,
                initrd=initrd,
                verdict=ConsoleVerdict(expect=(REACHED,)),
            )

        vm = boot.prepare_vm(request(image), cache_root=root_cache, workdir=base / "ok")
        result = boot.run(vm, kernel=kernel, accel="tcg", wait_shutdown=False)
        assert result.boot_time is not None, result.render()
        print(f"boot_to_pass_s: {result.boot_time:.2f}")

        vm = boot.prepare_vm(request(virtio), cache_root=root_cache, workdir=base / "bad")
        with vm:
            try:
                vm.start()
                vm.expect_pass()
            except TestFailure:
                pass
            marks = {m.name: m.at for m in vm.marks}
        verdict = marks["fail:root-device-timeout"]
        print(f"missing_driver_verdict_after_wait_s: {verdict - marks['root-wait']:.2f}")
        print(f"missing_driver_verdict_after_init_s: {verdict - marks['INIT-START']:.2f}")
        print(f"initramfs_tools_rootdelay_s: {ROOTDELAY}")


if __name__ == "__main__":
    main()
