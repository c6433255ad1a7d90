"""Classify serial console text into kernel faults, from a table of patterns kept as data.

Pure: no I/O, no QEMU. :func:`classify` reads a whole console log; :class:`FaultScanner`
does the same incrementally, as the console receives chunks, and gives the same faults.

Every pattern is anchored on the printk timestamp prefix (``[    1.234567] ``), so text
that a userland program prints ("Kernel panic - not syncing" echoed by an init script)
never counts. The prefix may follow other text on the same line: a shell prompt or an
``echo -n`` leaves the line open and the kernel's record then starts in the middle of it
(the warning log under ``tests/data/console`` shows this). A userland program that prints
a fake timestamp, or replays ``dmesg`` to the console, is indistinguishable from the kernel.

One console line gives at most one fault: the first pattern of :data:`PATTERNS` that
matches it, so the table is ordered from the most specific pattern to the most general.
One kernel event may still span several faulting lines (a NULL dereference prints
``BUG: kernel NULL pointer dereference`` and then ``Oops: 0002 [#1]``); callers decide by
severity, usually with :func:`first_fatal` or the worst severity seen.
"""

from __future__ import annotations

import bisect
import enum
import logging
import re
from dataclasses import dataclass, replace

from harness.vm.stalls import STALL_FAULTS, StallLimits, judge

log = logging.getLogger(__name__)


class Severity(enum.IntEnum):
    """How bad a fault is; ordered, so ``max()`` picks the worst."""

    WARNING = 1
    ERROR = 2
    FATAL = 3


@dataclass(frozen=True)
class FaultPattern:
    """One row of the table: ``regex`` must match right after the printk prefix."""

    name: str
    severity: Severity
    regex: str


@dataclass(frozen=True)
class Fault:
    """A fault found on the console.

    ``line`` is the whole console line without its line ending; ``offset`` is the
    character offset of the start of that line in the console text; ``excerpt`` is the
    text around it (the ``cut here`` ... ``end trace`` block for a warning).
    """

    name: str
    severity: Severity
    line: str
    offset: int
    excerpt: str
    note: str = ""  # why a report was judged milder than its row (harness.vm.stalls)


# Order matters: the first matching row names the line (see the module docstring).
PATTERNS: tuple[FaultPattern, ...] = (
    FaultPattern(
        "init-died", Severity.FATAL, r"Kernel panic - not syncing: Attempted to kill init!"
    ),
    FaultPattern("panic", Severity.FATAL, r"Kernel panic - not syncing"),
    FaultPattern("double-fault", Severity.FATAL, r"PANIC: double fault"),
    FaultPattern("kasan", Severity.ERROR, r"BUG: KASAN: "),
    FaultPattern("kfence", Severity.ERROR, r"BUG: KFENCE: "),
    FaultPattern("ubsan", Severity.ERROR, r"UBSAN: [\w -]+ in "),
    FaultPattern("soft-lockup", Severity.ERROR, r"(?:(?:NMI )?watchdog: )?BUG: soft lockup"),
    FaultPattern(
        "hard-lockup", Severity.ERROR, r"(?:NMI )?watchdog: Watchdog detected hard LOCKUP"
    ),
    # Warnings: the kernel goes on after them; the warnings policy decides what they do
    # (harness.vm.kernel_warnings). Stalls and hung tasks are warnings: under heavy host load
    # a guest can stall without any kernel bug, and the policy can still fail on them.
    FaultPattern(
        "rcu-stall",
        Severity.WARNING,
        r"(?:rcu: )?INFO: rcu_\w+ (?:self-)?detected (?:expedited )?stalls?\b",
    ),
    FaultPattern(
        "hung-task", Severity.WARNING, r"INFO: task .+:\d+ blocked for more than \d+ seconds"
    ),
    FaultPattern("might-sleep", Severity.WARNING, r"BUG: sleeping function called from invalid"),
    FaultPattern("bug", Severity.ERROR, r"BUG: "),
    FaultPattern("kernel-bug", Severity.ERROR, r"kernel BUG at "),
    # Since 6.10 x86 prefixes its die messages with "Oops: ".
    FaultPattern("gpf", Severity.ERROR, r"(?:Oops: )?general protection fault\b"),
    FaultPattern("unable-to-handle", Severity.ERROR, r"Unable to handle kernel "),
    # "Oops: 0002 [#1]" and the other die() banners: "invalid opcode: 0000 [#1]",
    # "divide error: 0000 [#1]", arm64's "Internal error: Oops: ...".
    FaultPattern(
        "oops",
        Severity.ERROR,
        r"(?:Internal error: )?Oops\b|[a-z][a-z ]*: [0-9a-f]{4} \[#\d+\]",
    ),
    FaultPattern(
        "lockdep",
        Severity.WARNING,
        r"WARNING: (?:possible (?:circular|recursive) locking|inconsistent lock state|"
        r"suspicious RCU usage|bad unlock balance|lock held when returning|possible irq lock)",
    ),
    FaultPattern("warning", Severity.WARNING, r"WARNING: "),
)

# The printk prefix: the timestamp with its six decimals, the optional caller id of
# CONFIG_PRINTK_CALLER ("[    T1]", "[    C0]") and one space. A log level ("<0>") before it
# needs no rule of its own: the prefix may follow any text on the line. Starting with a
# literal "[" also lets re skip quickly to the candidates (an optional "<0>" group in front
# made the combined regex three times slower).
PRINTK_PREFIX = r"\[ *\d+\.\d{6}\](?:\[ *[TC]\d+\])? "

UNEXPECTED_REBOOT = "unexpected-reboot"
_BANNER_GROUP = "_banner"
_BANNER_REGEX = r"Linux version "

# Warnings are reported with their whole block: "cut here" comes just before the
# WARNING line and "end trace" ends the register dump and call trace after it.
_CUT_HERE = "[ cut here ]"
_END_TRACE = "---[ end trace"
_CUT_HERE_LOOKBACK = 5
_END_TRACE_LOOKAHEAD = 200

EXCERPT_BEFORE = 5
EXCERPT_AFTER = 25


def _group(index: int) -> str:
    return f"p{index}"


def _compile_table(patterns: tuple[FaultPattern, ...]) -> re.Pattern[str]:
    """The whole table as one regex, after checking each row.

    Raises:
        ValueError: a row's regex does not compile, holds a named group (the combined regex
            tells rows apart by group name) or reuses another row's name.
    """
    seen: set[str] = {UNEXPECTED_REBOOT}
    for row in patterns:
        try:
            groups = re.compile(row.regex).groupindex
        except re.error as exc:
            raise ValueError(f"faults.PATTERNS: row {row.name!r}: bad regex: {exc}") from exc
        if groups:
            raise ValueError(
                f"faults.PATTERNS: row {row.name!r}: use (?:...) instead of named groups"
            )
        if row.name in seen:
            raise ValueError(f"faults.PATTERNS: row name {row.name!r} is used twice")
        seen.add(row.name)
    # One combined regex is the prefilter and the classifier at once: re scans the text in
    # C, and at a prefix the alternation tries the rows in table order, so the first
    # matching row wins just as the table says.
    alternatives = [f"(?P<{_group(i)}>{p.regex})" for i, p in enumerate(patterns)]
    alternatives.append(f"(?P<{_BANNER_GROUP}>{_BANNER_REGEX})")
    return re.compile(PRINTK_PREFIX + "(?:" + "|".join(alternatives) + ")")


_COMBINED = _compile_table(PATTERNS)
_GROUP_TO_PATTERN = {_group(i): p for i, p in enumerate(PATTERNS)}


def _split_lines(text: str) -> tuple[list[str], list[int]]:
    """Lines with their endings kept, and the offset where each starts.

    A console line ends only at "\\n": str.splitlines() would also split on a lone "\\r"
    (a redrawn progress bar) and on form feeds, and report other lines than a terminal shows.
    """
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    offsets: list[int] = []
    pos = 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    return lines, offsets


def _strip_ending(line: str) -> str:
    return line.rstrip("\r\n")


def _join_excerpt(lines: list[str], first: int, last: int) -> str:
    first = max(first, 0)
    last = min(last, len(lines) - 1)
    if last < first:
        return ""
    return _strip_ending("".join(lines[first : last + 1]))


def excerpt(
    text: str, offset: int, before: int = EXCERPT_BEFORE, after: int = EXCERPT_AFTER
) -> str:
    """The lines of ``text`` around the line holding ``offset``, exactly as they are.

    Gives ``before`` lines before that line, the line, and ``after`` lines after it (fewer
    at either end of the text), without the final line ending.

    Raises:
        ValueError: ``offset`` is outside ``text`` or ``before``/``after`` is negative.
    """
    if before < 0 or after < 0:
        raise ValueError(f"excerpt: before={before} and after={after} must not be negative")
    if not 0 <= offset < max(len(text), 1):
        raise ValueError(f"excerpt: offset {offset} is outside the text (length {len(text)})")
    lines, offsets = _split_lines(text)
    if not lines:
        return ""
    index = bisect.bisect_right(offsets, offset) - 1
    return _join_excerpt(lines, index - before, index + after)


def _is_warning(pattern_name: str) -> bool:
    return pattern_name == "warning"


def _excerpt_bounds(lines: list[str], index: int, name: str) -> tuple[int, int, bool]:
    """First and last line of a fault's excerpt, and whether later lines can change it."""
    if _is_warning(name):
        first = index - EXCERPT_BEFORE
        for i in range(index, max(index - _CUT_HERE_LOOKBACK, 0) - 1, -1):
            if _CUT_HERE in lines[i]:
                first = i
                break
        stop = min(index + _END_TRACE_LOOKAHEAD, len(lines) - 1)
        for i in range(index + 1, stop + 1):
            if _END_TRACE in lines[i]:
                return first, i, True
        return first, index + EXCERPT_AFTER, len(lines) > index + _END_TRACE_LOOKAHEAD
    return index - EXCERPT_BEFORE, index + EXCERPT_AFTER, len(lines) > index + EXCERPT_AFTER


class FaultScanner:
    """Finds faults in console output fed chunk by chunk, as it arrives.

    Chunks may split lines anywhere: only complete lines are classified, and the trailing
    partial line waits for the next :meth:`feed` or for :meth:`flush` at the end of the boot.
    After :meth:`flush`, :attr:`faults` equals :func:`classify` of all the text fed.

    Each ``Linux version`` banner counts as a boot; banners beyond ``expected_boots`` are
    reported as ``unexpected-reboot`` faults (ERROR). Use ``expected_boots=2`` when the test
    reboots the guest on purpose, 0 when the scanner starts after the banner (a snapshot
    restore). :attr:`boots` counts the banners seen.

    The scanner keeps the lines it has seen, because excerpts need them; a boot's console
    is small. An excerpt reported by :meth:`feed` holds the lines received so far; the same
    fault in :attr:`faults` gets the lines that arrive later, up to the excerpt's end.

    Raises:
        ValueError: ``expected_boots`` is negative.
    """

    def __init__(self, expected_boots: int = 1, stalls: StallLimits | None = None) -> None:
        if expected_boots < 0:
            raise ValueError(
                f"FaultScanner: expected_boots={expected_boots} must be 0 or more "
                "(the number of 'Linux version' banners the test expects)"
            )
        self.expected_boots = expected_boots
        self.boots = 0
        self._lines: list[str] = []
        self._offsets: list[int] = []
        self._end = 0
        self._partial = ""
        self._faults: list[Fault] = []
        self._line_index: list[int] = []
        self._open: set[int] = set()
        self._flushed = False
        # Stall reports wait for their duration (a later line, for RCU) before they are
        # judged against the host's load (harness.vm.stalls).
        self.stalls = stalls or StallLimits()
        self._unjudged: set[int] = set()

    @property
    def faults(self) -> list[Fault]:
        """All faults found so far, in console order, with excerpts brought up to date."""
        self._refresh_excerpts()
        return list(self._faults)

    def feed(self, chunk: str) -> list[Fault]:
        """Take the next chunk of console text; return the faults its complete lines hold.

        Raises:
            RuntimeError: called after :meth:`flush`.
        """
        if self._flushed:
            raise RuntimeError("FaultScanner.feed() after flush(): create a new scanner")
        if not chunk:
            return []
        cut = chunk.rfind("\n")
        if cut < 0:
            self._partial += chunk
            return []
        complete = self._partial + chunk[: cut + 1]
        self._partial = chunk[cut + 1 :]
        return self._scan(complete)

    def flush(self) -> list[Fault]:
        """Classify the trailing partial line (end of the boot); return its faults.

        Completes every excerpt. Calling it again returns nothing.
        """
        start = len(self._faults)
        if not self._flushed:
            self._flushed = True
            if self._partial:
                self._scan(self._partial)
                self._partial = ""
        self._refresh_excerpts(final=True)
        return self._faults[start:]

    def _scan(self, text: str) -> list[Fault]:
        lines, offsets = _split_lines(text)
        first_new = len(self._lines)
        self._lines.extend(lines)
        self._offsets.extend(self._end + off for off in offsets)
        base = self._end
        self._end += len(text)

        found: list[Fault] = []
        last_line = -1
        for match in _COMBINED.finditer(text):
            line_index = first_new + bisect.bisect_right(offsets, match.start()) - 1
            if line_index == last_line:
                continue  # one fault per line: the first prefix on it decides
            fault = self._fault_for(match, line_index)
            if fault is None:
                continue
            last_line = line_index
            self._line_index.append(line_index)
            self._open.add(len(self._faults))
            if fault.name in STALL_FAULTS:
                self._unjudged.add(len(self._faults))
            self._faults.append(fault)
            found.append(fault)
        if found:
            log.debug("faults at offset %d: %s", base, [f.name for f in found])
            self._refresh_excerpts()
            found = self._faults[len(self._faults) - len(found) :]
        return found

    def _fault_for(self, match: re.Match[str], line_index: int) -> Fault | None:
        group = match.lastgroup
        line = _strip_ending(self._lines[line_index])
        if group == _BANNER_GROUP:
            self.boots += 1
            if self.boots <= self.expected_boots:
                return None
            name, severity = UNEXPECTED_REBOOT, Severity.ERROR
        else:
            assert group is not None
            pattern = _GROUP_TO_PATTERN[group]
            name, severity = pattern.name, pattern.severity
        return Fault(name, severity, line, self._offsets[line_index], excerpt="")

    def _refresh_excerpts(self, final: bool = False) -> None:
        for number in sorted(self._unjudged):
            fault = self._faults[number]
            verdict = judge(fault.name, self._lines, self._line_index[number], self.stalls)
            if verdict.host_load:
                self._faults[number] = replace(fault, severity=Severity.WARNING, note=verdict.note)
            if verdict.settled or final:
                self._unjudged.discard(number)
        for number in sorted(self._open):
            fault = self._faults[number]
            first, last, settled = _excerpt_bounds(
                self._lines, self._line_index[number], fault.name
            )
            text = _join_excerpt(self._lines, first, last)
            if text != fault.excerpt:
                self._faults[number] = replace(fault, excerpt=text)
            if settled or final:
                self._open.discard(number)


def classify(text: str, expected_boots: int = 1, stalls: StallLimits | None = None) -> list[Fault]:
    """All faults in a whole console text, in console order.

    ``expected_boots`` is the number of ``Linux version`` banners that are not an
    unexpected reboot (see :class:`FaultScanner`); ``stalls`` the guest's stall thresholds
    and the host's load factor (default: an idle host, every stall report counts).

    Raises:
        ValueError: ``expected_boots`` is negative.
    """
    scanner = FaultScanner(expected_boots=expected_boots, stalls=stalls)
    scanner.feed(text)
    scanner.flush()
    return scanner.faults


def first_fatal(text: str, expected_boots: int = 1) -> Fault | None:
    """The first FATAL fault in ``text``, or None when the kernel never died."""
    for fault in classify(text, expected_boots=expected_boots):
        if fault.severity is Severity.FATAL:
            return fault
    return None
