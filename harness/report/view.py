"""What a report shows, decided without markup: the page (:mod:`harness.report.html`) and the
terminal tables (:mod:`harness.cli.text`) lay out the same choices.

* Rows are kernels. Columns follow one dimension (:data:`COLUMN_DIMENSIONS`): the one whose
  values vary most in the run, or the one asked for. A VM with disks on several controllers
  sits in the column of its boot disk's controller, and its entry names them all.
* Each entry is labelled with its parameters (the parameter id without the kernel, which the
  row says) and, as chips, every other dimension the run varies that the id does not already
  say; failures come first inside a cell, most severe first.
* The boot-time chart has one bar per kernel and boot path: a GRUB boot and a PVH boot of the
  same kernel differ by seconds, and one mean of both would describe neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.outcome import ConfigError, Outcome
from harness.report.model import ERROR, PHASES, SKIPPED, TestRecord
from harness.vm.dimensions import SEPARATOR, initramfs_label

# Most severe first: a cell holding several tests shows its worst, and lists it first.
SEVERITY = (
    Outcome.KERNEL_FAULT.name,
    Outcome.BOOT_TIMEOUT.name,
    Outcome.TEST_FAIL.name,
    Outcome.INFRA_ERROR.name,
    Outcome.CONFIG_ERROR.name,
    ERROR,
    Outcome.PASS.name,
    SKIPPED,
)
# Dimensions the columns may follow, in the order that breaks a tie.
COLUMN_DIMENSIONS = ("controller", "boot_path", "initramfs", "layout")
# Every dimension the page's overview lists, with the words it uses.
TITLES = {
    "kernel": "kernel",
    "controller": "controller",
    "boot_path": "boot path",
    "initramfs": "initramfs",
    "layout": "layout",
}
# How an empty value reads.
EMPTY = {"controller": "(no disk)", "layout": "(whole disk)", "kernel": "(none)"}


def rank(outcome: str) -> int:
    """Position of ``outcome`` in :data:`SEVERITY` (unknown outcomes count as ERROR)."""
    return SEVERITY.index(outcome if outcome in SEVERITY else ERROR)


def worst(outcomes: Iterable[str]) -> str:
    """The most severe of ``outcomes`` (SKIPPED when there are none)."""
    ranked = [o if o in SEVERITY else ERROR for o in outcomes]
    return min(ranked, key=SEVERITY.index) if ranked else SKIPPED


def value(record: TestRecord, dimension: str) -> str:
    """The record's value of ``dimension``; ``initramfs`` reads ``ours init.sh`` or
    ``foreign dracut`` (with its template or generator)."""
    if dimension == "initramfs":
        return initramfs_label(record.initramfs, record.template, record.generator)
    return str(getattr(record, dimension))


def column_value(record: TestRecord, dimension: str) -> str:
    """The column a record sits in: its value, the boot disk's controller for ``controller``."""
    found = value(record, dimension)
    return found.split(SEPARATOR, 1)[0] if dimension == "controller" else found


def shown(dimension: str, text: str) -> str:
    """``text`` as a reader sees it (an empty value says what it means)."""
    return text or EMPTY.get(dimension, "(none)")


def column_dimension(records: Sequence[TestRecord], chosen: str | None = None) -> str:
    """The dimension the columns follow: ``chosen``, else the one with most distinct values.

    Raises:
        ConfigError: ``chosen`` is not one of :data:`COLUMN_DIMENSIONS`.
    """
    if chosen:
        if chosen not in COLUMN_DIMENSIONS:
            raise ConfigError(
                f"report columns {chosen!r}: use one of {', '.join(COLUMN_DIMENSIONS)}"
            )
        return chosen
    counts = {d: len({column_value(r, d) for r in records}) for d in COLUMN_DIMENSIONS}
    return max(COLUMN_DIMENSIONS, key=lambda d: (counts[d], -COLUMN_DIMENSIONS.index(d)))


def varying(records: Sequence[TestRecord]) -> list[str]:
    """Dimensions with more than one value among the tests that booted."""
    booted = [r for r in records if r.release] or list(records)
    return [d for d in COLUMN_DIMENSIONS if len({value(r, d) for r in booted}) > 1]


@dataclass(frozen=True)
class Label:
    """How an entry is named: ``test[params]`` and chips of other dimensions."""

    name: str
    params: str
    chips: tuple[tuple[str, str], ...]  # (dimension, value as shown)

    @property
    def text(self) -> str:
        """The whole label as one line: ``test_boot[ahci-pvh] foreign dracut``."""
        head = f"{self.name}[{self.params}]" if self.params else self.name
        return " ".join([head, *(chip for _, chip in self.chips)])


def label(record: TestRecord, dimensions: Sequence[str], column: str = "") -> Label:
    """``record``'s label in a matrix whose varying dimensions are ``dimensions``.

    A dimension gets a chip unless the parameter id already says its value, or it is the
    column's (the heading says it) and the value has a single part.
    """
    params = record.own_params()
    words = set(params.split("-")) if params else set()
    chips: list[tuple[str, str]] = []
    for dimension in dimensions:
        found = value(record, dimension)
        if dimension == column and SEPARATOR not in found:
            continue
        if found and (_says(params, found) or set(found.split()) <= words):
            continue
        if dimension == "initramfs" and (record.template or record.generator) in words:
            continue  # "init.sh" or "dracut" in the id says which kind it is
        chips.append((dimension, shown(dimension, found)))
    return Label(record.test, params, tuple(chips))


def _says(params: str, found: str) -> bool:
    """Whether the parameter id holds ``found`` as whole dash-separated words."""
    return f"-{found}-" in f"-{params}-"


def cell_order(records: Iterable[TestRecord]) -> list[TestRecord]:
    """Failures first (most severe first), then by test and parameters."""
    return sorted(records, key=lambda r: (rank(r.outcome), r.test, r.own_params(), r.nodeid))


def outcome_counts(records: Iterable[TestRecord]) -> list[tuple[str, int]]:
    """(outcome, count), most severe first."""
    counts = Counter(r.outcome for r in records)
    return sorted(counts.items(), key=lambda item: rank(item[0]))


def dimension_values(records: Sequence[TestRecord], dimension: str) -> list[tuple[str, int]]:
    """Each value of ``dimension`` in the run, in first-seen order, with its count."""
    return list(Counter(value(r, dimension) for r in records).items())


def boot_phases(records: Sequence[TestRecord]) -> dict[tuple[str, str], dict[str, float]]:
    """(kernel, boot path) -> mean seconds per phase, over its passing boots (any boot when
    none passed); pairs with no boot that reached the console are left out."""
    result: dict[tuple[str, str], dict[str, float]] = {}
    for key in dict.fromkeys((r.kernel, r.boot_path) for r in records):
        booted = [r for r in records if (r.kernel, r.boot_path) == key and r.phases]
        passing = [r for r in booted if r.outcome == Outcome.PASS.name] or booted
        if not passing:
            continue
        splits = [r.phase_split() for r in passing]
        means: dict[str, float] = {}
        for name, _, _ in PHASES:
            values = [split[name] for split in splits if name in split]
            if values:
                means[name] = sum(values) / len(values)
        result[key] = means
    return result


def kernel_summary(records: Sequence[TestRecord]) -> list[list[str]]:
    """One row per kernel (header first): tests, passes, failures by outcome, and the values
    of every dimension it ran with; what ``bootharness report merge`` prints."""
    rows = [["KERNEL", "TESTS", "PASS", "FAILED", "BOOT PATHS", "INITRAMFS", "WARNINGS"]]
    for kernel in dict.fromkeys(r.kernel for r in records):
        mine = [r for r in records if r.kernel == kernel]
        failed = ", ".join(f"{n} {o}" for o, n in outcome_counts(r for r in mine if r.failed))
        rows.append(
            [
                shown("kernel", kernel),
                str(len(mine)),
                str(sum(1 for r in mine if r.outcome == Outcome.PASS.name)),
                failed or "-",
                ", ".join(v for v, _ in dimension_values(mine, "boot_path")),
                ", ".join(v for v, _ in dimension_values(mine, "initramfs")),
                str(sum(len(r.kernel_warnings) for r in mine)),
            ]
        )
    return rows
