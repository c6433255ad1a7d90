"""harness.vm.kernel_warnings and the console recorder: report, fail, ignore, and the allowlist,
on a real console log holding a WARN (tests/data/console/warning.log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.outcome import ConfigError
from harness.vm import faults
from harness.vm.console import ConsoleRecorder
from harness.vm.kernel_warnings import Allowed, WarningPolicy, load_allowlist, policy, summary

CONSOLE = Path(__file__).resolve().parents[1] / "data" / "console"
WARN_LINE = "WARNING: CPU: 0 PID: 81 at /tmp/fw/mod/faultmod.c:14 faultmod_init+0x3f/0x1000"


def warning_log() -> str:
    return (CONSOLE / "warning.log").read_text(encoding="utf-8")


def recorder_with(text: str, policy: WarningPolicy) -> ConsoleRecorder:
    recorder = ConsoleRecorder(0.0, "n0nce", policy=policy)
    recorder.write(text)
    recorder.scanner.flush()
    return recorder


def test_report_lists_the_warning_and_the_boot_is_not_a_fault() -> None:
    recorder = recorder_with(warning_log(), WarningPolicy("report"))
    assert recorder.serious_faults() == []
    listed = recorder.reported_warnings()
    assert [f.name for f in listed] == ["warning"]
    assert summary(listed[0]).startswith(WARN_LINE)
    assert "---[ end trace" in listed[0].excerpt  # the whole block, for reports


def test_fail_makes_the_warning_a_serious_fault() -> None:
    recorder = recorder_with(warning_log(), WarningPolicy("fail"))
    assert [f.name for f in recorder.serious_faults()] == ["warning"]


def test_ignore_neither_lists_nor_fails() -> None:
    recorder = recorder_with(warning_log(), WarningPolicy("ignore"))
    assert recorder.reported_warnings() == [] and recorder.serious_faults() == []


def test_an_allowlisted_warning_never_fails_and_is_known_with_its_reason() -> None:
    known = Allowed(r"faultmod_init\+", "provoked on purpose by the fault module")
    strict = WarningPolicy("fail", (known,))
    recorder = recorder_with(warning_log(), strict)
    assert recorder.serious_faults() == [] and recorder.reported_warnings() == []
    [(fault, entry)] = strict.known(recorder.scanner.faults)
    assert entry is known and fault.name == "warning"


def test_the_allowlist_regex_searches_the_whole_report_not_only_the_line() -> None:
    # "faultmod_init" is on the WARNING line; "do_one_initcall" only in its call trace.
    found = faults.classify(warning_log())
    assert WarningPolicy("fail", (Allowed("do_one_initcall", "x"),)).failing(found) == []


def test_errors_stay_errors_whatever_the_policy() -> None:
    text = (CONSOLE / "oops-null.log").read_text(encoding="utf-8")
    recorder = recorder_with(text, WarningPolicy("ignore"))
    assert "oops" in {f.name for f in recorder.serious_faults()}


def test_allowlist_file(tmp_path: Path) -> None:
    path = tmp_path / "known.toml"
    path.write_text(
        '[[warning]]\nregex = "faultmod_init"\nreason = "the fault module warns on purpose"\n'
        '[[warning]]\nregex = "rcu_preempt detected stalls"\nreason = "loaded CI runners"\n'
    )
    assert load_allowlist(path) == (
        Allowed("faultmod_init", "the fault module warns on purpose"),
        Allowed("rcu_preempt detected stalls", "loaded CI runners"),
    )
    assert policy("fail", [path]).allowlist == load_allowlist(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[warning]]\nregex = "("\nreason = "x"\n', "does not compile"),
        ('[[warning]]\nregex = "x"\n', "reason must say why"),
        ('[[warning]]\nreason = "x"\n', "regex must be a non-empty string"),
        ('[[warning]]\nregex = "x"\nreason = "y"\nseverity = 1\n', "unknown keys ['severity']"),
        ("warning = 3\n", "array of tables"),
        ("[[warning\n", "invalid TOML"),
    ],
)
def test_bad_allowlist_files_are_config_errors(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "known.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="allowlist") as caught:
        load_allowlist(path)
    assert words in str(caught.value)


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fail, report, ignore"):
        WarningPolicy("strict")
