"""Stall and lockup reports judged against the host's load (harness.vm.stalls), on real
console logs (tests/data/console/lockup.log: ``watchdog_thresh=1
rcupdate.rcu_cpu_stall_timeout=3``, a soft lockup "stuck for 6s" and an RCU stall of
t=752 jiffies at HZ=250)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.vm.faults import FaultScanner, Severity, classify
from harness.vm.stalls import StallLimits

DATA = Path(__file__).resolve().parents[1] / "data" / "console"
CMDLINE = "console=ttyS0 watchdog_thresh=1 rcupdate.rcu_cpu_stall_timeout=3"
CONFIG = {"CONFIG_HZ": "250", "CONFIG_RCU_CPU_STALL_TIMEOUT": "21"}


def stalls(load: float) -> StallLimits:
    return StallLimits.for_boot(CMDLINE, CONFIG, load)


def severities(text: str, limits: StallLimits) -> dict[str, Severity]:
    return {f.name: f.severity for f in classify(text, stalls=limits)}


def test_thresholds_come_from_the_command_line_then_the_config() -> None:
    assert stalls(1.0) == StallLimits(rcu=3, soft_lockup=2, hung_task=120, hz=250)
    plain = StallLimits.for_boot("quiet", {"CONFIG_HZ": "1000"}, 0.5)
    assert (plain.rcu, plain.soft_lockup, plain.hz, plain.load_factor) == (21, 20, 1000, 1.0)


def test_on_an_idle_host_every_stall_report_counts() -> None:
    text = (DATA / "lockup.log").read_text()
    # An RCU stall is a kernel warning (the warnings policy decides); a soft lockup counts.
    assert severities(text, stalls(1.0)) == {
        "rcu-stall": Severity.WARNING,
        "soft-lockup": Severity.ERROR,
    }


def test_under_load_short_reports_are_warnings_with_a_note() -> None:
    text = (DATA / "lockup.log").read_text()
    # Load factor 4: the soft lockup (6 s) is under 2 s x 4, the RCU stall (3 s) under 3 s x 4.
    found = classify(text, stalls=stalls(4.0))
    assert {f.name: f.severity for f in found} == {
        "rcu-stall": Severity.WARNING,
        "soft-lockup": Severity.WARNING,
    }
    lockup = next(f for f in found if f.name == "soft-lockup")
    assert "reported after 6 s, under the 8 s this host's load allows" in lockup.note
    # Load factor 2.5: 6 s is past 2 s x 2.5: a real lockup still counts.
    assert severities(text, stalls(2.5))["soft-lockup"] is Severity.ERROR


def test_a_hang_reported_again_with_a_longer_duration_counts() -> None:
    lines = [
        "[   22.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [init:1]",
        "[   48.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 48s! [init:1]",
    ]
    found = classify("\n".join(lines) + "\n", stalls=StallLimits(load_factor=2.0))
    assert [f.severity for f in found] == [Severity.WARNING, Severity.ERROR]


def test_an_rcu_report_is_a_warning_with_or_without_load() -> None:
    """RCU stalls are of the warnings class (the --kernel-warnings policy fails on them or
    lists them); the load never makes one worse."""
    for load in (1.0, 4.0):
        scanner = FaultScanner(stalls=StallLimits(load_factor=load))
        header = "[   21.000000] rcu: INFO: rcu_preempt self-detected stall on CPU\n"
        assert [f.severity for f in scanner.feed(header)] == [Severity.WARNING]
        scanner.feed("[   21.000001] rcu: \t0-....: (5250 ticks this GP) (t=5252 jiffies g=1)\n")
        assert scanner.faults[0].severity is Severity.WARNING


@pytest.mark.parametrize("log", ["hung-task.log", "gpf.log", "oops-panic.log"])
def test_other_faults_are_not_touched_by_the_load(log: str) -> None:
    text = (DATA / log).read_text()
    idle = [(f.name, f.severity) for f in classify(text, stalls=stalls(1.0))]
    loaded = [(f.name, f.severity) for f in classify(text, stalls=stalls(4.0))]
    if log == "hung-task.log":
        # Reported after 1-4 s with a 120 s threshold: every one is the host's load at x4.
        # Hung tasks are of the warnings class, idle or loaded.
        assert {s for _, s in loaded} == {s for _, s in idle} == {Severity.WARNING}
    else:
        assert loaded == idle
