"""Render a run's results as one self-contained HTML page a person reads at a glance.

Kernels are rows; controller (and template, when more than one ran) pairs are columns; each
cell shows the outcome of every test of that combination with a link to its console log, and
for a failure the fault excerpt and the reproduction bundle. A stacked bar chart (inline SVG)
shows where each kernel's boot time goes, phase by phase. Given earlier runs
(:mod:`harness.report.history`), each failure says since when it fails, or that it is new tonight,
and fixed tests say so; each failure shows its replay and pytest rerun commands. The same page
serves a single run and a merge of many CI jobs (:mod:`harness.report.merge`). Styles are inline
and there is no script, so the page opens from disk, from a CI artifact or in a mail client,
with no server.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from harness import __version__
from harness.outcome import Outcome
from harness.report import history
from harness.report.model import ERROR, PHASES, SKIPPED, Results, TestRecord

# Most severe first: a cell holding several tests shows its worst.
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
COLOURS = {
    Outcome.PASS.name: "#2e7d32",
    Outcome.TEST_FAIL.name: "#c62828",
    Outcome.KERNEL_FAULT.name: "#6a1b9a",
    Outcome.BOOT_TIMEOUT.name: "#ef6c00",
    Outcome.INFRA_ERROR.name: "#546e7a",
    Outcome.CONFIG_ERROR.name: "#795548",
    ERROR: "#37474f",
    SKIPPED: "#9e9e9e",
}
PHASE_COLOURS = {
    "firmware": "#90a4ae",
    "kernel": "#42a5f5",
    "init": "#66bb6a",
    "shutdown": "#ffa726",
}
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .5em}
.meta{color:#555}.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;
font-weight:600;font-size:12px;margin-right:4px}
table.matrix{border-collapse:collapse}table.matrix th,table.matrix td{border:1px solid #ccc;
padding:4px 6px;vertical-align:top;text-align:left}table.matrix thead th{background:#f3f3f3}
td.cell{min-width:9em}td.fail{background:#fdecea}td.pass{background:#edf7ed}
td.skip{background:#f5f5f5}td.empty{background:#fafafa;color:#aaa}
.entry{margin:2px 0}.entry .test{color:#555;font-size:12px}.retried{color:#8d6e00;font-size:12px}
pre{background:#f6f6f6;border:1px solid #ddd;padding:6px;font-size:12px;max-width:60em;
overflow-x:auto;white-space:pre-wrap}details summary{cursor:pointer;font-size:12px;color:#555}
.failure{border-left:4px solid #c62828;padding:2px 10px;margin:10px 0}
code{background:#f0f0f0;padding:0 3px}
.since{font-size:12px;font-weight:600}.since.NEW{color:#c62828}.since.FAILING{color:#6d4c41}
.since.FIXED{color:#2e7d32}pre.commands{margin:2px 0;max-width:40em}
"""


@dataclass(frozen=True)
class Column:
    """One column of the matrix: a controller and a template (either may be empty)."""

    controller: str
    template: str

    def label(self, with_template: bool) -> str:
        name = self.controller or "(no controller)"
        return f"{name} · {self.template}" if with_template and self.template else name

    @property
    def key(self) -> str:
        return f"{self.controller}/{self.template}"


def worst(outcomes: Sequence[str]) -> str:
    """The most severe of ``outcomes`` (unknown ones count as ERROR)."""
    ranked = [o if o in SEVERITY else ERROR for o in outcomes]
    return min(ranked, key=SEVERITY.index) if ranked else SKIPPED


def cell_class(outcome: str) -> str:
    if outcome == Outcome.PASS.name:
        return "pass"
    if outcome == SKIPPED:
        return "skip"
    return "fail"


def replay_command(record: TestRecord) -> str:
    """The command that boots a failure's bundle again ("" when it left none)."""
    return f"bootharness replay {shlex.quote(record.bundle)}" if record.bundle else ""


def rerun_command(record: TestRecord) -> str:
    """The pytest command that runs this test again, on this one cell of the matrix.

    The matrix options are part of it: a parametrized node id exists only when the run
    selects its kernel, controller and template.
    """
    argv = ["pytest", record.nodeid]
    for option, value in (
        ("--kernel", record.kernel),
        ("--controller", record.controller),
        ("--template", record.template),
    ):
        if value:
            argv += [option, value]
    return shlex.join(argv)


def render(
    results: Results,
    logs: Mapping[str, str],
    streaks: Mapping[str, history.Streak] | None = None,
) -> str:
    """The page; ``logs`` maps a test id to its console log, relative to the page.

    ``streaks`` (test id -> :class:`harness.report.history.Streak`, from
    :func:`harness.report.history.compare`) adds since when each failure fails, and what is new
    or fixed tonight.
    """
    since = streaks or {}
    records = [r for r in results.records if r.kernel]
    others = [r for r in results.records if not r.kernel]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>bootharness report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>bootharness report</h1>",
        _summary(results),
        _changes(since) if streaks is not None else "",
        "<h2>Matrix</h2>",
        _matrix(records, logs, since) if records else "<p>No test of the matrix ran.</p>",
        _failures(results.records, logs, since),
        "<h2>Boot time per kernel, by phase</h2>",
        _chart(records),
    ]
    if others:
        parts.append("<h2>Other tests</h2>")
        parts.append(_other_tests(others, logs, since))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(results: Results) -> str:
    counts = results.summary()
    badges = " ".join(
        _badge(outcome, f"{counts[outcome]} {outcome}") for outcome in SEVERITY if outcome in counts
    )
    first = next((r for r in results.records if r.qemu_version), None)
    qemu = f"QEMU {first.qemu_version}" if first else ""
    meta = ", ".join(
        x
        for x in (
            results.created,
            f"host {results.host}" if results.host else "",
            f"{len(results.records)} tests in {results.duration:.1f} s",
            qemu,
            f"bootharness {__version__}",
        )
        if x
    )
    accels = accelerators(results.records)
    accel_line = f'<p class="meta accel">{_e(accels)}</p>' if accels else ""
    return f'<p class="meta">{_e(meta)}</p>{accel_line}<p class="summary">{badges}</p>'


def accelerators(records: Sequence[TestRecord]) -> str:
    """Which accelerator each job's boots used, by kernel: ``accel kvm`` when all used one,
    else ``accel kvm: debian-6.1, debian-6.12; tcg: debian-5.10`` (a merged nightly page
    gathers jobs from runners with and without /dev/kvm)."""
    kernels: dict[str, set[str]] = {}
    for record in records:
        if record.accelerator:
            kernels.setdefault(record.accelerator, set()).add(record.kernel or "?")
    if len(kernels) <= 1:
        return "".join(f"accel {name}" for name in kernels)
    return "accel " + "; ".join(
        f"{name}: {', '.join(sorted(names))}" for name, names in sorted(kernels.items())
    )


def _changes(since: Mapping[str, history.Streak]) -> str:
    counts = history.counts(since)
    parts = [
        f'<span class="since {status}" data-status="{status}">{counts.get(status, 0)} {text}</span>'
        for status, text in (
            (history.NEW, "new tonight"),
            (history.FAILING, "still failing"),
            (history.FIXED, "fixed tonight"),
        )
    ]
    return f'<p class="changes">Since the last run: {", ".join(parts)}.</p>'


def _columns(records: Sequence[TestRecord]) -> list[Column]:
    return list(dict.fromkeys(Column(r.controller, r.template) for r in records))


def _matrix(
    records: Sequence[TestRecord],
    logs: Mapping[str, str],
    since: Mapping[str, history.Streak],
) -> str:
    kernels = list(dict.fromkeys(r.kernel for r in records))
    columns = _columns(records)
    with_template = len({c.template for c in columns}) > 1
    rows = ['<table class="matrix" id="matrix"><thead><tr><th>kernel</th><th>release</th>']
    rows += [f'<th data-column="{_e(c.key)}">{_e(c.label(with_template))}</th>' for c in columns]
    rows.append("</tr></thead><tbody>")
    for kernel in kernels:
        mine = [r for r in records if r.kernel == kernel]
        release = next((r.release for r in mine if r.release), "")
        rows.append(f'<tr data-kernel="{_e(kernel)}"><th>{_e(kernel)}</th><td>{_e(release)}</td>')
        for column in columns:
            cell = [r for r in mine if Column(r.controller, r.template) == column]
            rows.append(_cell(kernel, column, cell, logs, since))
        rows.append("</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _cell(
    kernel: str,
    column: Column,
    cell: Sequence[TestRecord],
    logs: Mapping[str, str],
    since: Mapping[str, history.Streak],
) -> str:
    attrs = f'data-kernel="{_e(kernel)}" data-column="{_e(column.key)}"'
    if not cell:
        return f'<td class="cell empty" {attrs}>–</td>'
    outcome = worst([r.outcome for r in cell])
    entries = [_entry(r, logs, since) for r in cell]
    return (
        f'<td class="cell {cell_class(outcome)}" {attrs} data-outcome="{_e(outcome)}">'
        + "".join(entries)
        + "</td>"
    )


def _entry(record: TestRecord, logs: Mapping[str, str], since: Mapping[str, history.Streak]) -> str:
    link = logs.get(record.nodeid)
    badge = _badge(record.outcome, record.outcome)
    head = f'<a class="log" href="{_e(link)}" title="console log">{badge}</a>' if link else badge
    parts = [
        f'<div class="entry" data-nodeid="{_e(record.nodeid)}">{head}',
        f' <span class="test">{_e(record.test)}</span>',
    ]
    boot = record.phases.get("PASS") or record.phases.get("INIT-START")
    if boot is not None:
        parts.append(f'<span class="test">{boot:.1f} s</span>')
    if record.retried:
        parts.append(
            f'<div class="retried">retried after {_e(", ".join(record.retried))} '
            f"(attempt {record.attempts})</div>"
        )
    parts.append(_since(since.get(record.nodeid)))
    if record.failed:
        parts.append(f'<div class="message">{_e(_short(record.message))}</div>')
        if record.excerpt:
            parts.append(
                f'<details><summary>fault excerpt</summary><pre class="excerpt">'
                f"{_e(record.excerpt)}</pre></details>"
            )
        parts.append(
            f'<details class="reproduce"><summary>reproduce</summary>{_commands(record)}</details>'
        )
    parts.append("</div>")
    return "".join(parts)


def _since(streak: history.Streak | None) -> str:
    """The history line of an entry: only what a reader acts on (no line for "passing")."""
    if streak is None or streak.status in (history.PASSING, history.UNKNOWN):
        return ""
    return (
        f'<div class="since {streak.status}" data-status="{streak.status}">'
        f"{_e(streak.text())}</div>"
    )


def _commands(record: TestRecord) -> str:
    lines = [x for x in (replay_command(record), rerun_command(record)) if x]
    return f'<pre class="commands">{_e(chr(10).join(lines))}</pre>'


def _failures(
    records: Sequence[TestRecord],
    logs: Mapping[str, str],
    since: Mapping[str, history.Streak],
) -> str:
    failed = [r for r in records if r.failed]
    if not failed:
        return "<h2>Failures</h2><p>None.</p>"
    out = [f"<h2>Failures ({len(failed)})</h2>"]
    if any(r.bundle and not PurePath(r.bundle).is_absolute() for r in failed):
        out.append('<p class="meta">Bundle paths are relative to the folder of this page.</p>')
    for record in failed:
        link = logs.get(record.nodeid)
        out.append(f'<div class="failure" data-nodeid="{_e(record.nodeid)}">')
        out.append(f"<p>{_badge(record.outcome, record.outcome)} <code>{_e(record.nodeid)}</code>")
        if link:
            out.append(f' — <a class="log" href="{_e(link)}">console log</a>')
        out.append("</p>")
        out.append(_since(since.get(record.nodeid)))
        out.append(f"<p>{_e(record.message)}</p>")
        if record.excerpt:
            out.append(f'<pre class="excerpt">{_e(record.excerpt)}</pre>')
        if record.bundle:
            out.append(
                f"<p>Reproduce: <code>{_e(replay_command(record))}</code> "
                "(add <code>--shell</code> to look around)</p>"
            )
        out.append(f'<p>Run again: <code class="rerun">{_e(rerun_command(record))}</code></p>')
        if record.retried:
            out.append(f'<p class="retried">retried after {_e(", ".join(record.retried))}</p>')
        out.append("</div>")
    return "\n".join(out)


def kernel_phases(records: Sequence[TestRecord]) -> dict[str, dict[str, float]]:
    """Mean seconds per phase for each kernel, over its passing boots (any boot if none)."""
    result: dict[str, dict[str, float]] = {}
    for kernel in dict.fromkeys(r.kernel for r in records):
        booted = [r for r in records if r.kernel == kernel and r.phases]
        passing = [r for r in booted if r.outcome == Outcome.PASS.name] or booted
        if not passing:
            continue
        means: dict[str, float] = {}
        for name, _, _ in PHASES:
            values = [r.phase_split()[name] for r in passing if name in r.phase_split()]
            if values:
                means[name] = sum(values) / len(values)
        result[kernel] = means
    return result


def _chart(records: Sequence[TestRecord]) -> str:
    data = kernel_phases(records)
    if not data:
        return "<p>No boot reached the console.</p>"
    label_w, bar_w, bar_h, gap = 220, 520, 22, 8
    longest = max(sum(p.values()) for p in data.values()) or 1.0
    scale = bar_w / longest
    height = len(data) * (bar_h + gap) + 40
    width = label_w + bar_w + 80
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="phase-chart" width="{width}" '
        f'height="{height}" role="img" aria-label="boot time per kernel by phase">'
    ]
    for row, (kernel, phases) in enumerate(data.items()):
        y = row * (bar_h + gap)
        svg.append(
            f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" '
            f'font-size="12">{_e(kernel)}</text>'
        )
        x = float(label_w)
        for name, seconds in phases.items():
            w = seconds * scale
            svg.append(
                f'<rect class="phase" data-kernel="{_e(kernel)}" data-phase="{name}" '
                f'x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                f'fill="{PHASE_COLOURS.get(name, "#999")}"><title>{_e(kernel)} {name}: '
                f"{seconds:.2f} s</title></rect>"
            )
            x += w
        svg.append(
            f'<text x="{x + 6:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="12">'
            f"{sum(phases.values()):.2f} s</text>"
        )
    legend_y = len(data) * (bar_h + gap) + 16
    x = float(label_w)
    for name, colour in PHASE_COLOURS.items():
        svg.append(f'<rect x="{x:.0f}" y="{legend_y}" width="12" height="12" fill="{colour}"/>')
        svg.append(f'<text x="{x + 16:.0f}" y="{legend_y + 11}" font-size="12">{name}</text>')
        x += 100
    svg.append("</svg>")
    return "\n".join(svg)


def _other_tests(
    records: Sequence[TestRecord],
    logs: Mapping[str, str],
    since: Mapping[str, history.Streak],
) -> str:
    items = "".join(
        f"<li>{_entry(r, logs, since)}<code>{_e(r.nodeid)}</code></li>" for r in records
    )
    return f"<ul>{items}</ul>"


def _badge(outcome: str, text: str) -> str:
    colour = COLOURS.get(outcome, COLOURS[ERROR])
    return (
        f'<span class="badge outcome-{_e(outcome)}" style="background:{colour}">{_e(text)}</span>'
    )


def _short(text: str, limit: int = 200) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
