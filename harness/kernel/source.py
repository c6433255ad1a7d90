"""Kernels built from source: configure, build out of tree, install, and cache by inputs.

A source kernel (:class:`~harness.kernel.catalogue.SourceTree`) is a kernel tree (a folder,
git or not) or Debian's kernel source package, unpacked once into the cache. A build:

1. configures in its own output folder (``make O=``): the base config (``minimal``: the
   tree's ``allnoconfig`` with the tiny fragments and the shipped minimal fragment, so only
   what the harness needs is built; a make target such as ``defconfig``; a file; or another
   kernel's config), then the fragments, then ``olddefconfig``;
2. checks that every option a fragment set survived (Kconfig drops what it cannot set): a
   lost option is a CONFIG_ERROR naming it;
3. runs ``make bzImage modules`` (through ccache when it is installed) with the log kept and
   a progress line on a terminal, then ``modules_install`` into the cache.

The result is cached under a key made of the tree's state (:mod:`harness.kernel.treestate`),
the config inputs and the compiler's version: the same inputs never build twice. The output
folder is kept per tree and config (not per state), so after a one-line change ``make``
rebuilds only what depends on it. A build that fails with a compiler error is remembered
under the same key with its first error (:class:`BuildError`), so ``git bisect run`` skips a
commit that does not compile without compiling it again.

Builds are serialised by one lock (``$BOOTHARNESS_BUILD_LOCK`` or ``<cache>/kernels/source/
build.lock``): two kernel builds at once on a small machine only slow each other down, and
``make`` runs at a lower priority so booting VMs keep to their deadlines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from harness import cache, tools
from harness.kernel import kconfig, treestate
from harness.kernel.catalogue import MINIMAL_CONFIG, SHIPPED_FRAGMENTS, SourceTree
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)

LOCK_ENV = "BOOTHARNESS_BUILD_LOCK"
JOBS_ENV = "BOOTHARNESS_BUILD_JOBS"
MINIMAL_FRAGMENT = SHIPPED_FRAGMENTS / "minimal.config"
DEBUG_FRAGMENT = SHIPPED_FRAGMENTS / "debug.config"
# The tiny fragments `make tinyconfig` applies, read from the tree itself (paths relative to it).
_TINY_FRAGMENTS = (
    "kernel/configs/tiny-base.config",
    "kernel/configs/tiny.config",
    "arch/x86/configs/tiny.config",
)
_METADATA = "kernel.json"
_FORMAT = 1
# Fixed build identity: a rebuild of the same inputs gives the same banner, and ccache hits.
_BUILD_ENV = {
    "KBUILD_BUILD_USER": "bootharness",
    "KBUILD_BUILD_HOST": "bootharness",
    "KBUILD_BUILD_TIMESTAMP": "2000-01-01 00:00:00 UTC",
}
# The first line of a build log that says why it failed, best first.
_ERROR_PATTERNS = (
    re.compile(r"^\S+:\d+(?::\d+)?: (?:fatal )?error: .*$", re.M),  # the compiler
    re.compile(r"^.*\bundefined reference to .*$", re.M),  # the linker
    re.compile(r"^(?:ERROR:?|\*\*\*) .*$", re.M),  # kbuild and modpost
    re.compile(r"^.*\berror: .*$", re.M),
    re.compile(r"^make(?:\[\d+\])?: \*\*\* .*$", re.M),
)
_STEP_RE = re.compile(r"^  ([A-Z][A-Z0-9_]*) +(\S+)")
_NICE = 10


class BuildError(InfraError):
    """The kernel did not build. ``first_error`` is the line that says why, ``log_path`` the
    full log. An INFRA_ERROR: ``git bisect run`` skips the commit (125), it is never "bad"."""

    def __init__(self, message: str, *, first_error: str, log_path: Path) -> None:
        super().__init__(f"{message}\nfirst error: {first_error}\nbuild log: {log_path}")
        self.first_error = first_error
        self.log_path = log_path


@dataclass(frozen=True)
class Built:
    """A built kernel in the cache."""

    folder: Path
    key: str
    release: str
    bzimage: Path
    vmlinux: Path  # the build's own vmlinux: every symbol, and debug info when asked for
    system_map: Path
    config: Path
    modules_dir: Path | None
    log_path: Path
    commit: str  # git trees: the commit (with +dirty-<digest> when it had changes)
    config_digest: str  # digest of the .config the kernel was built with
    seconds: float  # how long the build took when it ran
    fresh: bool  # True when this call built it, False when it came from the cache


@dataclass(frozen=True)
class Plan:
    """What one build depends on, resolved: the key and where its files go."""

    tree: Path
    tree_id: str  # the tree's place: its folder, or the source package and version
    state: treestate.TreeState
    config_inputs: tuple[tuple[str, str], ...]  # (name, text) of the base and each fragment
    compiler: str
    debug_info: bool
    root: Path  # <cache>/kernels/source
    tree_stamp: tuple[int, int] = (0, 0)  # the tree's top folder when planned (see _stamp)

    @property
    def key(self) -> str:
        return cache.digest(
            ["source-build", str(_FORMAT), self.tree_id, self.state.key, self.compiler]
            + [f"debug={self.debug_info}"]
            + [part for pair in self.config_inputs for part in pair]
        )

    @property
    def build_dir(self) -> Path:
        """``make O=``: one per tree, base config and compiler, reused by every tree state and
        fragment, so builds are incremental across commits, edits and option changes (kbuild
        recompiles what depends on a changed option). Debug info changes every object: it
        gets a folder of its own."""
        parts = [self.tree_id, self.compiler, f"debug={self.debug_info}", *self.config_inputs[0]]
        return self.root / "build" / cache.digest(parts)[:16]

    @property
    def output(self) -> Path:
        return self.root / "out" / self.key[:24]

    @property
    def failure(self) -> Path:
        return self.root / "failed" / f"{self.key[:24]}.json"

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.key[:24]}.log"


def source_root(cache_root: Path) -> Path:
    return cache_root / "kernels" / "source"


def plan(
    source: SourceTree, cache_root: Path, *, base_config: Path | None = None, progress: bool
) -> Plan:
    """Resolve ``source`` into a :class:`Plan` (unpacks a source package on first use).

    ``base_config`` is the config file of ``source.base_kernel`` (``config = "kernel:NAME"``).

    Raises:
        ConfigError: the tree is unusable (not clean for an out-of-tree build, no commit),
            or a config file cannot be read.
        InfraError: the source package cannot be downloaded or unpacked.
    """
    root = source_root(cache_root)
    if source.tree is not None:
        tree = source.tree
        _check_clean(tree)
        state = treestate.state_of(tree, root / "digests")
        tree_id = f"tree:{tree}"
    else:
        tree, version = unpack_package(source.package, cache_root, progress=progress)
        state = treestate.TreeState(key=f"package:{source.package}={version}")
        tree_id = f"package:{source.package}"
    inputs: list[tuple[str, str]] = [("base", _base_input(source, tree, base_config))]
    for path in _fragments_of(source):
        inputs.append((_fragment_name(path), _read(path, "config fragment")))
    return Plan(
        tree=tree,
        tree_id=tree_id,
        state=state,
        config_inputs=tuple(inputs),
        compiler=compiler_version(),
        debug_info=source.debug_info,
        root=root,
        tree_stamp=_stamp(tree),
    )


def _fragments_of(source: SourceTree) -> list[Path]:
    fragments = list(source.fragments)
    if source.config == MINIMAL_CONFIG:
        fragments.insert(0, MINIMAL_FRAGMENT)
    if source.debug_info:
        fragments.append(DEBUG_FRAGMENT)
    return list(dict.fromkeys(fragments))


def _fragment_name(path: Path) -> str:
    return path.stem if path.parent == SHIPPED_FRAGMENTS else str(path)


def _base_input(source: SourceTree, tree: Path, base_config: Path | None) -> str:
    if source.config == MINIMAL_CONFIG:
        tiny = [tree / name for name in _TINY_FRAGMENTS]
        return "minimal\n" + "".join(p.read_text() for p in tiny if p.is_file())
    if source.config.startswith("kernel:"):
        if base_config is None:
            raise ConfigError(
                f"config {source.config!r}: that kernel has no known config (a local kernel "
                "without config = ...); give its config file instead"
            )
        return _read(base_config, "base config")
    if source.config_file is not None:
        return _read(source.config_file, "base config")
    return f"target:{source.config}"


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None


def _check_clean(tree: Path) -> None:
    """An out-of-tree build refuses a tree configured in place; say so before make does."""
    leftovers = [name for name in (".config", "include/config") if (tree / name).exists()]
    if leftovers:
        raise ConfigError(
            f"kernel tree {tree} was configured or built in place ({', '.join(leftovers)}); "
            "the harness builds out of tree, which needs a clean tree: run `make mrproper` in it"
        )


def compiler_version() -> str:
    """The first lines of ``gcc --version`` and ``ld --version``: part of every build key."""
    words = []
    for tool in ("gcc", "ld"):
        path = shutil.which(tool)
        if path is None:
            raise InfraError(
                f"cannot build kernels: {tool} is not installed; "
                "install it with: apt-get install build-essential bc bison flex libelf-dev "
                "libssl-dev"
            )
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
        words.append(out.stdout.splitlines()[0] if out.stdout else tool)
    return "; ".join(words)


def unpack_package(package: str, cache_root: Path, *, progress: bool) -> tuple[Path, str]:
    """Debian's kernel source package ``package`` unpacked in the cache: (tree, version).

    Uses the installed package's tarball (``/usr/src/<package>.tar.xz``) when there is one,
    else downloads the package with ``apt-get download``.

    Raises:
        ConfigError: apt does not know the package.
        InfraError: the download or the unpacking failed.
    """
    trees = source_root(cache_root) / "trees"
    installed = _installed_version(package)
    tarball = Path("/usr/src") / f"{package}.tar.xz"
    if installed and tarball.is_file():
        target = trees / f"{package}_{_safe(installed)}"

        def from_tarball(partial: Path) -> None:
            _untar(tarball, partial, package, progress)

        cache.build_once(target, from_tarball)
        return target, installed
    found = unpacked_package(package, cache_root)
    if found is not None:
        return found
    pointer = trees / f"{package}.json"
    trees.mkdir(parents=True, exist_ok=True)
    with cache.locked(str(pointer) + ".lock"):
        download = Path(os.path.realpath(trees)) / f".download-{os.getpid()}"
        download.mkdir(exist_ok=True)
        try:
            deb = _download(package, download, progress)
            version = _run_text([tools.require("dpkg-deb"), "-f", str(deb), "Version"]).strip()
            target = trees / f"{package}_{_safe(version)}"

            def from_deb(partial: Path) -> None:
                unpacked = download / "deb"
                _run_text([tools.require("dpkg-deb"), "-x", str(deb), str(unpacked)])
                _untar(unpacked / "usr" / "src" / f"{package}.tar.xz", partial, package, progress)

            cache.build_once(target, from_deb)
        finally:
            shutil.rmtree(download, ignore_errors=True)
        pointer.write_text(json.dumps({"folder": target.name, "version": version}) + "\n")
    return target, version


def unpacked_package(package: str, cache_root: Path) -> tuple[Path, str] | None:
    """The tree and version of ``package`` if the cache holds it unpacked (no side effects)."""
    trees = source_root(cache_root) / "trees"
    installed = _installed_version(package)
    if installed and (Path("/usr/src") / f"{package}.tar.xz").is_file():
        target = trees / f"{package}_{_safe(installed)}"
        return (target, installed) if target.is_dir() else None
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads((trees / f"{package}.json").read_text())
        if (trees / known["folder"]).is_dir():
            return trees / known["folder"], str(known["version"])
    return None


def _installed_version(package: str) -> str:
    dpkg_query = shutil.which("dpkg-query")
    if dpkg_query is None:
        return ""
    result = subprocess.run(
        [dpkg_query, "-W", "-f=${Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    words = result.stdout.split()
    if result.returncode != 0 or "installed" not in words[:3]:
        return ""
    return words[-1]


def _download(package: str, folder: Path, progress: bool) -> Path:
    if progress:
        print(f"bootharness: downloading {package} ...", file=sys.stderr, flush=True)
    result = subprocess.run(
        [tools.require("apt-get"), "download", package],
        cwd=folder,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        error = ConfigError if "Unable to locate package" in result.stderr else InfraError
        raise error(f"could not download {package} with apt-get: {result.stderr.strip()}")
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise InfraError(f"apt-get download {package} gave {len(debs)} .deb files, expected 1")
    return debs[0]


def _untar(tarball: Path, partial: Path, package: str, progress: bool) -> None:
    if progress:
        print(f"bootharness: unpacking {tarball} ...", file=sys.stderr, flush=True)
    scratch = partial.with_name(partial.name + ".tar")
    scratch.mkdir(parents=True)
    try:
        _run_text(["tar", "-xf", str(tarball), "-C", str(scratch)])
        tops = list(scratch.iterdir())
        if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
            raise InfraError(f"{tarball} does not hold one kernel tree ({package})")
        os.replace(tops[0], partial)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _safe(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]", "_", version)


def _run_text(argv: Sequence[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise InfraError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def cached(build_plan: Plan) -> Built | None:
    """The build of ``build_plan`` when the cache has it (no build, no lock)."""
    meta_path = build_plan.output / _METADATA
    if not meta_path.is_file():
        return None
    return _load(build_plan.output, fresh=False)


def cached_failure(build_plan: Plan) -> BuildError | None:
    """The failure remembered for these inputs, when the last build of them did not compile."""
    try:
        data = json.loads(build_plan.failure.read_text())
    except (OSError, ValueError):
        return None
    return BuildError(
        f"the kernel did not build ({data['tree']}, remembered from an earlier build)",
        first_error=str(data["first_error"]),
        log_path=Path(data["log"]),
    )


def build(
    name: str,
    build_plan: Plan,
    *,
    progress: bool | None = None,
    force: bool = False,
) -> Built:
    """Build the kernel of ``build_plan`` unless the cache has it; the build either way.

    ``progress`` shows a progress line on stderr (default: when stderr is a terminal).
    ``force`` builds again even when a failure is remembered for these inputs.

    Raises:
        BuildError: make failed; carries the first error and the log.
        ConfigError: a requested option did not survive the configuration.
        InfraError: a tool is missing.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    done = cached(build_plan)
    if done is not None:
        return done
    if not force:
        failure = cached_failure(build_plan)
        if failure is not None:
            raise failure
    started = time.monotonic()

    def run(partial: Path) -> None:
        _build_into(name, build_plan, partial, progress, started)

    cache.build_once(build_plan.output, run)
    with contextlib.suppress(OSError):
        build_plan.failure.unlink()
    return _load(build_plan.output, fresh=True)


def _build_into(name: str, p: Plan, partial: Path, progress: bool, started: float) -> None:
    lock = os.environ.get(LOCK_ENV) or str(p.root / "build.lock")
    p.log_path.parent.mkdir(parents=True, exist_ok=True)
    p.build_dir.mkdir(parents=True, exist_ok=True)
    with (
        cache.locked(str(p.build_dir) + ".lock"),
        _machine_lock(Path(lock)),
        p.log_path.open("w", buffering=1) as logfile,  # line by line: tail -f works
    ):
        logfile.write(f"# bootharness build of {name}: {p.tree} at {p.state.label}\n")
        logfile.write(f"# compiler: {p.compiler}\n# output: {p.build_dir}\n")
        make = Make(p.tree, p.build_dir, logfile)
        config_digest = _configure(make, p)
        targets = ["bzImage"]
        has_modules = (
            kconfig.parse((p.build_dir / ".config").read_text()).get("CONFIG_MODULES") == "y"
        )
        if has_modules:
            targets.append("modules")
        steps_file = p.build_dir / ".bootharness-steps"
        expected = int(steps_file.read_text()) if steps_file.is_file() else 0
        status = make.run(
            [f"-j{jobs()}", *targets], label=name, progress=progress, expected=expected
        )
        if status != 0:
            raise _failed(name, p, f"make {' '.join(targets)} exited {status}")
        if make.steps > expected or not expected:
            steps_file.write_text(f"{max(make.steps, expected)}\n")
        # Written by the build's prepare stage (not by the configuration).
        release = (p.build_dir / "include" / "config" / "kernel.release").read_text().strip()
        modroot = partial / "modroot"
        if has_modules:
            install = ["modules_install", f"INSTALL_MOD_PATH={modroot}"]
            if not p.debug_info:
                install.append("INSTALL_MOD_STRIP=1")
            if make.run(install, label=name, progress=False) != 0:
                raise _failed(name, p, "make modules_install failed")
            for link in ("build", "source"):
                with contextlib.suppress(FileNotFoundError):
                    (modroot / "lib" / "modules" / release / link).unlink()
    partial.mkdir(exist_ok=True)
    for source, target in (
        (p.build_dir / "arch" / "x86" / "boot" / "bzImage", "bzImage"),
        (p.build_dir / "vmlinux", "vmlinux"),
        (p.build_dir / "System.map", "System.map"),
        (p.build_dir / ".config", "config"),
    ):
        shutil.copyfile(source, partial / target)
    seconds = time.monotonic() - started
    shutil.copyfile(p.log_path, partial / "build.log")
    meta = {
        "format": _FORMAT,
        "name": name,
        "key": p.key,
        "release": release,
        "tree": str(p.tree),
        "state": p.state.key,
        "commit": p.state.label if p.state.commit else "",
        "config_digest": config_digest,
        "compiler": p.compiler,
        "debug_info": p.debug_info,
        "modules": has_modules,
        "seconds": round(seconds, 1),
        "ccache": bool(shutil.which("ccache")),
        "build_dir": str(p.build_dir),
    }
    (partial / _METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    if progress:
        print(f"bootharness: built {name} ({release}) in {seconds:.0f} s", file=sys.stderr)


@contextlib.contextmanager
def _machine_lock(path: Path) -> Iterator[None]:
    """One kernel build at a time on this machine: ``flock`` on ``path``, the same lock as
    ``flock(1)`` takes, so builds outside the harness can share it. The file is never removed
    (a removed lock file would let the next locker lock another inode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _configure(make: Make, p: Plan) -> str:
    """Write the build folder's ``.config`` from the plan; its digest.

    Raises:
        ConfigError: Kconfig failed, or an option a fragment asked for did not survive.
    """
    base = p.config_inputs[0][1]
    fragments = p.config_inputs[1:]
    dot_config = p.build_dir / ".config"
    requested = {name: kconfig.parse(text) for name, text in fragments}
    if base.startswith("minimal\n"):
        # allnoconfig with every fragment as KCONFIG_ALLCONFIG: what the fragments ask for and
        # nothing else (olddefconfig would turn on the defaults of every option they expose).
        allconfig = p.build_dir / ".bootharness-allconfig"
        allconfig.write_text(
            kconfig.merge(base.removeprefix("minimal\n"), [t for _, t in fragments])
        )
        _kconfig(make, ["allnoconfig", f"KCONFIG_ALLCONFIG={allconfig}"], "allnoconfig")
    else:
        if base.startswith("target:"):
            _kconfig(make, [base.removeprefix("target:")], base.removeprefix("target:"))
            base = dot_config.read_text()
        dot_config.write_text(kconfig.merge(base, [t for _, t in fragments]))
    _kconfig(make, ["olddefconfig"], "olddefconfig")
    final = dot_config.read_text()
    lost = kconfig.lost_options(requested, final)
    if lost:
        raise ConfigError(
            f"the kernel tree {p.tree} cannot set {len(lost)} requested option"
            f"{'s' if len(lost) > 1 else ''} (unknown to this tree, a dependency not met, or "
            "a choice set otherwise): "
            + "; ".join(item.render() for item in lost)
            + f"; see {dot_config} and `make O={p.build_dir} menuconfig` (search with /)"
        )
    return cache.digest([final])[:12]


def _kconfig(make: Make, args: list[str], what: str) -> None:
    if make.run(args, label=what, progress=False) != 0:
        raise ConfigError(
            f"configuring the kernel ({what}) failed: {make.last_lines()}; log: {make.log.name}"
        )


def _failed(name: str, p: Plan, what: str) -> BuildError:
    """The error of a failed make, remembered for these inputs when the compiler said why."""
    text = p.log_path.read_text(errors="replace")
    first = first_error(text)
    error = BuildError(
        f"kernel {name} did not build ({p.tree} at {p.state.label}): {what}",
        first_error=first or "(no error line found; see the log)",
        log_path=p.log_path,
    )
    if first and _tree_unchanged(p):
        # A compiler's verdict on these inputs: the same inputs fail the same way. Not when
        # the tree changed under the build (edited, checked out, replaced): then the error may
        # say more about the change than about the inputs.
        p.failure.parent.mkdir(parents=True, exist_ok=True)
        record = {"tree": f"{p.tree} at {p.state.label}", "first_error": first}
        p.failure.write_text(json.dumps({**record, "log": str(p.log_path)}) + "\n")
    return error


def _tree_unchanged(p: Plan) -> bool:
    """Whether the tree is still in the state the build started from."""
    try:
        if p.state.key.startswith("package:"):
            return p.tree_stamp == _stamp(p.tree)
        return treestate.state_of(p.tree, p.root / "digests") == p.state
    except (ConfigError, InfraError, OSError):
        return False


def _stamp(tree: Path) -> tuple[int, int]:
    """Inode and change time of a tree's top folder: an unpacked tree replaced in the cache
    gets a new one."""
    stat = tree.stat()
    return stat.st_ino, stat.st_ctime_ns


def first_error(log_text: str) -> str:
    """The line of a build log that says why the build failed ("" when none does)."""
    for pattern in _ERROR_PATTERNS:
        match = pattern.search(log_text)
        if match:
            return match.group(0).strip()
    return ""


def jobs() -> int:
    """Parallel make jobs: ``$BOOTHARNESS_BUILD_JOBS``, else one per CPU."""
    text = os.environ.get(JOBS_ENV, "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    return os.cpu_count() or 1


def _load(folder: Path, *, fresh: bool) -> Built:
    meta = json.loads((folder / _METADATA).read_text())
    release = meta["release"]
    modules = folder / "modroot" / "lib" / "modules" / release
    return Built(
        folder=folder,
        key=meta["key"],
        release=release,
        bzimage=folder / "bzImage",
        vmlinux=folder / "vmlinux",
        system_map=folder / "System.map",
        config=folder / "config",
        modules_dir=modules if modules.is_dir() else None,
        log_path=folder / "build.log",
        commit=meta.get("commit", ""),
        config_digest=meta.get("config_digest", ""),
        seconds=float(meta.get("seconds", 0.0)),
        fresh=fresh,
    )


class Make:
    """``make -C TREE O=OUT`` runs with their output in one log, counted for progress."""

    def __init__(self, tree: Path, out: Path, log: IO[str]) -> None:
        self.tree = tree
        self.out = out
        self.log = log
        self.steps = 0
        self._tail: list[str] = []

    def argv(self, args: Sequence[str]) -> list[str]:
        make = tools.require("make")
        argv = [make, "-C", str(self.tree), f"O={self.out}"]
        if shutil.which("ccache"):
            argv.append("CC=ccache gcc")
        return [*argv, *args]

    def run(self, args: Sequence[str], *, label: str, progress: bool, expected: int = 0) -> int:
        argv = self.argv(args)
        self.log.write(f"$ {' '.join(argv)}\n")
        self.log.flush()
        self.steps = 0
        self._tail = []
        started = time.monotonic()
        env = {**os.environ, **_BUILD_ENV, "LC_ALL": "C"}
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            preexec_fn=_lower_priority,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                self.log.write(line)
                self._tail = [*self._tail[-19:], line.rstrip("\n")]
                step = _STEP_RE.match(line)
                if step:
                    self.steps += 1
                    if progress:
                        _show(label, self.steps, expected, started, step.group(2))
        finally:
            status = process.wait()
            if progress:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
        self.log.write(f"# exit {status} after {time.monotonic() - started:.1f} s\n")
        self.log.flush()
        return status

    def last_lines(self, count: int = 5) -> str:
        return " | ".join(line.strip() for line in self._tail[-count:] if line.strip())


def _lower_priority() -> None:
    os.nice(_NICE)


def _show(label: str, steps: int, expected: int, started: float, what: str) -> None:
    elapsed = time.monotonic() - started
    share = f" {min(99, 100 * steps // expected):3d}%" if expected else ""
    line = f"building {label}:{share} {steps} steps, {elapsed:4.0f} s  {what}"
    width = shutil.get_terminal_size((100, 20)).columns
    sys.stderr.write("\r\x1b[K" + line[: width - 1])
    sys.stderr.flush()
