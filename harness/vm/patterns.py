"""Verdicts from the console when the init prints no markers of ours: tables kept as data.

An initramfs someone else built (Debian's initramfs-tools, dracut) or a user's own init
knows nothing of the harness's nonce. Its boot is judged by what it prints:

* success: the test's ``expect`` regexes, matched in order;
* failure: the test's ``fail`` regexes and :data:`ROOT_FAILURES`, the messages real
  generators, busybox, klibc and the kernel print when a boot cannot reach its root. A match
  is a TEST_FAIL whose reason is that console line (a kernel fault seen at the same time
  still wins, as everywhere);
* progress: :data:`KERNEL_PHASES`, marks taken from the kernel's own messages ("Run /init as
  init process", and initramfs-tools' wait for its root), so reports still have phases.

A real system goes on past its root: :data:`SYSTEMD_FAILURES` are systemd's own status lines
for a unit that failed, a dependency that failed, a device that never came and emergency mode,
each naming the unit; they are part of the shipped table. systemd colours its status lines
(ANSI escapes), so lines are matched with escape sequences removed.

Every row was checked against real console logs kept in ``tests/data/console/`` (successful
boots must match no failure row). Two lessons from those logs shaped the table: a generator's
messages for *optional* devices look like its fatal ones ("Gave up waiting for suspend/resume
device" and then the boot goes on), so rows name the root explicitly; and shell prompts
("(initramfs) ", "dracut:/# ") end without a newline, so prompt rows are matched against the
unfinished last line too.

Pure: no I/O, no QEMU.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.outcome import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailurePattern:
    """One failure row: ``regex`` is searched in each console line (printk prefix or not).

    ``prompt`` rows describe a shell prompt: they are also tried on the unfinished last
    line, since a prompt waits for input without ending its line.
    """

    name: str
    source: str
    regex: str
    prompt: bool = False


# Sources: the generator or program that prints the message.
INITRAMFS_TOOLS = "initramfs-tools"
DRACUT = "dracut"
BUSYBOX = "busybox"
KLIBC = "klibc"
KERNEL = "kernel"
TEST = "test"  # the test's own fail= patterns

ROOT_FAILURES: tuple[FailurePattern, ...] = (
    # initramfs-tools (scripts/local, scripts/functions, init). "Gave up waiting for X" with
    # any other X (suspend/resume device) is printed on boots that go on: not a failure.
    FailurePattern(
        "root-device-timeout", INITRAMFS_TOOLS, r"Gave up waiting for root file system device"
    ),
    FailurePattern(
        "root-does-not-exist", INITRAMFS_TOOLS, r"ALERT! +\S+ does not exist\. +Dropping to a shell"
    ),
    FailurePattern(
        "root-mount-failed", INITRAMFS_TOOLS, r"Failed to mount \S+ as root file system"
    ),
    FailurePattern(
        "no-init-on-root", INITRAMFS_TOOLS, r"Target filesystem doesn't have requested \S+"
    ),
    FailurePattern("no-init-found", INITRAMFS_TOOLS, r"No init found\. Try passing init= bootarg"),
    FailurePattern("no-root-given", INITRAMFS_TOOLS, r"No root device specified\. Boot arguments"),
    FailurePattern(
        "root-needs-fsck", INITRAMFS_TOOLS, r"The \S+ filesystem on \S+ requires a manual fsck"
    ),
    FailurePattern("initramfs-shell", INITRAMFS_TOOLS, r"^\(initramfs\) ", prompt=True),
    # cryptsetup-initramfs (scripts/local-top/cryptroot): said once per refused passphrase.
    FailurePattern(
        "luks-passphrase-refused",
        INITRAMFS_TOOLS,
        r"cryptsetup: ERROR: \S+: cryptsetup failed, bad password or options",
    ),
    FailurePattern(
        "luks-too-many-tries", INITRAMFS_TOOLS, r"cryptsetup: ERROR: \S+: maximum number of tries"
    ),
    # dracut 059: the shell-based init (99base) and the systemd flavour (98dracut-systemd).
    FailurePattern("could-not-boot", DRACUT, r"dracut Warning: Could not boot\."),
    FailurePattern("root-mount-failed", DRACUT, r"dracut Warning: Can't mount root filesystem"),
    # Not a row: "dracut-initqueue: timeout, still waiting for following initqueue hooks" is
    # printed *before* the initqueue's timeout hooks run, and those rescue boots: they start a
    # RAID1 with a member missing, degraded (seen on real degraded-RAID boots). A root that
    # never comes ends in "Could not boot" or emergency mode below.
    FailurePattern("emergency-mode", DRACUT, r"Entering emergency mode\. Exit the shell"),
    FailurePattern("dracut-shell", DRACUT, r"^dracut:/# ", prompt=True),
    # busybox: a failed mount of the root on the usual mount points (initramfs-tools' own
    # "mount: mounting /run on /root/run failed" on roots without /run is harmless).
    FailurePattern(
        "root-mount-failed",
        BUSYBOX,
        r"mount: mounting \S+ on (?:/mnt|/root|/newroot|/new_root|/sysroot|/rootfs) failed: ",
    ),
    FailurePattern(
        "switch-root-failed",
        BUSYBOX,
        r"switch_root: (?:can't execute|bad newroot|'?/\S+'?: No such file or directory)",
    ),
    # klibc: run-init and kinit say nothing unless they fail.
    FailurePattern("run-init-failed", KLIBC, r"^run-init: \S.*: \S"),
    FailurePattern("kinit-no-root", KLIBC, r"kinit: (?:Unable to mount root fs|no init found)"),
    # The kernel mounting the root itself (no initramfs, or root= given to the kernel).
    FailurePattern("cannot-open-root", KERNEL, r"VFS: Cannot open root device"),
    FailurePattern("unable-to-mount-root", KERNEL, r"VFS: Unable to mount root fs"),
    FailurePattern("no-working-init", KERNEL, r"No working init found"),
)


SYSTEMD = "systemd"

# systemd's messages for a unit that failed, a dependency that failed, a device that never
# came, and emergency mode. A healthy boot prints none of them. Two forms of each: PID 1's log
# line (the kernel log: until journald starts, or for the whole boot with
# systemd.log_target=kmsg), which names the unit in full, and the status line ("[FAILED]",
# "[DEPEND]", "[ TIME ]", escapes removed), cut to the console's 80 columns. The log line comes
# first. Only PID 1's own lines count ("dracut-initqueue[341]: Failed to start ...: Unit ...
# not found" is harmless), and only job results: "systemd[1]: Failed to find module 'autofs4'"
# is not one.
_UNIT = r"\S+\.(?:service|mount|device|socket|target|swap|path|timer|automount|scope|slice)\b"
SYSTEMD_FAILURES: tuple[FailurePattern, ...] = (
    FailurePattern(
        "unit-failed",
        SYSTEMD,
        r"systemd\[1\]: Failed to (?:start|mount|activate|listen on) " + _UNIT,
    ),
    FailurePattern("dependency-failed", SYSTEMD, r"systemd\[1\]: Dependency failed for " + _UNIT),
    FailurePattern(
        "device-timeout", SYSTEMD, r"systemd\[1\]: Timed out waiting for device " + _UNIT
    ),
    FailurePattern(
        "unit-failed-status",
        SYSTEMD,
        r"\[FAILED\] Failed to (?:start|mount|activate|listen on|set up|load|run) \S",
    ),
    FailurePattern("dependency-failed-status", SYSTEMD, r"\[DEPEND\] Dependency failed for \S"),
    FailurePattern("device-timeout-status", SYSTEMD, r"\[ TIME \] Timed out waiting for device \S"),
    FailurePattern(
        "emergency-mode",
        SYSTEMD,
        r"You are in (?:emergency|rescue) mode\.|Reached target emergency\.target|"
        r"Welcome to (?:emergency|rescue) mode",
    ),
    FailurePattern(
        "maintenance-prompt",
        SYSTEMD,
        r"(?:Press Enter for maintenance|Give root password for maintenance)",
        prompt=True,
    ),
)

# The shipped table: what every boot without markers is judged by, unless turned off.
SHIPPED_FAILURES = ROOT_FAILURES + SYSTEMD_FAILURES

# ANSI escape sequences (colours, cursor moves) as systemd writes them on the console.
# systemd cuts long status lines with "…", sometimes inside an escape: "\x1b[0;1;…".
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\[[0-9;?]*(?=…)|\x1b[()][A-Z0-9]|\x1bM")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences."""
    return ANSI_ESCAPE.sub("", text)


@dataclass(frozen=True)
class PhasePattern:
    """A point of progress in the kernel's own messages: the mark ``name`` is recorded at
    the first line matching ``regex``; its first group, if any, is the mark's detail."""

    name: str
    regex: str


INIT_START = "INIT-START"

KERNEL_PHASES: tuple[PhasePattern, ...] = (
    PhasePattern("initrd-unpacked", r"Freeing initrd memory: (\S+)"),
    PhasePattern("RAMDISK", r"RAMDISK: (.+ found at block \d+)"),
    PhasePattern(INIT_START, r"Run (\S+) as init process"),
    # initramfs-tools begins its wait for a root that is not there yet (max(30, rootdelay) s).
    PhasePattern("root-wait", r"Begin: Waiting for (root file system)"),
    PhasePattern(
        "root-mounted",
        r"(?:EXT4-fs \((\S+)\): mounted filesystem|VFS: Mounted root \(.*\) \w+ on device (\S+))",
    ),
)
# The line that ends the kernel phase of a boot without markers.
INIT_START_REGEX = re.compile(r"Run (\S+) as init process")


@dataclass(frozen=True)
class PatternHit:
    """A failure row that matched: the row, the whole console line, where it starts."""

    pattern: FailurePattern
    line: str
    offset: int

    @property
    def reason(self) -> str:
        """The TEST_FAIL message: what printed it, the row and the line itself."""
        return f"{self.pattern.source} {self.pattern.name}: {self.line.strip()}"


def _compile(regex: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as error:
        raise ConfigError(f"{what} {regex!r} is not a valid regular expression: {error}") from None


@dataclass(frozen=True)
class ConsoleVerdict:
    """How a boot is judged from its console: success regexes in order, failure regexes,
    and whether the shipped :data:`ROOT_FAILURES` table applies (None: when the init prints
    no markers).

    Raises:
        ConfigError: on construction, for a regex that does not compile (naming it).
    """

    expect: tuple[str, ...] = ()
    fail: tuple[str, ...] = ()
    root_failures: bool | None = None
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        compiled = tuple(_compile(r, "expect pattern") for r in self.expect)
        for regex in self.fail:
            _compile(regex, "fail pattern")
        object.__setattr__(self, "_compiled", compiled)

    @property
    def expect_patterns(self) -> tuple[re.Pattern[str], ...]:
        return self._compiled

    def failure_rows(self, *, markers: bool) -> tuple[FailurePattern, ...]:
        """The test's own rows, then the shipped table when it applies."""
        own = tuple(
            FailurePattern(f"fail:{n}", TEST, regex) for n, regex in enumerate(self.fail, 1)
        )
        shipped = self.root_failures if self.root_failures is not None else not markers
        return own + (SHIPPED_FAILURES if shipped else ())


def check_table(rows: Sequence[FailurePattern]) -> None:
    """Refuse a broken table: bad regexes, rows named twice for one source.

    Raises:
        ValueError: naming the row.
    """
    seen: set[tuple[str, str]] = set()
    for row in rows:
        try:
            re.compile(row.regex)
        except re.error as error:
            raise ValueError(f"patterns: row {row.source}/{row.name}: bad regex: {error}") from None
        if (row.source, row.name) in seen:
            raise ValueError(f"patterns: row {row.source}/{row.name} is listed twice")
        seen.add((row.source, row.name))


check_table(SHIPPED_FAILURES)


class LineWatcher:
    """Finds failure rows and kernel phases in console text fed chunk by chunk.

    Only complete lines are matched against ordinary rows (the partial last line waits for
    the next chunk or :meth:`flush`); prompt rows are also tried on the partial line, once.
    After :meth:`flush`, :attr:`hits` is what :func:`find_failures` gives for all the text.
    """

    def __init__(self, rows: Sequence[FailurePattern], *, phases: bool = False) -> None:
        self.rows = tuple(rows)
        self._compiled = [(row, re.compile(row.regex)) for row in self.rows]
        self._prompts = [(row, rx) for row, rx in self._compiled if row.prompt]
        self._phases = [(p, re.compile(p.regex)) for p in KERNEL_PHASES] if phases else []
        self.hits: list[PatternHit] = []
        self.phase_marks: list[tuple[str, str, int]] = []  # (name, detail, offset)
        self._partial = ""
        self._offset = 0  # where the partial line starts in the whole text
        self._prompt_seen_at = -1

    def feed(self, chunk: str) -> tuple[list[PatternHit], list[tuple[str, str, int]]]:
        """Take the next chunk; return the new hits and the new phase marks."""
        hits_before, marks_before = len(self.hits), len(self.phase_marks)
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._match_line(line.rstrip("\r"), self._offset)
            self._offset += len(line) + 1
        if self._partial and self._prompts and self._prompt_seen_at != self._offset:
            partial = strip_ansi(self._partial)
            for row, regex in self._prompts:
                if regex.search(partial):
                    self._prompt_seen_at = self._offset
                    self.hits.append(PatternHit(row, partial, self._offset))
                    break
        return self.hits[hits_before:], self.phase_marks[marks_before:]

    def flush(self) -> list[PatternHit]:
        """Match the unfinished last line as a whole line (the console closed)."""
        before = len(self.hits)
        if self._partial and self._prompt_seen_at != self._offset:
            self._match_line(self._partial.rstrip("\r"), self._offset)
        self._partial = ""
        return self.hits[before:]

    def _match_line(self, line: str, offset: int) -> None:
        if not line or offset == self._prompt_seen_at:  # a prompt already reported
            return
        line = strip_ansi(line)
        for row, regex in self._compiled:
            if regex.search(line):
                self.hits.append(PatternHit(row, line, offset))
                break
        seen = {name for name, _, _ in self.phase_marks}
        for phase, regex in self._phases:
            if phase.name in seen:
                continue
            match = regex.search(line)
            if match:
                detail = next((g for g in match.groups() if g), "")
                self.phase_marks.append((phase.name, detail, offset))


def find_failures(text: str, rows: Sequence[FailurePattern] = SHIPPED_FAILURES) -> list[PatternHit]:
    """Every failure row matched in a whole console text, in console order."""
    watcher = LineWatcher(rows)
    watcher.feed(text)
    watcher.flush()
    return watcher.hits


def first_failure(
    text: str, rows: Sequence[FailurePattern] = SHIPPED_FAILURES
) -> PatternHit | None:
    """The first failure row matched in ``text``, or None."""
    hits = find_failures(text, rows)
    return hits[0] if hits else None
