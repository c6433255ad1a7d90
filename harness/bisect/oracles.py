"""Oracles for :func:`harness.bisect.search.bisect`: judge a kernel by a boot or by a test.

Both oracles consult the verdict cache (:mod:`harness.bisect.verdicts`) first, so a bisection run
again boots nothing, and store every verdict on the guest they observe.

* :class:`BootOracle` boots the kernel with an initramfs from a template (the same path as
  ``bootharness boot``) and takes the boot's outcome.
* :class:`PytestOracle` runs one pytest node id in a subprocess with ``--kernel NAME`` and maps
  pytest's exit code and the junit ``outcome`` properties the plugin writes to an outcome.
* :class:`InitrdOracle` judges an initrd *file* instead: one kernel boots each candidate image
  as it is (markers or console patterns, as ``bootharness boot --initrd``); the verdict is
  keyed by the image's content digest. :class:`PytestOracle` with ``initrd_kernel`` runs the
  node id with ``--initrd FILE`` (the ``initrd`` fixture) on that kernel.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness import cache, lifeline
from harness.bisect.search import Observation
from harness.bisect.verdicts import VerdictCache, verdict_key
from harness.image import foreign
from harness.image import initramfs as initramfs_module
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, Outcome
from harness.snapshot import restore
from harness.snapshot.errors import SnapshotWarning
from harness.snapshot.plan import Plan
from harness.storage.bootpaths import BootSpec
from harness.vm import boot
from harness.vm.deadlines import Deadlines
from harness.vm.kernel_warnings import WarningPolicy
from harness.vm.sandbox import DEFAULT as DEFAULT_SANDBOX
from harness.vm.sandbox import Sandbox

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
    boot: BootSpec = field(default_factory=BootSpec)  # the boot path (default: pvh)
    kernel_warnings: WarningPolicy = field(default_factory=WarningPolicy)
    sandbox: Sandbox = DEFAULT_SANDBOX
    snapshot: str | None = None  # start each boot from a snapshot made with this mechanism

    @property
    def identity(self) -> str:
        """What besides the kernel and the initramfs decides the verdict."""
        parts = ["boot", self.cmdline, repr(self.deadlines)]
        if self.boot != BootSpec():  # the default keeps the keys it had
            parts.append(repr(self.boot))
        if self.kernel_warnings != WarningPolicy():  # likewise
            parts.append(repr(self.kernel_warnings))
        return cache.digest(parts)

    def __call__(self, name: str) -> Observation:
        kernel = self.kernels(name)
        request = boot.BootRequest(
            kernel,
            self.spec,
            accel=self.accel,
            deadlines=self.deadlines,
            cmdline=self.cmdline,
            boot=self.boot,
            kernel_warnings=self.kernel_warnings,
            machine_options={"sandbox": self.sandbox},
        )
        folder = _Workdirs(self.workdir).new(name)
        if self.snapshot is not None:
            vm = restore.prepare_vm(
                request, cache_root=self.cache_root, workdir=folder, mechanism=self.snapshot
            )
            plan = vm.start_plan.plan if isinstance(vm.start_plan, restore.SnapshotStart) else None
            key = self._key(kernel, plan)
        else:
            vm, key = None, self._key(kernel, None)
        if self.verdicts is not None and (hit := self.verdicts.get(key)) is not None:
            if vm is not None:
                vm.stop()
            shutil.rmtree(folder, ignore_errors=True)
            return Observation(hit.outcome, hit.log_path, hit.message, cached=True)
        started = time.monotonic()
        return boot_and_judge(request, self.cache_root, folder, self.verdicts, key, started, vm=vm)

    def _key(self, kernel: Kernel, plan: Plan | None) -> str:
        """The verdict's key: the kernel, the image the boot runs, and the oracle. From a
        snapshot, the image is the snapshot's key and the test's own rest of the init (no
        need to build the cold image); a cold boot keys by the image it boots."""
        if plan is not None:
            image = cache.digest(["snapshot", plan.key, plan.rest])
            return verdict_key(kernel.identity, image, self.identity)
        # Build the image prepare_vm will boot (same modules, same digest) to key the cache
        # before booting; prepare_vm's own build is then a cache hit.
        spec = boot.with_harness_modules(kernel, self.spec)
        image_digest = initramfs_module.build(kernel, spec, self.cache_root).digest
        return verdict_key(kernel.identity, image_digest, self.identity)


def boot_and_judge(
    request: boot.BootRequest,
    cache_root: Path,
    workdir: Path,
    verdicts: VerdictCache | None,
    key: str,
    started: float,
    *,
    vm: boot.Vm | None = None,
) -> Observation:
    """Boot ``request`` in ``workdir`` (or the VM prepared for it: one that starts from a
    snapshot), keep the verdict under ``key`` (when there is a cache) and say what the boot
    showed: what every boot oracle does once it knows its key."""
    if vm is None:
        vm = boot.prepare_vm(request, cache_root=cache_root, workdir=workdir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SnapshotWarning)  # a cold boot judges as well
        result = boot.run(vm, kernel=request.kernel, accel=request.accel, cache_root=cache_root)
    if verdicts is not None:
        verdicts.put(
            key,
            result.outcome,
            kernel=request.kernel.name,
            message=result.message,
            log_path=result.log_path,
            seconds=time.monotonic() - started,
        )
    return Observation(result.outcome, result.log_path, result.message)


@dataclass
class InitrdOracle:
    """Judge an initrd file by booting it with the kernel and disks of ``request``.

    ``request`` is everything but the image (its ``initrd`` is replaced by each candidate);
    the candidate names are the image paths. The verdict is cached under the kernel, the
    image's content digest and what else decides it (command line, deadlines, patterns,
    disks' contents), so renaming an image keeps its verdict and editing it does not.
    """

    request: boot.BootRequest
    cache_root: Path
    workdir: Path
    verdicts: VerdictCache | None = None

    @property
    def identity(self) -> str:
        """What besides the kernel and the image decides the verdict."""
        request = self.request
        verdict = request.verdict
        parts = [
            "initrd-boot",
            request.cmdline,
            repr(request.deadlines),
            repr((verdict.expect, verdict.fail, verdict.root_failures, request.markers)),
            repr(sorted(request.overlay)),
        ]
        if request.storage is not None:
            for image, attachment in zip(
                request.storage.images, request.storage.plan.attachments, strict=True
            ):
                parts += [attachment.controller.name, cache.file_digest(image.path)]
        return cache.digest(parts)

    def __call__(self, candidate: str) -> Observation:
        image = Path(candidate)
        if not image.is_file():
            raise ConfigError(f"bisect: initrd {image} does not exist")
        kernel = self.request.kernel
        key = verdict_key(kernel.identity, foreign.image_digest(image), self.identity)
        if self.verdicts is not None and (hit := self.verdicts.get(key)) is not None:
            return Observation(hit.outcome, hit.log_path, hit.message, cached=True)
        started = time.monotonic()
        request = replace(self.request, initrd=image)
        folder = _Workdirs(self.workdir).new(image.name)
        return boot_and_judge(request, self.cache_root, folder, self.verdicts, key, started)


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
    # Bisect initrd files instead of kernels: the candidates are image paths, each run gets
    # ``--kernel initrd_kernel --initrd CANDIDATE``, and the image's digest keys the verdict.
    initrd_kernel: str | None = None

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
        kernel_name, selection = name, ["--kernel", name]
        inputs = cache.file_digest(self.test_file())
        if self.initrd_kernel is not None:
            image = Path(name)
            if not image.is_file():
                raise ConfigError(f"bisect: initrd {image} does not exist")
            kernel_name = self.initrd_kernel
            selection = ["--kernel", kernel_name, "--initrd", str(image.resolve())]
            inputs = cache.digest([inputs, foreign.image_digest(image)])
        kernel = self.kernels(kernel_name)
        key = verdict_key(kernel.identity, inputs, self.identity)
        if self.verdicts is not None and (hit := self.verdicts.get(key)) is not None:
            return Observation(hit.outcome, hit.log_path, hit.message, cached=True)
        folder = _Workdirs(self.workdir).new(Path(name).name)
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
            *selection,
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
                # Guarded: a killed bisect takes the pytest run (and through it its VMs) along.
                code = lifeline.run_guarded(
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
                kernel=kernel_name,
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
