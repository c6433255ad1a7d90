"""Render a run's results as one self-contained HTML page a person reads at a glance.

The page answers "what broke, where, since when" for every dimension of the matrix:

* an overview of the dimensions the run covered (kernels, controllers, boot paths, initramfs
  kinds, layouts) and of the kernel warnings it met;
* the matrix: kernels as rows, columns along the dimension the run varies most (or the one
  asked for, :mod:`harness.report.view`); each entry is labelled with its parameters and its
  duration, links its console log, and failures come first in a cell; a cell holding many
  tests folds its passing ones into a ``<details>`` group, so a large matrix stays readable;
* the failures, most severe first, with every dimension of the boot, the fault excerpt, the
  symbolised call trace and the kernel warnings when there are any, the replay and rerun
  commands, and, given earlier runs (:mod:`harness.report.history`), since when each fails;
* a stacked bar chart (inline SVG) of where boot time goes, per kernel and boot path.

The same page serves a single run and a merge of many CI jobs (:mod:`harness.report.merge`).
Styles are inline and there is no script, so the page opens from disk, from a CI artifact or
in a mail client, with no server.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePath

from harness import __version__
from harness.outcome import Outcome
from harness.report import history, view
from harness.report.model import ERROR, SKIPPED, Results, TestRecord
from harness.report.view import COLUMN_DIMENSIONS, TITLES, Label
from harness.vm.dimensions import DEFAULT_BOOT_PATH, OURS, SEPARATOR

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
# A cell with more entries than this folds its passing and skipped ones into a group.
COLLAPSE_AT = 8
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.15em;margin:1.4em 0 .5em}
.meta{color:#555}.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;
font-weight:600;font-size:12px;margin-right:4px}
table.matrix{border-collapse:collapse;table-layout:fixed;width:100%}
table.matrix th,table.matrix td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;
text-align:left}table.matrix thead th{background:#f3f3f3}table.matrix th.kernel{width:11em}
td.fail{background:#fdecea}td.pass{background:#edf7ed}td.skip{background:#f5f5f5}
td.empty{background:#fafafa;color:#aaa}.release{font-weight:400;font-size:12px;color:#555}
.entry{margin:3px 0;font-size:12px;line-height:1.35;overflow-wrap:break-word}
.entry .badge{font-size:11px;padding:0 5px}.params{color:#555}
.duration{color:#555;margin-left:.3em;white-space:nowrap}
.dim{display:inline-block;font-size:11px;border:1px solid #bbb;border-radius:3px;
padding:0 4px;color:#444;background:#fff}.dim.warn{border-color:#e0a800;
background:#fff8e1}.retried{color:#8d6e00}.message{color:#333}
table.dimensions td{padding:1px 10px 1px 0;vertical-align:top}
pre{background:#f6f6f6;border:1px solid #ddd;padding:6px;font-size:12px;max-width:70em;
overflow-x:auto;white-space:pre-wrap}details summary{cursor:pointer;font-size:12px;color:#555}
.failure{border-left:4px solid #c62828;padding:2px 10px;margin:10px 0}
.warning{border-left:4px solid #e0a800;padding:2px 10px;margin:10px 0}
code{background:#f0f0f0;padding:0 3px}
.since{font-size:12px;font-weight:600}.since.NEW{color:#c62828}.since.FAILING{color:#6d4c41}
.since.FIXED{color:#2e7d32}pre.commands{margin:2px 0;max-width:40em}
"""


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
    selects its kernel, controller, boot path and template. A controller goes in only when it is one
    (``--controller`` takes no ``ahci+nvme``), a template only for our own initramfs.
    """
    argv = ["pytest", record.nodeid]
    single = record.controller if SEPARATOR not in record.controller else ""
    for option, value in (
        ("--kernel", record.kernel),
        ("--controller", single),
        ("--boot-path", record.boot_path if record.boot_path != DEFAULT_BOOT_PATH else ""),
        ("--template", record.template if record.initramfs == OURS else ""),
    ):
        if value:
            argv += [option, value]
    return shlex.join(argv)


def render(
    results: Results,
    logs: Mapping[str, str],
    streaks: Mapping[str, history.Streak] | None = None,
    columns: str | None = None,
) -> str:
    """The page; ``logs`` maps a test id to its console log, relative to the page.

    ``streaks`` (test id -> :class:`harness.report.history.Streak`, from
    :func:`harness.report.history.compare`) adds since when each failure fails, and what is
    new or fixed tonight. ``columns`` names the dimension the matrix's columns follow
    (default: the one the run varies most).

    Raises:
        ConfigError: ``columns`` is not a dimension the columns can follow.
    """
    since = streaks or {}
    records = [r for r in results.records if r.kernel]
    others = [r for r in results.records if not r.kernel]
    column = view.column_dimension(records, columns)
    page = _Page(logs, since, view.varying(records), column)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>bootharness report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>bootharness report</h1>",
        _summary(results),
        _changes(since) if streaks is not None else "",
        _overview(records),
        f"<h2>Matrix: kernels × {_e(TITLES[column])}</h2>",
        page.matrix(records) if records else "<p>No test of the matrix ran.</p>",
        page.failures(results.records),
        page.warnings(results.records),
        "<h2>Boot time per kernel and boot path, by phase</h2>",
        _chart(records),
    ]
    if others:
        parts.append("<h2>Other tests</h2>")
        parts.append(page.other_tests(others))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _summary(results: Results) -> str:
    badges = " ".join(_badge(o, f"{n} {o}") for o, n in view.outcome_counts(results.records))
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


def _overview(records: Sequence[TestRecord]) -> str:
    """What the run covered: every dimension with its values and how many tests had each."""
    rows = ['<h2>Dimensions</h2><table class="dimensions" id="dimensions">']
    for dimension in ("kernel", *COLUMN_DIMENSIONS):
        chips = " ".join(
            f'<span class="dim" data-value="{_e(value)}">'
            f"{_e(view.shown(dimension, value))} ×{count}</span>"
            for value, count in view.dimension_values(records, dimension)
        )
        rows.append(
            f'<tr data-dimension="{dimension}"><td>{_e(TITLES[dimension])}</td>'
            f"<td>{chips or '–'}</td></tr>"
        )
    sources = _sources(records)
    if sources:
        rows.append(f'<tr data-dimension="sources"><td>built from</td><td>{sources}</td></tr>')
    warned = [r for r in records if r.kernel_warnings]
    total = sum(len(r.kernel_warnings) for r in warned)
    text = f"{total} in {len(warned)} tests (listed below)" if warned else "none"
    rows.append(
        f'<tr data-dimension="kernel_warnings"><td>kernel warnings</td><td>{text}</td></tr>'
    )
    rows.append("</table>")
    return "\n".join(rows)


def _sources(records: Sequence[TestRecord]) -> str:
    """Source kernels' commits and configs, foreign images' digests: what a rebuild needs."""
    seen: dict[str, None] = {}
    for r in records:
        if r.kernel_commit or r.kernel_config:
            commit, config = r.kernel_commit or "?", r.kernel_config or "?"
            seen[f"{r.kernel}: commit {commit}, config {config}"] = None
        if r.initramfs_digest:
            image = r.dimensions().initramfs_label
            seen[f"{r.kernel}: {image} image {r.initramfs_digest}"] = None
    return " ".join(f'<span class="dim">{_e(text)}</span>' for text in seen)


class _Page:
    """The parts of the page that show tests, with what they share: the logs, the history,
    the dimensions the run varies and the one the columns follow."""

    def __init__(
        self,
        logs: Mapping[str, str],
        since: Mapping[str, history.Streak],
        varying: Sequence[str],
        column: str,
    ) -> None:
        self.logs = logs
        self.since = since
        self.varying = varying
        self.column = column

    def matrix(self, records: Sequence[TestRecord]) -> str:
        kernels = list(dict.fromkeys(r.kernel for r in records))
        values = list(dict.fromkeys(view.column_value(r, self.column) for r in records))
        rows = [
            f'<table class="matrix" id="matrix" data-columns="{_e(self.column)}"><thead><tr>'
            '<th class="kernel">kernel</th>'
        ]
        rows += [f'<th data-column="{_e(v)}">{_e(view.shown(self.column, v))}</th>' for v in values]
        rows.append("</tr></thead><tbody>")
        for kernel in kernels:
            mine = [r for r in records if r.kernel == kernel]
            rows.append(
                f'<tr data-kernel="{_e(kernel)}"><th>{_e(kernel)}{_kernel_lines(mine)}</th>'
            )
            for v in values:
                cell = [r for r in mine if view.column_value(r, self.column) == v]
                rows.append(self.cell(kernel, v, cell))
            rows.append("</tr>")
        rows.append("</tbody></table>")
        return "\n".join(rows)

    def cell(self, kernel: str, column: str, cell: Sequence[TestRecord]) -> str:
        attrs = f'data-kernel="{_e(kernel)}" data-column="{_e(column)}"'
        if not cell:
            return f'<td class="cell empty" {attrs}>–</td>'
        ordered = view.cell_order(cell)
        outcome = view.worst(r.outcome for r in cell)
        failing = [r for r in ordered if r.failed]
        rest = [r for r in ordered if not r.failed]
        body = [self.entry(r) for r in failing]
        if len(ordered) > COLLAPSE_AT and rest:
            what = ", ".join(f"{n} {o}" for o, n in view.outcome_counts(rest))
            body.append(
                f'<details class="group"><summary>{_e(what)}</summary>'
                + "".join(self.entry(r) for r in rest)
                + "</details>"
            )
        else:
            body += [self.entry(r) for r in rest]
        return (
            f'<td class="cell {cell_class(outcome)}" {attrs} data-outcome="{_e(outcome)}">'
            + "".join(body)
            + "</td>"
        )

    def entry(self, record: TestRecord) -> str:
        named = view.label(record, self.varying, self.column)
        link = self.logs.get(record.nodeid)
        badge = _badge(record.outcome, record.outcome)
        head = badge
        if link:
            head = f'<a class="log" href="{_e(link)}" title="console log">{badge}</a>'
        dims = " ".join(
            f'data-{name.replace("_", "-")}="{_e(view.value(record, name))}"'
            for name in ("controller", "boot_path", "initramfs", "layout")
        )
        parts = [
            f'<div class="entry" data-nodeid="{_e(record.nodeid)}" '
            f'data-outcome="{_e(record.outcome)}" data-label="{_e(named.text)}" {dims}>{head}',
            _label_html(named),
        ]
        if record.kernel_warnings:
            count = len(record.kernel_warnings)
            parts.append(
                f' <span class="dim warn" title="{_e(chr(10).join(record.kernel_warnings))}">'
                f"{count} kernel warning{'s' if count > 1 else ''}</span>"
            )
        boot = record.phases.get("PASS")
        title = f' title="boot to PASS: {boot:.1f} s"' if boot is not None else ""
        parts.append(f' <span class="duration"{title}>{record.duration:.1f} s</span>')
        if record.retried:
            parts.append(
                f'<div class="retried">retried after {_e(", ".join(record.retried))} '
                f"(attempt {record.attempts})</div>"
            )
        parts.append(_since(self.since.get(record.nodeid)))
        if record.failed:
            parts.append(f'<div class="message">{_e(_short(record.message))}</div>')
            parts.append(
                f'<details class="reproduce"><summary>reproduce</summary>'
                f"{_commands(record)}</details>"
            )
        parts.append("</div>")
        return "".join(parts)

    def failures(self, records: Sequence[TestRecord]) -> str:
        failed = sorted((r for r in records if r.failed), key=lambda r: view.rank(r.outcome))
        if not failed:
            return "<h2>Failures</h2><p>None.</p>"
        out = [f"<h2>Failures ({len(failed)})</h2>"]
        if any(r.bundle and not PurePath(r.bundle).is_absolute() for r in failed):
            out.append('<p class="meta">Bundle paths are relative to the folder of this page.</p>')
        for record in failed:
            link = self.logs.get(record.nodeid)
            out.append(f'<div class="failure" data-nodeid="{_e(record.nodeid)}">')
            out.append(
                f"<p>{_badge(record.outcome, record.outcome)} <code>{_e(record.nodeid)}</code>"
            )
            if link:
                out.append(f' — <a class="log" href="{_e(link)}">console log</a>')
            out.append("</p>")
            out.append(f'<p class="meta boot">{_e(boot_line(record))}</p>')
            out.append(_since(self.since.get(record.nodeid)))
            out.append(f"<p>{_e(record.message)}</p>")
            if record.excerpt:
                out.append(f'<pre class="excerpt">{_e(record.excerpt)}</pre>')
            if record.trace:
                out.append(
                    f'<p>Call trace, symbolised:</p><pre class="trace">{_e(record.trace)}</pre>'
                )
            if record.kernel_warnings:
                out.append(
                    '<p>Kernel warnings:</p><pre class="warnings">'
                    f"{_e(chr(10).join(record.kernel_warnings))}</pre>"
                )
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

    def warnings(self, records: Sequence[TestRecord]) -> str:
        """Kernel warnings of tests that did not fail (a failure shows its own above): each
        distinct warning once, with the tests that met it."""
        tests: dict[str, list[TestRecord]] = {}
        for record in records:
            if not record.failed:
                for line in dict.fromkeys(record.kernel_warnings):
                    tests.setdefault(line, []).append(record)
        if not tests:
            return ""
        out = [f"<h2>Kernel warnings ({len(tests)})</h2>"]
        for line, met in tests.items():
            names = "".join(f"<li><code>{_e(r.nodeid)}</code> {_e(r.outcome)}</li>" for r in met)
            out.append(
                f'<div class="warning"><pre class="warnings">{_e(line)}</pre>'
                f"<p>in {len(met)} test{'s' if len(met) > 1 else ''}:</p><ul>{names}</ul></div>"
            )
        return "\n".join(out)

    def other_tests(self, records: Sequence[TestRecord]) -> str:
        items = "".join(
            f"<li>{self.entry(r)}<code>{_e(r.nodeid)}</code></li>" for r in view.cell_order(records)
        )
        return f"<ul>{items}</ul>"


def _kernel_lines(records: Sequence[TestRecord]) -> str:
    """Under a kernel's name: its release, and the commit and config of a source kernel."""
    release = next((r.release for r in records if r.release), "")
    commit = next((r.kernel_commit for r in records if r.kernel_commit), "")
    config = next((r.kernel_config for r in records if r.kernel_config), "")
    lines = [release, f"commit {commit}" if commit else "", f"config {config}" if config else ""]
    return "".join(f'<div class="release">{_e(line)}</div>' for line in lines if line)


def boot_line(record: TestRecord) -> str:
    """Every dimension of a test's boot on one line, for its failure."""
    initramfs = record.dimensions().initramfs_label
    parts = [
        f"kernel {record.kernel}" + (f" ({record.release})" if record.release else ""),
        f"commit {record.kernel_commit}" if record.kernel_commit else "",
        f"config {record.kernel_config}" if record.kernel_config else "",
        f"controller {view.shown('controller', record.controller)}",
        f"boot path {record.boot_path}",
        f"initramfs {initramfs}"
        + (f" (image {record.initramfs_digest})" if record.initramfs_digest else ""),
        f"layout {view.shown('layout', record.layout)}",
    ]
    return " · ".join(p for p in parts if p)


def _label_html(named: Label) -> str:
    # <wbr> after each underscore: a long test name breaks at its word joints in a narrow cell.
    name = _e(named.name).replace("_", "_<wbr>")
    parts = [f' <span class="name">{name}</span>']
    if named.params:
        parts.append(f'<span class="params">[{_e(named.params)}]</span>')
    # Real spaces between the parts, not only margins: copied or read aloud, the label stays
    # "name[params] chip 5.6 s", never "name[params]chip5.6 s".
    parts += [
        f' <span class="dim" data-dimension="{_e(dimension)}">{_e(text)}</span>'
        for dimension, text in named.chips
    ]
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


def _chart(records: Sequence[TestRecord]) -> str:
    data = view.boot_phases(records)
    if not data:
        return "<p>No boot reached the console.</p>"
    several = len({path for _, path in data}) > 1
    label_w, bar_w, bar_h, gap = 260, 520, 20, 6
    longest = max(sum(p.values()) for p in data.values()) or 1.0
    scale = bar_w / longest
    height = len(data) * (bar_h + gap) + 40
    width = label_w + bar_w + 80
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="phase-chart" width="{width}" '
        f'height="{height}" role="img" aria-label="boot time per kernel and boot path by phase">'
    ]
    for row, ((kernel, path), phases) in enumerate(data.items()):
        y = row * (bar_h + gap)
        name = f"{kernel} · {path}" if several else kernel
        svg.append(
            f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" '
            f'font-size="12">{_e(name)}</text>'
        )
        x = float(label_w)
        for phase, seconds in phases.items():
            w = seconds * scale
            svg.append(
                f'<rect class="phase" data-kernel="{_e(kernel)}" data-boot-path="{_e(path)}" '
                f'data-phase="{phase}" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                f'fill="{PHASE_COLOURS.get(phase, "#999")}"><title>{_e(name)} {phase}: '
                f"{seconds:.2f} s</title></rect>"
            )
            x += w
        svg.append(
            f'<text x="{x + 6:.1f}" y="{y + bar_h * 0.7:.1f}" font-size="12">'
            f"{sum(phases.values()):.2f} s</text>"
        )
    legend_y = len(data) * (bar_h + gap) + 16
    x = float(label_w)
    for phase, colour in PHASE_COLOURS.items():
        svg.append(f'<rect x="{x:.0f}" y="{legend_y}" width="12" height="12" fill="{colour}"/>')
        svg.append(f'<text x="{x + 16:.0f}" y="{legend_y + 11}" font-size="12">{phase}</text>')
        x += 100
    svg.append("</svg>")
    return "\n".join(svg)


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
