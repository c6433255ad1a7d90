"""Tests for harness.vm.faults: the pattern table, real console logs, the incremental scanner."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.vm import faults
from harness.vm.faults import (
    PATTERNS,
    Fault,
    FaultPattern,
    FaultScanner,
    Severity,
    classify,
    excerpt,
    first_fatal,
)

CONSOLE = Path(__file__).resolve().parents[1] / "data" / "console"

# What each real log (see tests/data/console/README.md) must classify as, in order.
EXPECTED: dict[str, list[tuple[str, Severity, str]]] = {
    "clean-poweroff.log": [],
    # Debian systems (systemd, initramfs-tools, dracut): their failures are userland's, the
    # console patterns' business (harness.vm.patterns); the kernel itself reports no fault.
    "distro-dracut-degraded-raid1-ok.log": [],
    "distro-initramfs-tools-degraded-raid1-ok.log": [],
    "distro-dracut-luks-keyfile-ok.log": [],
    "distro-dracut-missing-fstab.log": [],
    "distro-dracut-wrong-passphrase.log": [],
    "distro-initramfs-tools-luks-keyfile-ok.log": [],
    "distro-initramfs-tools-missing-fstab.log": [],
    "distro-initramfs-tools-wrong-passphrase.log": [],
    "sysrq-panic.log": [
        (
            "panic",
            Severity.FATAL,
            "[    2.856389] Kernel panic - not syncing: sysrq triggered crash",
        ),
    ],
    "init-exit.log": [
        (
            "init-died",
            Severity.FATAL,
            "[    2.062611] Kernel panic - not syncing: Attempted to kill init!"
            " exitcode=0x00000100",
        ),
    ],
    "warning.log": [
        (
            "warning",
            Severity.WARNING,
            "[    2.134044] WARNING: CPU: 0 PID: 81 at /tmp/fw/mod/faultmod.c:14"
            " faultmod_init+0x3f/0x1000 [faultmod]",
        ),
    ],
    "oops-null.log": [
        (
            "bug",
            Severity.ERROR,
            "[    1.677863] BUG: kernel NULL pointer dereference, address: 0000000000000000",
        ),
        ("oops", Severity.ERROR, "[    1.678645] Oops: 0002 [#1] PREEMPT SMP NOPTI"),
    ],
    "kernel-bug.log": [
        ("kernel-bug", Severity.ERROR, "[    2.138764] kernel BUG at /tmp/fw/mod/faultmod.c:18!"),
        ("oops", Severity.ERROR, "[    2.139431] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI"),
    ],
    "gpf.log": [
        (
            "gpf",
            Severity.ERROR,
            "[    2.391605] general protection fault, probably for non-canonical address"
            " 0xdead000000000000: 0000 [#1] PREEMPT SMP NOPTI",
        ),
    ],
    "lockup.log": [
        (
            "rcu-stall",
            Severity.WARNING,
            "[    4.963101] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
        ),
        (
            "soft-lockup",
            Severity.ERROR,
            "[    7.838947] watchdog: BUG: soft lockup - CPU#0 stuck for 6s! [busybox:81]",
        ),
    ],
    "hung-task.log": [
        (
            "hung-task",
            Severity.WARNING,
            f"[    {5 + i}.{stamp}] INFO: task busybox:81 blocked for more than {1 + i} seconds.",
        )
        for i, stamp in enumerate(["294245", "318146", "342049", "365991"])
    ],
    "oops-panic.log": [
        (
            "bug",
            Severity.ERROR,
            "[    1.815810] BUG: kernel NULL pointer dereference, address: 0000000000000000",
        ),
        ("oops", Severity.ERROR, "[    1.816446] Oops: 0002 [#1] PREEMPT SMP NOPTI"),
        ("panic", Severity.FATAL, "[    1.824108] Kernel panic - not syncing: Fatal exception"),
    ],
    # Foreign initramfs images (tests/unit/test_patterns.py judges their root failures): a
    # generator that cannot find the root is no kernel fault; the kernel's own root failures are.
    "initramfs-tools-ok.log": [],
    "initramfs-tools-missing-root.log": [],
    "initramfs-tools-shell.log": [],
    "dracut-ok.log": [],
    "dracut-missing-root.log": [],
    "kernel-no-root.log": [
        (
            "panic",
            Severity.FATAL,
            "[    6.611979] Kernel panic - not syncing: VFS: Unable to mount root fs on "
            "unknown-block(0,0)",
        ),
    ],
    "kernel-no-init.log": [
        (
            "panic",
            Severity.FATAL,
            "[    6.261027] Kernel panic - not syncing: No working init found.  Try passing "
            "init= option to kernel. See Linux Documentation/admin-guide/init.rst for guidance.",
        ),
    ],
}

# One sample message (what follows the printk prefix) per row of PATTERNS. A row added to
# the table without a sample here fails test_pattern_sample.
SAMPLES: dict[str, str] = {
    "init-died": "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009",
    "panic": "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
    "double-fault": "PANIC: double fault, error_code: 0x0",
    "kasan": "BUG: KASAN: slab-out-of-bounds in kmalloc_oob_right+0x1a4/0x200",
    "kfence": "BUG: KFENCE: out-of-bounds read in test_out_of_bounds_read+0x9a/0x200",
    "ubsan": "UBSAN: array-index-out-of-bounds in drivers/foo/bar.c:123:45",
    "soft-lockup": "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [swapper/1:0]",
    "hard-lockup": "watchdog: Watchdog detected hard LOCKUP on cpu 1",
    "rcu-stall": "rcu: INFO: rcu_sched self-detected stall on CPU",
    "hung-task": "INFO: task kworker/0:1:23 blocked for more than 120 seconds.",
    "might-sleep": "BUG: sleeping function called from invalid context at mm/slab.h:123",
    "bug": "BUG: unable to handle page fault for address: ffffffffc0a01000",
    "kernel-bug": "kernel BUG at mm/slub.c:4012!",
    "gpf": "general protection fault: 0000 [#1] SMP PTI",
    "unable-to-handle": "Unable to handle kernel NULL pointer dereference at virtual address"
    " 0000000000000008",
    "oops": "Oops: 0000 [#1] PREEMPT SMP NOPTI",
    "lockdep": "WARNING: possible circular locking dependency detected",
    "warning": "WARNING: CPU: 2 PID: 1 at kernel/fork.c:123 copy_process+0x1a/0x2b",
}

STAMP = "[    1.234567] "


def read_log(name: str) -> str:
    # newline="" keeps the "\r\n" the serial console wrote.
    with (CONSOLE / name).open(encoding="utf-8", newline="") as log:
        return log.read()


def summary(found: list[Fault]) -> list[tuple[str, Severity, str]]:
    return [(f.name, f.severity, f.line) for f in found]


def names(text: str, **kwargs: int) -> list[str]:
    return [f.name for f in classify(text, **kwargs)]


# -- the table ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_pattern_sample(pattern: FaultPattern) -> None:
    sample = SAMPLES[pattern.name]
    found = classify(f"{STAMP}{sample}\n")
    assert summary(found) == [(pattern.name, pattern.severity, STAMP + sample)]
    # Without the printk prefix the same words are userland text.
    assert classify(f"{sample}\n") == []


@pytest.mark.parametrize(
    ("message", "name"),
    [
        ("NMI watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [a:1]", "soft-lockup"),
        ("BUG: soft lockup - CPU#0 stuck for 23s! [a:1]", "soft-lockup"),
        ("INFO: rcu_sched detected stalls on CPUs/tasks:", "rcu-stall"),
        ("rcu: INFO: rcu_preempt detected expedited stalls on CPUs/tasks: {", "rcu-stall"),
        ("rcu: INFO: rcu_preempt self-detected stall on CPU", "rcu-stall"),
        ("INFO: task my prog:123 blocked for more than 122 seconds.", "hung-task"),
        ("BUG: kernel NULL pointer dereference, address: 0000000000000000", "bug"),
        ("BUG: sleeping function called from invalid context at mm/slab.h:723", "might-sleep"),
        ("BUG: KASAN: use-after-free in foo+0x1/0x2", "kasan"),
        ("Internal error: Oops: 0000000096000005 [#1] PREEMPT SMP", "oops"),
        ("Oops - BUG: 0 [#1] SMP ARM", "oops"),
        ("divide error: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
        (
            "Unable to handle kernel paging request at virtual address dead000000000108",
            "unable-to-handle",
        ),
        ("WARNING: possible circular locking dependency detected", "lockdep"),
        ("Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b", "init-died"),
        ("Kernel panic - not syncing: hung_task: blocked tasks", "panic"),
    ],
)
def test_pattern_variants(message: str, name: str) -> None:
    assert names(f"{STAMP}{message}\r\n") == [name]


def test_every_sample_names_a_pattern() -> None:
    assert set(SAMPLES) == {p.name for p in PATTERNS}


@pytest.mark.parametrize(
    "prefix",
    [
        "[    1.234567] ",
        "[12345.678901] ",
        "<0>[    1.234567] ",
        "[    1.234567][    T1] ",
        "[    1.234567][    C0] ",
        "<4>[    0.000000][    T0] ",
    ],
)
def test_printk_prefix_variants(prefix: str) -> None:
    assert names(f"{prefix}Kernel panic - not syncing: x\r\n") == ["panic"]


@pytest.mark.parametrize(
    "line",
    [
        "Kernel panic - not syncing: echoed by init",
        "  Kernel panic - not syncing: indented",
        "[    1.234567]Kernel panic - not syncing: no space after the stamp",
        "[    1.2345] Kernel panic - not syncing: four decimals",
        "[    1.234567] sh: Kernel panic - not syncing: after a subsystem prefix",
        "[    1.234567] ---[ end Kernel panic - not syncing: Fatal exception ]---",
        "[    1.234567] x86/cpu: WARNING: not at the start of the message",
        "[    1.234567] ------------[ cut here ]------------",
        "[    1.234567] ---[ end trace 0000000000000000 ]---",
    ],
)
def test_lines_that_are_not_faults(line: str) -> None:
    assert classify(line + "\r\n") == []


def test_init_died_wins_over_panic_on_the_same_line() -> None:
    found = classify(f"{STAMP}Kernel panic - not syncing: Attempted to kill init! exitcode=0x1\n")
    assert [(f.name, f.severity) for f in found] == [("init-died", Severity.FATAL)]


def test_one_fault_per_line() -> None:
    # The gpf banner also has the die() form "...: 0000 [#1]" the oops row matches.
    line = f"{STAMP}general protection fault, probably for non-canonical address 0x1: 0000 [#1]"
    assert names(line + "\n") == ["gpf"]


def test_second_prefix_on_a_faulting_line_adds_nothing() -> None:
    line = f"{STAMP}Kernel panic - not syncing: {STAMP}BUG: quoted in the message"
    assert names(line + "\n") == ["panic"]


def test_newer_x86_oops_prefix() -> None:
    text = f"{STAMP}Oops: general protection fault, probably for non-canonical address 0x1\n"
    assert names(text) == ["gpf"]
    assert names(f"{STAMP}Oops: divide error: 0000 [#1] PREEMPT SMP NOPTI\n") == ["oops"]


def test_prefix_after_userland_text_on_the_same_line() -> None:
    # A prompt or "echo -n" leaves the line open; the kernel record then starts mid-line.
    text = f"/ # {STAMP}Kernel panic - not syncing: Fatal exception\r\n"
    found = classify(text)
    assert summary(found) == [("panic", Severity.FATAL, text.rstrip("\r\n"))]
    assert found[0].offset == 0


def test_table_is_checked() -> None:
    ok = FaultPattern("x", Severity.ERROR, "x")
    with pytest.raises(ValueError, match=r"'bad'.*bad regex"):
        faults._compile_table((FaultPattern("bad", Severity.ERROR, "("),))
    with pytest.raises(ValueError, match=r"'named'.*named groups"):
        faults._compile_table((FaultPattern("named", Severity.ERROR, "(?P<n>x)"),))
    with pytest.raises(ValueError, match="'x' is used twice"):
        faults._compile_table((ok, ok))
    with pytest.raises(ValueError, match="'unexpected-reboot' is used twice"):
        faults._compile_table((FaultPattern("unexpected-reboot", Severity.ERROR, "x"),))


def test_severity_orders_worst_last() -> None:
    assert max(Severity) is Severity.FATAL
    assert Severity.WARNING < Severity.ERROR < Severity.FATAL


# -- real console logs -------------------------------------------------------------------


def test_every_log_has_an_expectation() -> None:
    assert {p.name for p in CONSOLE.glob("*.log")} == set(EXPECTED)


@pytest.mark.parametrize("log_name", sorted(EXPECTED))
def test_real_log(log_name: str) -> None:
    text = read_log(log_name)
    assert "\r\n" in text, "the serial console writes \\r\\n; the saved log must keep it"
    assert len(text.encode()) < 100_000
    found = classify(text)
    assert summary(found) == EXPECTED[log_name]
    for fault in found:
        assert fault.offset == 0 or text[fault.offset - 1] == "\n"
        assert text[fault.offset :].startswith(fault.line)
        assert fault.line in fault.excerpt
        assert fault.excerpt in text


@pytest.mark.parametrize("log_name", sorted(EXPECTED))
def test_real_log_first_fatal(log_name: str) -> None:
    fatal = [e for e in EXPECTED[log_name] if e[1] is Severity.FATAL]
    got = first_fatal(read_log(log_name))
    if fatal:
        assert got is not None
        assert (got.name, got.severity, got.line) == fatal[0]
    else:
        assert got is None


def test_userland_fake_text_is_ignored() -> None:
    text = read_log("clean-poweroff.log")
    for fake in ("Kernel panic - not syncing: fake", "BUG: fake", "WARNING: fake", "]Oops: fake"):
        assert fake in text
    assert "reboot: Power down" in text
    assert classify(text) == []


def test_warning_excerpt_is_the_cut_here_block() -> None:
    text = read_log("warning.log")
    (warning,) = classify(text)
    lines = warning.excerpt.splitlines()
    assert lines[0].endswith("------------[ cut here ]------------")
    assert lines[1].endswith("faultmod: deliberate warning")
    assert lines[-1].endswith("---[ end trace 0000000000000000 ]---")
    assert len(lines) > 30  # the register dump and call trace are inside


def test_warning_without_end_trace_gets_the_default_excerpt() -> None:
    text = "".join(f"[    1.{i:06d}] line {i}\n" for i in range(40))
    text = text.replace("] line 10\n", "] WARNING: CPU: 0 PID: 1 at x.c:1 f+0x0/0x1\n")
    (warning,) = classify(text)
    assert warning.excerpt == excerpt(text, warning.offset)


def test_oops_excerpt_is_lines_around_it() -> None:
    text = read_log("oops-null.log")
    bug, _oops = classify(text)
    lines = bug.excerpt.splitlines()
    assert len(lines) == faults.EXCERPT_BEFORE + 1 + faults.EXCERPT_AFTER
    assert lines[faults.EXCERPT_BEFORE] == bug.line


def test_panic_excerpt_stops_at_the_end_of_the_text() -> None:
    lines = read_log("sysrq-panic.log").splitlines(keepends=True)
    panic_at = next(i for i, line in enumerate(lines) if "Kernel panic" in line)
    text = "".join(lines[: panic_at + 4])  # the console stopped 3 lines after the panic
    (panic,) = classify(text)
    assert panic.excerpt == "".join(lines[panic_at - faults.EXCERPT_BEFORE : panic_at + 4]).rstrip(
        "\r\n"
    )


# -- the incremental scanner -------------------------------------------------------------


def feed_in_chunks(text: str, size: int, **kwargs: int) -> tuple[FaultScanner, list[Fault]]:
    scanner = FaultScanner(**kwargs)
    reported: list[Fault] = []
    for start in range(0, len(text), size):
        reported += scanner.feed(text[start : start + size])
    reported += scanner.flush()
    return scanner, reported


@pytest.mark.parametrize("size", [1, 7, 4096])
@pytest.mark.parametrize("log_name", sorted(EXPECTED))
def test_scanner_matches_classify_whatever_the_chunk_size(log_name: str, size: int) -> None:
    text = read_log(log_name)
    scanner, reported = feed_in_chunks(text, size)
    assert scanner.faults == classify(text)
    # What feed() reported as it went is the same faults; only excerpts may be shorter.
    assert [(f.name, f.line, f.offset) for f in reported] == [
        (f.name, f.line, f.offset) for f in classify(text)
    ]


def test_scanner_reports_a_panic_before_the_boot_ends() -> None:
    text = read_log("init-exit.log")
    scanner = FaultScanner()
    cut = text.index("Attempted to kill init")
    end_of_line = text.index("\n", cut) + 1
    assert scanner.feed(text[:cut]) == []
    found = scanner.feed(text[cut:end_of_line])
    assert [f.name for f in found] == ["init-died"]
    # The excerpt so far stops at the panic line; later lines complete it.
    assert found[0].excerpt.endswith("exitcode=0x00000100")
    scanner.feed(text[end_of_line:])
    scanner.flush()
    assert scanner.faults[0].excerpt == classify(text)[0].excerpt
    assert len(scanner.faults[0].excerpt) > len(found[0].excerpt)


def test_scanner_waits_for_the_end_of_a_line() -> None:
    scanner = FaultScanner()
    assert scanner.feed(f"{STAMP}Kernel panic - not syncing: x") == []
    assert scanner.faults == []
    assert [f.name for f in scanner.flush()] == ["panic"]
    assert scanner.flush() == []
    with pytest.raises(RuntimeError, match="after flush"):
        scanner.feed("more\n")


def test_scanner_chunk_split_inside_crlf() -> None:
    scanner = FaultScanner()
    assert scanner.feed(f"{STAMP}BUG: soft lockup - CPU#0 stuck for 22s!\r") == []
    found = scanner.feed("\n")
    assert [(f.name, f.line) for f in found] == [
        ("soft-lockup", f"{STAMP}BUG: soft lockup - CPU#0 stuck for 22s!")
    ]


def test_crlf_and_lf_give_the_same_faults() -> None:
    crlf = read_log("oops-panic.log")
    lf = crlf.replace("\r\n", "\n")
    assert [(f.name, f.line) for f in classify(crlf)] == [(f.name, f.line) for f in classify(lf)]
    assert classify(f"{STAMP}Oops: 0000 [#1] SMP\r\r\n")[0].line == f"{STAMP}Oops: 0000 [#1] SMP"


def test_lone_carriage_return_does_not_end_a_line() -> None:
    text = f"progress 10%\rprogress 20%\r{STAMP}BUG: unable to handle page fault\n"
    (bug,) = classify(text)
    assert bug.offset == 0
    assert bug.line == text.rstrip("\n")


# -- unexpected reboots ------------------------------------------------------------------


def test_second_banner_is_an_unexpected_reboot() -> None:
    first = read_log("sysrq-panic.log")
    text = first + read_log("clean-poweroff.log")
    found = classify(text)
    assert [(f.name, f.severity) for f in found] == [
        ("panic", Severity.FATAL),
        ("unexpected-reboot", Severity.ERROR),
    ]
    reboot = found[1]
    assert reboot.offset == len(first)
    assert reboot.line.startswith("[    0.000000] Linux version 6.1.0-56-amd64")


def test_expected_reboot_is_not_a_fault() -> None:
    text = read_log("sysrq-panic.log") + read_log("clean-poweroff.log")
    assert names(text, expected_boots=2) == ["panic"]
    scanner, _ = feed_in_chunks(text, 7, expected_boots=2)
    assert scanner.boots == 2
    assert [f.name for f in scanner.faults] == ["panic"]


def test_third_banner_is_unexpected_with_two_expected() -> None:
    clean = read_log("clean-poweroff.log")
    assert names(clean * 3, expected_boots=2) == ["unexpected-reboot"]
    assert names(clean * 3) == ["unexpected-reboot", "unexpected-reboot"]


def test_expected_boots_zero_after_a_snapshot_restore() -> None:
    assert names(read_log("clean-poweroff.log"), expected_boots=0) == ["unexpected-reboot"]
    assert names("[    5.000000] faultmod: done\n", expected_boots=0) == []


def test_negative_expected_boots_is_refused() -> None:
    with pytest.raises(ValueError, match="expected_boots=-1"):
        FaultScanner(expected_boots=-1)


def test_userland_banner_is_not_a_reboot() -> None:
    clean = read_log("clean-poweroff.log")
    assert names(clean + "Linux version 6.1 echoed by a test\n") == []


# -- excerpt() ---------------------------------------------------------------------------

NUMBERED = "".join(f"line{i}\r\n" for i in range(10))


def offset_of(n: int) -> int:
    return NUMBERED.index(f"line{n}\r\n")


def expected_lines(first: int, last: int) -> str:
    return "\r\n".join(f"line{i}" for i in range(first, last + 1))


@pytest.mark.parametrize(
    ("line", "before", "after", "first", "last"),
    [
        (5, 2, 3, 3, 8),
        (0, 5, 2, 0, 2),  # nothing before the first line
        (9, 2, 5, 7, 9),  # nothing after the last line
        (4, 0, 0, 4, 4),
        (2, 5, 25, 0, 9),
    ],
)
def test_excerpt_boundaries(line: int, before: int, after: int, first: int, last: int) -> None:
    got = excerpt(NUMBERED, offset_of(line), before=before, after=after)
    assert got == expected_lines(first, last)


def test_excerpt_from_the_middle_of_a_line() -> None:
    assert excerpt(NUMBERED, offset_of(5) + 3, before=1, after=1) == expected_lines(4, 6)


def test_excerpt_of_a_trailing_partial_line() -> None:
    text = "a\nb\nc"
    assert excerpt(text, 4, before=1, after=3) == "b\nc"
    assert excerpt(text, len(text) - 1, before=0, after=0) == "c"


def test_excerpt_defaults() -> None:
    text = "".join(f"l{i}\n" for i in range(100))
    got = excerpt(text, text.index("l50\n")).split("\n")
    assert got[0] == "l45"
    assert got[-1] == "l75"


@pytest.mark.parametrize(
    ("offset", "before", "after"), [(-1, 1, 1), (len(NUMBERED), 1, 1), (0, -1, 1), (0, 1, -1)]
)
def test_excerpt_rejects_bad_arguments(offset: int, before: int, after: int) -> None:
    with pytest.raises(ValueError, match="excerpt"):
        excerpt(NUMBERED, offset, before=before, after=after)
