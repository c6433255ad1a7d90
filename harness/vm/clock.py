"""The guest's clock under TCG, made independent of the host's load.

Under TCG the guest's TSC is the host's (QEMU answers ``rdtsc`` with the host's counter), so
its frequency is the host's TSC frequency. The guest kernel still calibrates it at boot,
against the PIT or the HPET over a few milliseconds of emulated time; when the host takes the
CPU away from QEMU in that window (load 4-6 on 2 cores), the calibration goes wrong. Measured
on a 2-core host at load 11-16: 3 boots of 32 calibrated 161-360 MHz instead of 2596 MHz
("PIT calibration deviates from HPET ... Using PIT calibration value"); the guest's clock then
ran ~11 times too fast, and one boot reported an RCU stall at guest time 56 s after 13 s of
real time: a false KERNEL_FAULT.

``tsc_early_khz=<the host's TSC frequency in kHz>`` on the kernel command line skips that
calibration (the later refinement is dropped by the kernel if it disagrees by more than 1%):
measured, 32 of 32 boots at load 15-20 ran at the exact host frequency, with no fault.

The host's frequency is measured once per host boot (:func:`host_tsc_khz`): ``rdtsc`` through
a ten-byte function in an executable page, read back to back with ``CLOCK_MONOTONIC_RAW``,
keeping the most tightly bracketed of several reads at each end of a 0.1 s interval, so that
the host's own load does not skew it (2596143.7-2596144.2 kHz at load 9; the host kernel
says 2596.144 MHz). Where that page cannot be made executable, the host kernel's own
figure is read from its log. The value depends on the host, not on the VM: it is kept out of
snapshot keys (:data:`PARAMETER`). Not used under KVM, whose guests get the frequency from
the hypervisor, nor on other host architectures.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import mmap
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from harness.cache import cache_root

log = logging.getLogger(__name__)

PARAMETER = "tsc_early_khz"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_RDTSC = bytes(
    [
        0x0F, 0x31,  # rdtsc                (edx:eax = the counter)
        0x48, 0xC1, 0xE2, 0x20,  # shl rdx, 32
        0x48, 0x09, 0xD0,  # or rax, rdx
        0xC3,  # ret
    ]
)  # fmt: skip
_ROUNDS = 5
_INTERVAL = 0.1
_READS = 20
_AGREE = 0.001  # the rounds must agree within 0.1%


def parameters(accel: str, cmdline: str = "") -> str:
    """What to add to a TCG guest's command line for a clock that ignores the host's load
    (``""`` under KVM, off x86-64, when unknown, or when ``cmdline`` already sets it)."""
    if accel != "tcg" or f"{PARAMETER}=" in cmdline:
        return ""
    khz = host_tsc_khz()
    return f"{PARAMETER}={khz}" if khz else ""


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz: remembered for this host boot in the cache, else
    measured (see the module docstring). None when it cannot be known here."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    memo = _memo_path()
    try:
        known = int(json.loads(memo.read_text())["khz"])
        if known > 0:
            return known
    except (OSError, ValueError, KeyError, TypeError):
        pass
    khz = measure_tsc_khz() or _from_kernel_log()
    if khz is None:
        log.warning("cannot tell the host's TSC frequency: guests calibrate their own clock")
        return None
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f".{memo.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps({"khz": khz, "measured": time.time()}) + "\n")
        os.replace(partial, memo)
    except OSError as error:  # a read-only cache: measure again next time
        log.debug("cannot keep the TSC frequency in %s: %s", memo, error)
    log.info("host TSC frequency: %d kHz", khz)
    return khz


def measure_tsc_khz() -> int | None:
    """Measure the TSC frequency now (~0.5 s); None when rdtsc cannot be run from here or
    the rounds disagree."""
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError as error:  # W^X policies (SELinux execmem, PaX) refuse executable pages
        log.debug("no executable page for rdtsc: %s", error)
        return None
    try:
        page.write(_RDTSC)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
        rounds = []
        for _ in range(_ROUNDS):
            start_ns, start_tsc = _bracketed(rdtsc)
            time.sleep(_INTERVAL)
            end_ns, end_tsc = _bracketed(rdtsc)
            rounds.append((end_tsc - start_tsc) * 1e6 / (end_ns - start_ns))
        del rdtsc
    finally:
        page.close()
    middle = statistics.median(rounds)
    if max(rounds) - min(rounds) > middle * _AGREE:
        log.debug("TSC rounds disagree: %s", rounds)
        return None
    return round(middle)


def _bracketed(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(monotonic ns, TSC) from the most tightly bracketed of several back-to-back reads."""
    best: tuple[int, int, int] | None = None
    for _ in range(_READS):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        counter = int(rdtsc())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, counter)
    assert best is not None
    return best[1], best[2]


def _from_kernel_log() -> int | None:
    """The host kernel's own figure ("tsc: Refined TSC clocksource calibration: X MHz", or
    "tsc: Detected X MHz processor"), when its log may be read."""
    try:
        text = subprocess.run(
            ["dmesg"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for pattern in (
        r"Refined TSC clocksource calibration: ([\d.]+) MHz",
        r"tsc: Detected ([\d.]+) MHz",
    ):
        found = re.findall(pattern, text)
        if found:
            return round(float(found[-1]) * 1000)
    return None


def _memo_path() -> Path:
    try:
        boot_id = BOOT_ID.read_text().strip()
    except OSError:
        boot_id = "unknown"
    return cache_root() / "accel" / f"host-tsc-{boot_id[:18]}.json"


def without_parameters(cmdline: str) -> str:
    """``cmdline`` without what :func:`parameters` adds (for keys that must not depend on
    the host)."""
    return " ".join(word for word in cmdline.split() if not word.startswith(f"{PARAMETER}="))
