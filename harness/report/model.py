"""The results model: one plain record per test of the matrix, and a run's results file.

Pure data (no pytest): the CLI's report commands read and merge these files without loading
the test runner. :mod:`harness.plugin.collector` builds the records where tests run and writes
the files where they are collected.

Under pytest-xdist a test runs in a worker process, but files (the JSON results, the HTML
report, the copied console logs) must be written once, by the controller. So the worker turns
what it knows (parameters, the VMs it booted, the outcome) into a plain :class:`TestRecord`
dict and attaches it to the test's teardown report as the ``bootharness`` attribute; xdist
serializes reports with their extra attributes, and :class:`ResultsCollector`, registered only
in the controller (or the single process), receives every record through
``pytest_runtest_logreport`` and writes the files when the session ends.

The record is built at teardown because only then have the test's VMs stopped: the console
log is complete and a failure's reproduction bundle can be written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.outcome import Outcome
from harness.vm.dimensions import DEFAULT_BOOT_PATH, NAMES, OURS, SEPARATOR, Dimensions

log = logging.getLogger(__name__)

FORMAT = "bootharness-results-1"
# Outcomes beyond the taxonomy (docs/architecture.md), for tests that never judged a guest.
SKIPPED = "SKIPPED"
ERROR = "ERROR"  # a fixture or harness bug (not a HarnessError): never retried
# Points of progress whose time goes into junit properties and the phase chart.
PHASE_MARKS = ("first-byte", "firmware-done", "kernel-banner", "INIT-START", "PASS", "shutdown")
# Phases of the chart: (name, from mark, to mark). On every boot path the firmware phase ends
# when the firmware hands over: OVMF says so ("firmware-done"); SeaBIOS prints nothing, so
# there it ends at the first console byte, the loader's or (QEMU loading the kernel) the
# kernel's. The loader phase (GRUB, the EFI shell) runs to the kernel's banner and exists
# only on paths with a loader; there the kernel phase starts at the banner.
PHASES = (
    ("firmware", "qemu-started", "firmware-done"),
    ("loader", "firmware-done", "kernel-banner"),
    ("kernel", "kernel-start", "INIT-START"),
    ("init", "INIT-START", "PASS"),
    ("shutdown", "PASS", "shutdown"),
)
_LOADER_MARKS = ("firmware-done", "loader-entry")
EXCERPT_LINES = 25


@dataclass
class TestRecord:
    """Everything the reports say about one test; plain data, JSON-ready."""

    __test__ = False  # not a pytest test class, despite the name

    nodeid: str
    test: str  # the test function's name, without parameters
    # The dimensions of the boot (harness.vm.dimensions.Dimensions, same names and defaults),
    # read from the VM that booted; a test that booted nothing keeps its parameters'.
    kernel: str = ""
    release: str = ""
    kernel_commit: str = ""
    kernel_config: str = ""
    controller: str = ""
    boot_path: str = DEFAULT_BOOT_PATH
    initramfs: str = OURS
    template: str = ""
    initramfs_digest: str = ""
    generator: str = ""
    layout: str = ""
    kernel_warnings: list[str] = field(default_factory=list)
    params: str = ""  # the parameter id of the test (pytest's callspec id), "" for none
    boot_entry: str = ""  # the boot loader's menu entry that booted (not a dimension)
    outcome: str = Outcome.PASS.name
    message: str = ""
    excerpt: str = ""
    duration: float = 0.0
    started: float = 0.0  # seconds since the epoch
    phases: dict[str, float] = field(default_factory=dict)  # mark -> s since QEMU start
    console_logs: list[str] = field(default_factory=list)  # one per VM, in boot order
    bundle: str = ""
    trace: str = ""  # a kernel fault's call trace, symbolised, when the kernel allows it
    qemu_version: str = ""
    accelerator: str = ""
    boot_mechanism: str = ""  # cold, or how a snapshot restored the VM
    load_factor: float = 1.0
    attempts: int = 1
    retried: list[str] = field(default_factory=list)  # outcomes of the earlier attempts

    @property
    def failed(self) -> bool:
        return self.outcome not in (Outcome.PASS.name, SKIPPED)

    def dimensions(self) -> Dimensions:
        """The record's dimensions as the VM reported them."""
        values = {name: getattr(self, name) for name in NAMES}
        values["kernel_warnings"] = tuple(self.kernel_warnings)
        return Dimensions(**values)

    def set_dimensions(self, dimensions: Dimensions) -> None:
        """Take every dimension from ``dimensions`` (those of the VM that booted)."""
        for name, value in dimensions.as_dict().items():
            setattr(self, name, value)

    @property
    def param_id(self) -> str:
        """The parameter id (``debian-6.1-amd64-ahci``), also for records that predate
        ``params``: then read from the node id's brackets."""
        if self.params:
            return self.params
        name = self.nodeid.rsplit("::", 1)[-1]
        start = name.find("[")
        return name[start + 1 : -1] if start >= 0 and name.endswith("]") else ""

    def own_params(self) -> str:
        """The parameter id without the kernel's name, which reports show as the row."""
        params = self.param_id
        if self.kernel and (params == self.kernel or params.startswith(f"{self.kernel}-")):
            params = params[len(self.kernel) :].removeprefix("-")
        return params

    def history_key(self) -> tuple[str, ...]:
        """Who this test is, whatever its node id says: the test function, the kernel, every
        dimension the matrix varies, and what is left of the parameter id once those are
        taken out. Two nights match on it when a new dimension (a boot path, a generator)
        made its way into the ids. Values that change by themselves from night to night
        (release, commit, digests, warnings) are left out."""
        function = self.nodeid.split("[", 1)[0]
        values = [self.controller, self.boot_path, self.initramfs, self.template]
        values += [self.generator, self.layout]
        rest = self.own_params()
        for value in sorted({v for v in values if v}, key=len, reverse=True):
            for part in (value, *value.split(SEPARATOR)):
                rest = re.sub(rf"(?:(?<=-)|^){re.escape(part)}(?=-|$)", "", rest)
        rest = "-".join(word for word in rest.split("-") if word)
        return (function, self.kernel, *values, rest)

    @property
    def console_log(self) -> str:
        """The log of the last VM the test booted (the one the outcome is about)."""
        return self.console_logs[-1] if self.console_logs else ""

    def phase_split(self) -> dict[str, float]:
        """Seconds spent in each phase of :data:`PHASES` that both ends of were reached."""
        return phase_split(self.phases)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TestRecord:
        """Rebuild a record; unknown keys (from a newer writer) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def phase_split(phases: Mapping[str, float]) -> dict[str, float]:
    """Durations of the phases whose start and end marks are both present."""
    marks = {"qemu-started": 0.0, **phases}
    loader = any(name in phases for name in _LOADER_MARKS)
    if "first-byte" in marks:
        marks.setdefault("firmware-done", marks["first-byte"])
    kernel_start = "kernel-banner" if loader else "first-byte"
    if kernel_start in marks:
        marks["kernel-start"] = marks[kernel_start]
    split: dict[str, float] = {}
    for name, start, end in PHASES:
        if name == "loader" and not loader:
            continue
        if start in marks and end in marks:
            split[name] = max(0.0, round(marks[end] - marks[start], 3))
    return split


def param_name(value: object) -> str:
    """How a parameter (KernelEntry, Controller, template name) is named in reports."""
    name = getattr(value, "name", value)
    return "" if name is None else str(name)


def first_marks(marks: Iterable[Any]) -> dict[str, float]:
    """Mark name -> time of its first occurrence (later repeats are a second boot's)."""
    seen: dict[str, float] = {}
    for mark in marks:
        seen.setdefault(mark.name, round(float(mark.at), 3))
    return seen


def template_id(template: str) -> str:
    """``init.sh.j2`` -> ``init.sh``: the form used in test ids and report columns."""
    return template.removesuffix(".j2")


def junit_properties(record: TestRecord) -> list[tuple[str, str]]:
    """The record's junit ``<property>`` pairs (callers skip names already written)."""
    pairs = [
        ("kernel", record.kernel),
        ("kernel_release", record.release),
        ("outcome", record.outcome),
        ("qemu_version", record.qemu_version),
        ("accelerator", record.accelerator),
        ("boot_mechanism", record.boot_mechanism),
        ("kernel_commit", record.kernel_commit),
        ("kernel_config", record.kernel_config),
        ("controller", record.controller),
        ("boot_path", record.boot_path),
        ("initramfs", record.initramfs),
        ("template", record.template),
        ("initramfs_digest", record.initramfs_digest),
        ("generator", record.generator),
        ("layout", record.layout),
        ("kernel_warnings", "\n".join(record.kernel_warnings)),
        ("boot_entry", record.boot_entry),
        ("load_factor", f"{record.load_factor:g}"),
        ("attempts", str(record.attempts)),
    ]
    if record.retried:
        pairs.append(("retried", ",".join(record.retried)))
    boot_time = record.phases.get("PASS", record.phases.get("INIT-START"))
    if boot_time is not None:
        pairs.append(("boot_time", f"{boot_time:.3f}"))
    for name in PHASE_MARKS:
        if name in record.phases:
            pairs.append((f"time_{name}", f"{record.phases[name]:.3f}"))
    for name, seconds in record.phase_split().items():
        pairs.append((f"phase_{name}", f"{seconds:.3f}"))
    if record.bundle:
        pairs.append(("bundle", record.bundle))
    return [(name, value) for name, value in pairs if value]


@dataclass
class Results:
    """A whole run: its records and when and where it ran."""

    records: list[TestRecord]
    created: str = ""
    host: str = ""
    duration: float = 0.0

    def summary(self) -> dict[str, int]:
        """Count of tests per outcome."""
        counts: dict[str, int] = {}
        for record in self.records:
            counts[record.outcome] = counts.get(record.outcome, 0) + 1
        return counts

    def to_json(self, logs: Mapping[str, str] | None = None) -> str:
        """The results file; ``logs`` adds each test's published console log (nodeid -> path)."""
        tests = [r.to_dict() for r in self.records]
        for test in tests:
            test["log"] = (logs or {}).get(test["nodeid"], "")
        data = {
            "format": FORMAT,
            "created": self.created,
            "host": self.host,
            "duration": round(self.duration, 3),
            "summary": self.summary(),
            "tests": tests,
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Results:
        """Read a results file written by :meth:`to_json`.

        Raises:
            ValueError: not a bootharness results file (the message names it).
        """
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a bootharness results file ({FORMAT})")
        return cls(
            records=[TestRecord.from_dict(t) for t in data["tests"]],
            created=str(data.get("created", "")),
            host=str(data.get("host", "")),
            duration=float(data.get("duration", 0.0)),
        )


def safe_name(nodeid: str) -> str:
    """A file name for a test id: readable, unique enough, no path separators."""
    name = nodeid.split("::", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_")[:120] or "test"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a reader, or the next night's report
    after a crash or a full disk, never sees half a page. A temporary sibling (unique to this
    process) is written, flushed to disk, then renamed over ``path``; on failure it goes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def relative_paths(paths: Mapping[str, Path], base: Path) -> dict[str, str]:
    """Node id -> ``path`` relative to ``base``, as a page or results file links it."""
    return {nodeid: relative_path(path, base) for nodeid, path in paths.items()}


def relative_path(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, both resolved first (links and ``..`` folded)."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
