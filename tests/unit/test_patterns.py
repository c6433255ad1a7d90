"""The shipped table of root failures and the kernel's phase marks, against real console logs
(tests/data/console): failing boots name the line that says why, successful ones match nothing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from harness.image import templates
from harness.outcome import ConfigError
from harness.vm import patterns
from harness.vm.patterns import ROOT_FAILURES, ConsoleVerdict, FailurePattern, LineWatcher

DATA = Path(__file__).resolve().parents[1] / "data" / "console"


def log(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8", "replace")


def fed_in_chunks(text: str, seed: int) -> LineWatcher:
    """A watcher fed ``text`` in random pieces, as the console delivers it (no flush)."""
    watcher = LineWatcher(ROOT_FAILURES, phases=True)
    chunks = random.Random(seed)
    pos = 0
    while pos < len(text):
        size = chunks.randint(1, 700)
        watcher.feed(text[pos : pos + size])
        pos += size
    return watcher


GOOD_BOOTS = [
    "initramfs-tools-ok.log",
    "dracut-ok.log",
    "clean-poweroff.log",
    "warning.log",
    "oops-null.log",
    "init-exit.log",
    "lockup.log",
]


@pytest.mark.parametrize("name", GOOD_BOOTS)
def test_boots_that_reached_their_root_match_no_failure(name: str) -> None:
    assert patterns.find_failures(log(name)) == []


@pytest.mark.parametrize(
    ("name", "row", "line"),
    [
        (
            "initramfs-tools-missing-root.log",
            "root-device-timeout",
            "Gave up waiting for root file system device.  Common problems:",
        ),
        (
            "initramfs-tools-shell.log",
            "root-device-timeout",
            "Gave up waiting for root file system device.  Common problems:",
        ),
        ("dracut-missing-root.log", "could-not-boot", "dracut Warning: Could not boot."),
        (
            "kernel-no-root.log",
            "unable-to-mount-root",
            "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
        ),
        ("kernel-no-init.log", "no-working-init", "Kernel panic - not syncing: No working init"),
    ],
)
def test_failing_boots_name_their_first_line(name: str, row: str, line: str) -> None:
    hit = patterns.first_failure(log(name))
    assert hit is not None
    assert hit.pattern.name == row
    assert line in hit.line
    assert hit.reason.startswith(f"{hit.pattern.source} {row}: ")
    text = log(name)
    assert text[hit.offset :].startswith(hit.line.split("\r")[0][:20])


def test_every_initramfs_tools_message_of_a_missing_root_is_found() -> None:
    names = [hit.pattern.name for hit in patterns.find_failures(log("initramfs-tools-shell.log"))]
    assert names == ["root-device-timeout", "root-does-not-exist", "initramfs-shell"]


@pytest.mark.parametrize(
    ("name", "prompt"),
    [("initramfs-tools-shell.log", "initramfs-shell"), ("dracut-missing-root.log", "dracut-shell")],
)
def test_a_prompt_without_newline_is_seen_while_the_console_waits(name: str, prompt: str) -> None:
    text = log(name)
    assert not text.endswith("\n")  # the prompt waits for input: no newline after it
    watcher = fed_in_chunks(text, seed=1)
    assert watcher.hits[-1].pattern.name == prompt
    watcher.flush()
    assert [h.pattern.name for h in watcher.hits].count(prompt) == 1


@pytest.mark.parametrize("seed", range(5))
def test_chunks_anywhere_give_the_same_hits_as_the_whole_log(seed: int) -> None:
    text = log("dracut-missing-root.log")
    watcher = fed_in_chunks(text, seed)
    watcher.flush()
    assert [(h.pattern.name, h.offset) for h in watcher.hits] == [
        (h.pattern.name, h.offset) for h in patterns.find_failures(text)
    ]


def test_kernel_messages_mark_the_phases_of_a_boot_without_markers() -> None:
    watcher = fed_in_chunks(log("initramfs-tools-ok.log"), seed=3)
    marks = {name: detail for name, detail, _ in watcher.phase_marks}
    assert marks == {"initrd-unpacked": "7172K", "INIT-START": "/init", "root-mounted": "sda"}
    order = [name for name, _, _ in watcher.phase_marks]
    assert order == ["initrd-unpacked", "INIT-START", "root-mounted"]


@pytest.mark.parametrize(
    "harmless",
    [
        "Gave up waiting for suspend/resume device",  # initramfs-tools, resume= missing: goes on
        "mount: mounting /run on /root/run failed: No such file or directory",  # root without /run
        "[    1.000000] VFS: Disk quotas dquot_6.6.0",
        "Begin: Waiting for root file system ... done.",
    ],
)
def test_messages_of_boots_that_go_on_are_not_failures(harmless: str) -> None:
    assert patterns.find_failures(harmless + "\r\n") == []


def test_the_classic_inits_mount_failure_is_busybox_s() -> None:
    hit = patterns.first_failure("mount: mounting /dev/sda on /mnt failed: No such device\r\n")
    assert hit is not None and (hit.pattern.source, hit.pattern.name) == (
        "busybox",
        "root-mount-failed",
    )


def test_the_test_s_own_patterns_come_first_and_the_table_only_without_markers() -> None:
    verdict = ConsoleVerdict(expect=("ok",), fail=("custom failure",))
    rows = verdict.failure_rows(markers=False)
    assert rows[0] == FailurePattern("fail:1", "test", "custom failure")
    assert rows[1:] == patterns.SHIPPED_FAILURES
    assert verdict.failure_rows(markers=True) == rows[:1]
    forced = ConsoleVerdict(root_failures=True).failure_rows(markers=True)
    assert forced == patterns.SHIPPED_FAILURES
    assert ConsoleVerdict(root_failures=False).failure_rows(markers=False) == ()


@pytest.mark.parametrize("field", ["expect", "fail"])
def test_a_bad_regex_is_a_config_error_naming_it(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field} pattern '\(unclosed'"):
        ConsoleVerdict(**{field: ("(unclosed",)})


def test_the_table_refuses_broken_rows() -> None:
    with pytest.raises(ValueError, match="bad regex"):
        patterns.check_table([FailurePattern("x", "y", "(")])
    with pytest.raises(ValueError, match="listed twice"):
        patterns.check_table([FailurePattern("x", "y", "a"), FailurePattern("x", "y", "b")])


def test_a_template_declares_that_it_prints_no_markers(tmp_path: Path) -> None:
    (tmp_path / "mine.sh.j2").write_text("#!/bin/sh\n{# bootharness: markers=off #}\nexec sh\n")
    (tmp_path / "ours.sh.j2").write_text("#!/bin/sh\nexec sh\n")
    (tmp_path / "bad.sh.j2").write_text("{# bootharness: markers=maybe #}\n")
    assert not templates.prints_markers("mine.sh.j2", extra_dirs=[tmp_path])
    assert templates.prints_markers("ours.sh.j2", extra_dirs=[tmp_path])
    assert templates.render("mine.sh.j2", {}, extra_dirs=[tmp_path]) == "#!/bin/sh\nexec sh\n"
    with pytest.raises(ConfigError, match="markers='maybe'"):
        templates.prints_markers("bad.sh.j2", extra_dirs=[tmp_path])
