"""``bootharness report merge``: one page from the results files of many CI jobs.

Registered through :data:`harness.cli.main.build_parser`; parsing, calls and printing only
(the work is in :mod:`harness.report.merge` and :mod:`harness.report.history`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.cli import text
from harness.outcome import ConfigError
from harness.report import history, merge, view


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``report`` command and its ``merge`` subcommand."""
    report = commands.add_parser("report", help="reports of nightly runs")
    actions = report.add_subparsers(title="commands", metavar="COMMAND", required=True)
    join = actions.add_parser(
        "merge",
        parents=[common],
        help="merge per-job results JSON files into one HTML page (and one JSON)",
    )
    join.add_argument(
        "inputs", nargs="+", type=Path, metavar="JSON", help="results files (--bootharness-json)"
    )
    join.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="HTML",
        help="the page to write; console logs are copied to <name>-logs/ next to it",
    )
    join.add_argument("--json", type=Path, metavar="FILE", help="also write the merged results")
    join.add_argument(
        "--history",
        action="append",
        default=[],
        type=Path,
        metavar="FILE|DIR",
        help="earlier runs' results files, or folders of them (repeatable): since when "
        "each failure fails, what is new or fixed tonight",
    )
    join.add_argument(
        "--copy-bundles",
        action="store_true",
        help="copy the failures' reproduction bundles to <name>-bundles/ next to the page",
    )
    join.add_argument(
        "--columns",
        choices=view.COLUMN_DIMENSIONS,
        help="the dimension the page's columns follow (default: the one the run varies most)",
    )
    join.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    main: Path | None = args.output or args.json
    if main is None:
        raise ConfigError("report merge: say where to write: -o report.html and/or --json FILE")
    stem = main.name.split(".")[0]
    runs = history.load_runs(args.history)
    merged = merge.merge(
        args.inputs,
        main.parent / f"{stem}-logs",
        bundle_dir=main.parent / f"{stem}-bundles" if args.copy_bundles else None,
    )
    merge.write(merged, args.output, args.json, runs, columns=args.columns)
    records = merged.results.records
    summary = ", ".join(f"{n} {outcome}" for outcome, n in view.outcome_counts(records))
    print(
        f"merged {len(records)} tests from {len(args.inputs)} files "
        f"({summary or 'no tests'}), {len(runs)} earlier runs"
    )
    if records:
        print("\n".join(text.table(view.kernel_summary(records))))
    for what in merged.missing:
        print(f"not found: {what}")
    for path in (args.output, args.json):
        if path is not None:
            print(f"bootharness report: {path}")
    return 0
