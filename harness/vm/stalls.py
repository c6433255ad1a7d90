"""Stall and lockup reports judged against the host's load: no false verdict on a busy host.

A guest kernel reports a soft lockup, an RCU stall or a hung task when some work has not
progressed for its threshold of seconds (20, 21 and 120 by default). Under TCG on a loaded
host, the guest only gets a share of a CPU: work that takes 5 s on an idle host takes 20 s at
a load factor of 4 (:mod:`harness.vm.loadscale`), and the kernel's detector fires although
nothing in the guest is wrong. So the classifier scales the detectors' thresholds by the
run's load factor, as the deadlines are scaled: a report whose own duration ("stuck for 22s",
"t=5252 jiffies", "blocked for more than 120 seconds") is under threshold x load factor is
kept as a warning with a note, not a KERNEL_FAULT. A real hang keeps going and is reported
again with a longer duration (a soft lockup every few seconds, an RCU stall at about three
times its threshold), which then counts; or the phase's deadline ends it as a BOOT_TIMEOUT.
On an idle host (load factor 1) every report counts, as before.

Thresholds come from the guest's command line (``watchdog_thresh=``,
``rcupdate.rcu_cpu_stall_timeout=``, ``hung_task_timeout_secs=`` as a sysctl) or its kernel
config (``CONFIG_RCU_CPU_STALL_TIMEOUT``, ``CONFIG_DEFAULT_HUNG_TASK_TIMEOUT``, ``CONFIG_HZ``
for the RCU report's jiffies), else the kernel's defaults.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Fault names (harness.vm.faults.PATTERNS) whose reports carry how long the stall lasted.
STALL_FAULTS = ("soft-lockup", "rcu-stall", "hung-task")
_DURATION_ON_LINE = {
    "soft-lockup": re.compile(r"stuck for (\d+)s"),
    "hung-task": re.compile(r"blocked for more than (\d+) seconds"),
}
_RCU_JIFFIES = re.compile(r"\bt=(\d+) jiffies")
_RCU_LOOKAHEAD = 6  # lines after the header that may hold "(t=N jiffies ...)"


@dataclass(frozen=True)
class StallLimits:
    """The guest's detector thresholds (seconds) and the host's load factor."""

    rcu: float = 21.0
    soft_lockup: float = 20.0  # twice watchdog_thresh
    hung_task: float = 120.0
    hz: int = 250
    load_factor: float = 1.0

    @classmethod
    def for_boot(cls, cmdline: str, config: Mapping[str, str], load_factor: float) -> StallLimits:
        """The limits of a guest booted with ``cmdline`` and kernel ``config`` on a host
        whose load stretches time by ``load_factor``."""
        words = dict(word.split("=", 1) for word in cmdline.split() if "=" in word)

        def number(*values: str | None, default: float) -> float:
            for value in values:
                try:
                    if value is not None:
                        return float(value)
                except ValueError:
                    continue
            return default

        thresh = number(words.get("watchdog_thresh"), default=10.0)
        return cls(
            rcu=number(
                words.get("rcupdate.rcu_cpu_stall_timeout"),
                config.get("CONFIG_RCU_CPU_STALL_TIMEOUT"),
                default=21.0,
            ),
            soft_lockup=2 * thresh,
            hung_task=number(
                words.get("sysctl.kernel.hung_task_timeout_secs"),
                words.get("hung_task_timeout_secs"),
                config.get("CONFIG_DEFAULT_HUNG_TASK_TIMEOUT"),
                default=120.0,
            ),
            hz=int(number(config.get("CONFIG_HZ"), default=250.0)),
            load_factor=max(1.0, load_factor),
        )

    def threshold(self, name: str) -> float:
        return {"rcu-stall": self.rcu, "soft-lockup": self.soft_lockup}.get(name, self.hung_task)


@dataclass(frozen=True)
class Judgement:
    """What a stall report means on this host: ``host_load`` keeps it a warning."""

    settled: bool  # later lines cannot change it
    host_load: bool = False
    note: str = ""


def judge(name: str, lines: Sequence[str], index: int, limits: StallLimits) -> Judgement:
    """Judge the stall report of fault ``name`` on ``lines[index]`` against ``limits``.

    An RCU stall's duration is on one of the lines after its header: until one of them (or
    enough lines without one) has arrived, the judgement is not :attr:`Judgement.settled`
    and the report counts as a fault."""
    if name not in STALL_FAULTS or limits.load_factor <= 1.0:
        return Judgement(settled=True)
    seconds: float | None = None
    pattern = _DURATION_ON_LINE.get(name)
    if pattern is not None:
        found = pattern.search(lines[index])
        seconds = float(found.group(1)) if found else None
        settled = True
    else:
        following = lines[index : index + 1 + _RCU_LOOKAHEAD]
        found = next((m for line in following if (m := _RCU_JIFFIES.search(line))), None)
        seconds = int(found.group(1)) / limits.hz if found else None
        settled = found is not None or len(following) > _RCU_LOOKAHEAD
    if seconds is None:
        return Judgement(settled=settled)  # no duration to weigh: it counts
    allowed = limits.threshold(name) * limits.load_factor
    if seconds >= allowed:
        return Judgement(settled=settled)
    note = (
        f"reported after {seconds:g} s, under the {allowed:g} s this host's load allows "
        f"({limits.threshold(name):g} s x load factor {limits.load_factor:g}): host load, "
        "not a verdict; a real hang is reported again later, or times out"
    )
    return Judgement(settled=settled, host_load=True, note=note)
