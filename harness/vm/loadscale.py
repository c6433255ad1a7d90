"""Scale boot deadlines with the machine's load, so an oversubscribed runner is not a timeout.

Under TCG a guest runs only as fast as the host CPU it gets. When more runnable work than
cores competes (``pytest -n auto`` next to other jobs on a shared CI runner), every phase of a
boot stretches by roughly the run-queue length per core; a deadline tuned on an idle machine
then fires on a guest that is merely slow. The factor is measured when a VM starts, bounded so
a wedged guest still times out in reasonable time, and recorded with the boot's results.
"""

from __future__ import annotations

import logging
import os

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
