"""Oracles for :func:`harness.bisect.search.bisect`: judge a kernel by a boot or by a test.

Both oracles consult the verdict cache (:mod:`harness.bisect.verdicts`) first, so a bisection run
again boots nothing, and store every verdict on the guest they observe.

* :class:`BootOracle` boots the kernel with an initramfs from a template (the same path as
  ``bootharness boot``) and takes the boot's outcome.
* :class:`PytestOracle` runs one pytest node id in a subprocess with ``--kernel NAME`` and maps
  pytest's exit code and the junit ``outcome`` properties the plugin writes to an outcome.
"""

from __future__ import annotations

import itertools
import logging
import re
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import cache
from harness.bisect.search import Observation
from harness.bisect.verdicts import VerdictCache, verdict_key
from harness.image import initramfs as initramfs_module
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, Outcome
from harness.snapshot import restore
from harness.snapshot.errors import SnapshotUnsupported, SnapshotWarning
from harness.snapshot.plan import make_plan
from harness.vm import boot
from harness.vm.deadlines import Deadlines

log = logging.getLogger(__name__)

KernelSource = Callable[[str], Kernel]

# pytest's exit codes (pytest.ExitCode) that mean the run itself is broken, not the kernel.
_PYTEST_USAGE = {2: "interrupted", 3: "internal error", 4: "usage error", 5: "no tests collected"}
_SEVERITY = list(Outcome)  # declaration order: PASS ... CONFIG_ERROR, least to most severe


def worst(outcomes: Sequence[Outcome]) -> Outcome:
    """The most severe of ``outcomes`` (PASS for none)."""
    return max(outcomes, key=_SEVERITY.index, default=Outcome.PASS)


class _Workdirs:
    """One fresh folder per judged kernel under ``root`` (a kernel judged twice gets two)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def new(self, name: str) -> Path:
        for n in itertools.count(1):
            folder = self.root / (name if n == 1 else f"{name}.{n}")
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise AssertionError("unreachable")


@dataclass
class BootOracle:
    """Judge a kernel by booting it with the initramfs ``spec`` describes.

    Calling it raises :class:`~harness.outcome.ConfigError` for a bad template or module and
    :class:`~harness.outcome.InfraError` when the kernel cannot be provisioned; the bisection
    turns those into an abort and a skip.
    """

    kernels: KernelSource
    spec: InitramfsSpec
    cache_root: Path
    workdir: Path
    accel: str = "tcg"
    deadlines: Deadlines = field(default_factory=Deadlines)
    cmdline: str = ""
    verdicts: VerdictCache | None = None
    snapshot: str | None = None  # start each boot from a snapshot made with this mechanism

    @property
    def identity(self) -> str:
        """What besides the kernel and the initramfs decides the verdict."""
        return cache.digest(["boot", self.cmdline, repr(self.deadlines)])

    def __call__(self, name: str) -> Observation:
        kernel = self.kernels(name)
        request = boot.BootRequest(
            kernel, self.spec, accel=self.accel, deadlines=self.deadlines, cmdline=self.cmdline
        )
        key = self._key(kernel)
        if self.verdicts is not None and (hit := self.verdicts.get(key)) is not None:
            return Observation(hit.outcome, hit.log_path, hit.message, cached=True)
        started = time.monotonic()
        workdir = _Workdirs(self.workdir).new(name)
        if self.snapshot is not None:
            vm = restore.prepare_vm(
                request, cache_root=self.cache_root, workdir=workdir, mechanism=self.snapshot
            )
        else:
            vm = boot.prepare_vm(request, cache_root=self.cache_root, workdir=workdir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SnapshotWarning)  # a cold boot judges as well
            result = boot.run(vm, kernel=kernel, accel=self.accel, cache_root=self.cache_root)
        if self.verdicts is not None:
            self.verdicts.put(
                key,
                result.outcome,
                kernel=kernel.name,
                message=result.message,
                log_path=result.log_path,
                seconds=time.monotonic() - started,
            )
        return Observation(result.outcome, result.log_path, result.message)

    def _key(self, kernel: Kernel) -> str:
        """The verdict's key: the kernel, the image the boot runs, and the oracle. From a
        snapshot, the image is the snapshot's key and the test's own rest of the init (no
        need to build the cold image); a cold boot keys by the image it boots."""
        if self.snapshot is not None:
            try:
                plan = make_plan(
                    kernel,
                    self.spec,
                    cache_root=self.cache_root,
                    accel=self.accel,
                    cmdline=self.cmdline,
                )
            except SnapshotUnsupported:
                pass  # boots cold: keyed like a cold boot
            else:
                image = cache.digest(["snapshot", plan.key, plan.rest])
                return verdict_key(kernel.identity, image, self.identity)
        # Build the image prepare_vm will boot (same modules, same digest) to key the cache
        # before booting; prepare_vm's own build is then a cache hit.
        spec = boot.with_harness_modules(kernel, self.spec)
        image_digest = initramfs_module.build(kernel, spec, self.cache_root).digest
        return verdict_key(kernel.identity, image_digest, self.identity)


@dataclass
class PytestOracle:
    """Judge a kernel by running one pytest node id with ``--kernel NAME`` in a subprocess.

    pytest's exit code 0 is PASS and 1 a failure; 2, 3, 4 and 5 (interrupted, internal error,
    usage error, nothing collected) are CONFIG_ERROR, which aborts. The junit ``outcome``
    properties the plugin writes are used when present (so an INFRA_ERROR is a skip); a test
    skipped for the kernel counts as untestable (INFRA_ERROR, a skip).

    The verdict is cached under the kernel, the node id, the extra arguments and the content
    of the node's test file; changes in other files the test imports are not seen (bypass the
    cache with ``--no-cache`` then).
    """

    node_id: str
    kernels: KernelSource
    kernels_file: Path
    cache_root: Path
    workdir: Path
    accel: str | None = None
    extra_args: Sequence[str] = ()
    verdicts: VerdictCache | None = None
    cwd: Path = field(default_factory=Path.cwd)
    python: str = sys.executable
    timeout: float = 3600.0

    def test_file(self) -> Path:
        """The file the node id names; raises ConfigError when it does not exist."""
        path = self.cwd / self.node_id.split("::", 1)[0]
        if not path.is_file():
            raise ConfigError(
                f"pytest node id {self.node_id!r}: no file {path}; give a node id like "
                "tests/boot/test_x.py::test_name relative to the current folder"
            )
        return path

    @property
    def identity(self) -> str:
        return cache.digest(["pytest", self.node_id, *self.extra_args, self.accel or ""])

    def __call__(self, name: str) -> Observation:
        kernel = self.kernels(name)
        key = verdict_key(kernel.identity, cache.file_digest(self.test_file()), self.identity)
        if self.verdicts is not None and (hit := self.verdicts.get(key)) is not None:
            return Observation(hit.outcome, hit.log_path, hit.message, cached=True)
        folder = _Workdirs(self.workdir).new(name)
        junit = folder / "junit.xml"
        output = folder / "pytest.log"
        argv = [
            self.python,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            self.node_id,
            "--kernel",
            name,
            "--kernels",
            str(self.kernels_file),
            "--bootharness-cache",
            str(self.cache_root),
            "--junitxml",
            str(junit),
            "--basetemp",
            str(folder / "tmp"),
            *(["--accel", self.accel] if self.accel else []),
            *self.extra_args,
        ]
        log.debug("running %s", argv)
        started = time.monotonic()
        with output.open("w") as out:
            try:
                code = subprocess.run(
                    argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, timeout=self.timeout
                ).returncode
            except subprocess.TimeoutExpired:
                return Observation(
                    Outcome.INFRA_ERROR, output, f"pytest ran past {self.timeout:.0f} s; killed"
                )
        outcome, message = pytest_outcome(code, junit)
        logs = sorted((folder / "tmp").rglob("console.log"), key=lambda p: p.stat().st_mtime)
        evidence = logs[-1] if logs else output
        if outcome is Outcome.CONFIG_ERROR:
            message += f"; see {output}"
        if self.verdicts is not None:
            self.verdicts.put(
                key,
                outcome,
                kernel=name,
                message=message,
                log_path=evidence,
                seconds=time.monotonic() - started,
            )
        return Observation(outcome, evidence, message)


def pytest_outcome(exit_code: int, junit: Path) -> tuple[Outcome, str]:
    """Map a pytest run's exit code and its junit report to one outcome and a reason."""
    if exit_code in _PYTEST_USAGE:
        return Outcome.CONFIG_ERROR, f"pytest exited {exit_code} ({_PYTEST_USAGE[exit_code]})"
    if exit_code not in (0, 1):
        return Outcome.INFRA_ERROR, f"pytest exited {exit_code} (killed?)"
    outcomes, reasons = junit_outcomes(junit)
    outcome = worst(outcomes)
    if exit_code == 1 and outcome is Outcome.PASS:
        return Outcome.TEST_FAIL, "pytest exited 1"
    return outcome, "; ".join(reasons)


def junit_outcomes(junit: Path) -> tuple[list[Outcome], list[str]]:
    """One outcome per test case of a junit report, and the reasons of those not passed.

    A test case's ``outcome`` property wins; otherwise a failure is TEST_FAIL (or the outcome
    its message starts with, as the plugin writes it), an error the outcome its message
    starts with or else CONFIG_ERROR (a broken test, not a verdict), a skip INFRA_ERROR.
    """
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return [], []
    outcomes: list[Outcome] = []
    reasons: list[str] = []
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        named = {p.get("name"): p.get("value") for p in case.iter("property")}
        problem = next(
            (child for child in case if child.tag in ("failure", "error", "skipped")), None
        )
        text = "" if problem is None else (problem.text or problem.get("message") or "").strip()
        if named.get("outcome") in Outcome.__members__:
            outcome = Outcome[str(named["outcome"])]
        elif problem is None:
            outcome = Outcome.PASS
        elif problem.tag == "skipped":
            outcome, text = Outcome.INFRA_ERROR, f"skipped for this kernel: {text}"
        else:
            fallback = Outcome.TEST_FAIL if problem.tag == "failure" else Outcome.CONFIG_ERROR
            outcome = _named_outcome(text, problem.get("message", "")) or fallback
        outcomes.append(outcome)
        if outcome is not Outcome.PASS:
            reasons.append(f"{name}: {outcome.name}: {text.splitlines()[0] if text else ''}")
    return outcomes, reasons


# The plugin's report starts with the outcome's name ("INFRA_ERROR: ..."); junit's message
# attribute wraps it as 'failed on setup with "INFRA_ERROR: ..."'.
_NAMED_RE = re.compile(r'^(?:failed on \w+ with ")?([A-Z_]+):')


def _named_outcome(*texts: str) -> Outcome | None:
    for text in texts:
        match = _NAMED_RE.match(text.strip())
        if match and match.group(1) in Outcome.__members__:
            return Outcome[match.group(1)]
    return None
