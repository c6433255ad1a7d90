"""One page for a fanned-out nightly: merge the results files of many CI jobs.

With CI fan-out every job (one kernel) writes its own results JSON, console logs and
reproduction bundles. :func:`merge` reads those files, copies each test's console log into
one folder next to the merged page (so the page's links are relative and the folder can be
published as is) and finds each failure's bundle in the job's downloaded folder, whatever
absolute path the job's runner had. :func:`write` then renders the one page with
:func:`harness.report.html.render` and writes the merged results JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.outcome import ConfigError
from harness.report import history, view
from harness.report import html as html_report
from harness.report.model import (
    Results,
    TestRecord,
    relative_path,
    relative_paths,
    safe_name,
    write_atomic,
)

log = logging.getLogger(__name__)

BUNDLE_JSON = "bundle.json"


@dataclass
class Merged:
    """The merged run, where its files now are (absolute), and what could not be found."""

    results: Results
    logs: dict[str, Path] = field(default_factory=dict)  # node id -> copied console log
    bundles: dict[str, Path] = field(default_factory=dict)  # node id -> bundle folder
    missing: list[str] = field(default_factory=list)  # what was not found, for the user


def merge(inputs: Sequence[Path], log_dir: Path, *, bundle_dir: Path | None = None) -> Merged:
    """Merge results files into one run; copy console logs into ``log_dir``.

    Each failure's bundle is looked up at its recorded path, then under the input file's
    folder (a CI artifact keeps the job's folder layout below the report folder); with
    ``bundle_dir`` the bundles found are copied there. A test found in several inputs keeps
    its worst outcome: a merge never hides a failure.

    Raises:
        ConfigError: no inputs, or an input is not a readable bootharness results file.
    """
    if not inputs:
        raise ConfigError("report merge: give at least one results JSON file")
    records: dict[str, TestRecord] = {}
    origin: dict[str, Path] = {}
    sources: dict[str, Path] = {}
    runs: list[Results] = []
    for path in inputs:
        run, logs = _read(path)
        runs.append(run)
        for record in run.records:
            earlier = records.get(record.nodeid)
            if earlier is not None:
                log.warning(
                    "%s is in both %s and %s; keeping the worse outcome",
                    record.nodeid,
                    origin[record.nodeid],
                    path,
                )
                if view.worst([earlier.outcome, record.outcome]) == earlier.outcome:
                    continue
            records[record.nodeid] = record
            origin[record.nodeid] = path
            if record.nodeid in logs:
                sources[record.nodeid] = logs[record.nodeid]
            else:
                sources.pop(record.nodeid, None)
    merged = Merged(
        Results(
            records=list(records.values()),
            created=max((r.created for r in runs), default=""),
            host=", ".join(dict.fromkeys(r.host for r in runs if r.host)),
            duration=max((r.duration for r in runs), default=0.0),
        )
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    names: set[str] = set()
    for record in merged.results.records:
        source = sources.get(record.nodeid)
        if source is not None:
            target = log_dir / _unique(f"{safe_name(record.nodeid)}.log", names)
            if _copy_file(source, target):
                merged.logs[record.nodeid] = target
            else:
                merged.missing.append(f"console log of {record.nodeid}: {source}")
        if record.bundle:
            found = find_bundle(record.bundle, origin[record.nodeid].parent)
            if found is None:
                merged.missing.append(f"bundle of {record.nodeid}: {record.bundle}")
                continue
            if bundle_dir is not None:
                copy = bundle_dir / found.name
                if copy.resolve() != found.resolve():
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(found, copy)
                found = copy
            merged.bundles[record.nodeid] = found
    for what in merged.missing:
        log.warning("report merge: not found: %s", what)
    return merged


def find_bundle(recorded: str, folder: Path) -> Path | None:
    """The bundle folder recorded as ``recorded``, as it is on this machine.

    Tried in turn: the path itself (relative ones from ``folder``), then ever shorter tails
    of it under ``folder``: a job that wrote ``/runner/work/reports/bundles/x`` and was
    downloaded to ``nightly/kernel-a/`` has it at ``nightly/kernel-a/bundles/x``.
    """
    path = Path(recorded)
    candidates = [path if path.is_absolute() else folder / path]
    parts = path.parts[1:] if path.is_absolute() else path.parts
    candidates += [folder.joinpath(*parts[i:]) for i in range(len(parts))]
    return next((c for c in candidates if (c / BUNDLE_JSON).is_file()), None)


def write(
    merged: Merged,
    html_path: Path | None,
    json_path: Path | None,
    runs: Sequence[history.Run] = (),
    columns: str | None = None,
) -> None:
    """Write the page (links and bundle paths relative to it) and/or the merged JSON.

    ``runs`` are earlier runs: the page then says since when each failure fails.
    ``columns`` names the dimension the page's columns follow (default: the most varied).

    Raises:
        ConfigError: ``columns`` is not a dimension the columns can follow.
    """
    streaks = history.compare(merged.results, runs) if runs else None
    if html_path is not None:
        page = html_report.render(
            _located(merged, html_path.parent),
            relative_paths(merged.logs, html_path.parent),
            streaks=streaks,
            columns=columns,
        )
        write_atomic(html_path, page)
    if json_path is not None:
        located = _located(merged, json_path.parent)
        write_atomic(json_path, located.to_json(relative_paths(merged.logs, json_path.parent)))


def _read(path: Path) -> tuple[Results, dict[str, Path]]:
    """A results file and its tests' console logs (node id -> file, where it is now)."""
    try:
        run = Results.load(path)
        tests = json.loads(path.read_text())["tests"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path}: not a readable bootharness results file ({error}); "
            "give the files written by --bootharness-json"
        ) from error
    logs: dict[str, Path] = {}
    for record, test in zip(run.records, tests, strict=True):
        published = str(test.get("log") or "")
        if published:
            logs[record.nodeid] = path.parent / published
        elif record.console_log and Path(record.console_log).is_file():
            logs[record.nodeid] = Path(record.console_log)  # merged on the machine that ran
    return run, logs


def _copy_file(source: Path, target: Path) -> bool:
    try:
        if target.exists() and source.resolve() == target.resolve():
            return True
        shutil.copyfile(source, target)
    except OSError as error:
        log.debug("cannot copy %s: %s", source, error)
        return False
    return True


def _unique(name: str, taken: set[str]) -> str:
    stem, dot, suffix = name.rpartition(".")
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}{dot}{suffix}"
    taken.add(candidate)
    return candidate


def _located(merged: Merged, base: Path) -> Results:
    """The merged run with bundle paths relative to ``base`` where the bundle was found."""
    records = [
        dataclasses.replace(r, bundle=relative_path(merged.bundles[r.nodeid], base))
        if r.nodeid in merged.bundles
        else r
        for r in merged.results.records
    ]
    return dataclasses.replace(merged.results, records=records)
