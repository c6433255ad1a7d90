"""Scale boot deadlines with the machine's load, so an oversubscribed runner is not a timeout.

Under TCG a guest runs only as fast as the host CPU it gets. When more runnable work than
cores competes (``pytest -n auto`` next to other jobs on a shared CI runner), every phase of a
boot stretches by roughly the run-queue length per core; a deadline tuned on an idle machine
then fires on a guest that is merely slow. The factor is measured when a VM starts, bounded so
a wedged guest still times out in reasonable time, and recorded with the boot's results.
The same measure decides how many workers ``pytest -n auto`` starts (:func:`auto_workers`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Past this the machine is so overloaded that waiting longer hides real hangs.
MAX_FACTOR = 4.0


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_factor(
    loadavg: float | None = None, cpus: int | None = None, limit: float = MAX_FACTOR
) -> float:
    """``max(1, loadavg_1min / cpus)``, capped at ``limit``; 1.0 when the load is unknown.

    ``loadavg`` and ``cpus`` default to the machine's current values. Never raises: a host
    without ``/proc/loadavg`` simply gets no scaling.
    """
    if loadavg is None:
        try:
            loadavg = os.getloadavg()[0]
        except OSError:
            return 1.0
    cpus = cpus if cpus is not None else cpu_count()
    factor = min(limit, max(1.0, loadavg / max(1, cpus)))
    if factor > 1.0:
        log.info("load %.2f on %d CPUs: deadlines x%.2f", loadavg, cpus, factor)
    return round(factor, 3)


# -- how many VMs at once

# Where a container's CPU quota is found (cgroup v2, then v1): docker --cpus=2 on a 64-core
# host leaves the affinity mask at 64 CPUs, and 64 TCG guests on 2 CPUs' worth of time only
# make every boot 32 times slower.
_QUOTA_FILES = (
    ("/sys/fs/cgroup/cpu.max", None),
    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us"),
)
IDLE_SAMPLE = 0.25  # seconds of /proc/stat over which the idle CPUs are counted


def cpu_limit() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup CPU quota."""
    cpus = cpu_count()
    for quota_file, period_file in _QUOTA_FILES:
        try:
            words = Path(quota_file).read_text().split()
            if period_file is not None:
                words.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if len(words) >= 2 and words[0] not in ("max", "-1"):
            quota, period = int(words[0]), int(words[1])
            if quota > 0 and period > 0:
                return max(1, min(cpus, round(quota / period)))
        return cpus
    return cpus


def idle_cpus(seconds: float = IDLE_SAMPLE) -> float | None:
    """How many CPUs' worth of time went idle over the next ``seconds`` (from /proc/stat's
    first line: idle + iowait over the total); None when /proc/stat cannot be read."""
    try:
        first = _cpu_times()
        time.sleep(seconds)
        second = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(second) - sum(first)
    if total <= 0:
        return None
    idle = (second[3] + second[4]) - (first[3] + first[4])
    return max(0.0, idle / total * (os.cpu_count() or 1))


def _cpu_times() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(x) for x in stat.readline().split()[1:8]]


def auto_workers(free: float | None = None, limit: int | None = None) -> int:
    """Workers for ``pytest -n auto``: one per CPU the rest of the machine leaves free now
    (``free`` defaults to :func:`idle_cpus`), within :func:`cpu_limit`, at least one.

    TCG guests are CPU-bound: a worker without a CPU of its own does not add throughput, it
    stretches every boot of the run (and its deadlines, and the odds of a guest mistaking a
    stall for a fault). On a loaded machine ``-n auto`` is therefore ``-n 1``, never slower.
    """
    limit = cpu_limit() if limit is None else limit
    if free is None:
        free = idle_cpus()
    if free is None:
        return limit
    workers = max(1, min(limit, int(free + 0.5)))
    log.info("-n auto: %.2f CPUs idle of %d usable: %d workers", free, limit, workers)
    return workers
