"""Plain-text forms of what the ``bootharness`` command prints: tables and listings.

Pure functions from harness objects to lines, so the command line stays parsing and calls,
and the formats can be tested without running anything.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.bisect.search import BisectResult
from harness.image.cpio import Entry, EntryKind
from harness.image.initramfs import Initramfs
from harness.kernel.catalogue import DebianPackage, KernelEntry, SourceTree


@dataclass(frozen=True)
class KernelRow:
    """One line of ``bootharness kernels``; ``release`` is None when not known."""

    entry: KernelEntry
    is_default: bool
    fetched: bool
    release: str | None


def source_of(entry: KernelEntry) -> str:
    """The package name of a Debian kernel, the vmlinuz path of a local one, the tree (and
    base config) of one built from source."""
    if isinstance(entry.source, DebianPackage):
        return entry.source.package
    if isinstance(entry.source, SourceTree):
        return f"build: {entry.source.label} ({entry.source.config})"
    return str(entry.source.vmlinuz)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart; the first row is the header."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def kernel_table(rows: Sequence[KernelRow]) -> list[str]:
    """The ``bootharness kernels`` table; the default kernel's name is prefixed with ``*``."""
    cells = [["", "NAME", "SOURCE", "RELEASE", "FETCHED", "TAGS"]]
    for row in rows:
        cells.append(
            [
                "*" if row.is_default else "",
                row.entry.name,
                source_of(row.entry),
                row.release or "-",
                "yes" if row.fetched else "no",
                ",".join(row.entry.tags) or "-",
            ]
        )
    return table(cells)


def ls_lines(entries: Sequence[Entry]) -> list[str]:
    """Archive entries as ``ls -l`` shows files: mode, size (or major, minor), path."""
    sizes = [_size_column(entry) for entry in entries]
    width = max((len(size) for size in sizes), default=0)
    lines = []
    for entry, size in zip(entries, sizes, strict=True):
        line = f"{stat.filemode(entry.kind.value | entry.mode)}  {size.rjust(width)}  {entry.path}"
        if entry.kind is EntryKind.SYMLINK:
            line += f" -> {entry.target}"
        lines.append(line)
    return lines


def _size_column(entry: Entry) -> str:
    if entry.kind in (EntryKind.CHARDEV, EntryKind.BLOCKDEV):
        major, minor = entry.rdev
        return f"{major}, {minor}"
    if entry.kind is EntryKind.DIR:
        return "0"
    return str(len(entry.data))  # for a symlink, the target's length, as ls shows it


def build_summary(image: Initramfs, copied_to: Path | None) -> list[str]:
    """What ``bootharness initramfs build`` made: where, with which modules, cached or not."""
    modules = " ".join(module.name for module in image.modules) or "(none)"
    lines = [
        f"image:   {image.path}",
        f"modules: {modules}",
        f"cache:   {'built' if image.built else 'hit'}",
    ]
    if copied_to is not None:
        lines.append(f"copied:  {copied_to}")
    return lines


def bisect_table(result: BisectResult) -> list[str]:
    """Every candidate of a bisection in order with what was found about it: outcome, verdict,
    time and whether it booted or came from the cache; the last good and first bad marked."""
    rows = [["CANDIDATE", "OUTCOME", "VERDICT", "TIME", "HOW", ""]]
    for candidate in result.candidates:
        step = result.step_of(candidate)
        mark = (
            "<- first bad"
            if candidate == result.first_bad
            else "<- last good"
            if candidate == result.last_good
            else "<- could be"
            if candidate in result.suspects
            else ""
        )
        if step is None:
            rows.append([candidate, "-", "untested", "-", "-", mark])
            continue
        how = "cached" if step.observation.cached else "booted"
        rows.append(
            [
                candidate,
                step.outcome.name,
                step.verdict.value,
                f"{step.seconds:.1f} s",
                how,
                mark,
            ]
        )
    return table(rows)
