"""Resolve kernel module names to files in load order, and check they belong to the kernel.

The initramfs loads modules with plain ``insmod``, one file at a time, so the harness must do
what ``modprobe`` would: follow ``modules.dep`` (hard dependencies), load ``softdep X pre: Y``
modules before ``X``, look up exact aliases (``crypto-crc32c``), skip modules built into the
kernel, and order everything so each module comes after all of its dependencies.

The order matches ``modprobe --show-depends``: for each module, first its pre-softdeps, then
its ``modules.dep`` entries in reverse (depmod lists the module that must load first last),
each preceded by its own dependencies, and each module only once.

Two differences from modprobe are deliberate, both so that every ``insmod`` in the init
succeeds and none is wasted (each costs ~70 ms under TCG):

- An alias is looked up in ``modules.builtin.modinfo`` too, and one that a built-in module
  provides (``sha256`` -> ``sha256_generic``) needs nothing loaded; modprobe would load a
  module for it anyway.
- When an alias names several modules (``crypto-crc32c`` -> ``crc32c_intel`` and
  ``crc32c_generic``), modprobe loads them all, but CPU-feature modules (those with a
  ``cpu:`` modalias: SSE4.2, PCLMUL, VIA PadLock) refuse to load (ENODEV) on a CPU without
  the feature, such as QEMU's default TCG model, and a failing ``insmod`` breaks the init.
  Exactly one module is picked: the first that loads on any CPU, else the first listed.

kmod also only honours the first ``softdep`` line of a module (a FIXME in libkmod) although
depmod writes one line per ``MODULE_SOFTDEP``; every line is honoured here.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import logging
import lzma
import re
import subprocess
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness import lazyimport
from harness.outcome import ConfigError
from harness.tools import require

if TYPE_CHECKING:
    import difflib
else:  # only the "did you mean" of an error message uses it
    difflib = lazyimport.module("difflib")

log = logging.getLogger(__name__)

# Longest first, so "foo.ko.xz" is not mistaken for a module named "foo.ko".
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_VERMAGIC = re.compile(rb"(?:^|\x00)vermagic=([^\x00]*)\x00")
_WILDCARD = re.compile(r"[*?\[]")


class UnknownModuleError(ConfigError):
    """A requested module is neither in ``modules.dep``, built in, nor an exact alias."""

    def __init__(self, message: str, name: str, release: str, suggestions: Sequence[str]) -> None:
        super().__init__(message)
        self.name = name
        self.release = release
        self.suggestions = tuple(suggestions)


class VermagicMismatchError(ConfigError):
    """A module file was built for another kernel than the one it is meant to be loaded into."""

    def __init__(self, message: str, path: Path, vermagic: str, release: str) -> None:
        super().__init__(message)
        self.path = path
        self.vermagic = vermagic
        self.release = release


@dataclass(frozen=True)
class ModuleFile:
    """One loadable module file, as listed in ``modules.dep``."""

    name: str
    """Canonical name with ``_`` (``sd_mod``)."""
    relpath: str
    """Path as written in ``modules.dep`` (``kernel/drivers/scsi/sd_mod.ko``, maybe ``.ko.xz``)."""
    path: Path
    """Absolute path: the modules folder joined with :attr:`relpath`."""


def modprobe_name(name: str) -> str:
    """The canonical form of a module name: kmod treats ``-`` and ``_`` as the same."""
    return name.replace("-", "_")


def _name_from_relpath(relpath: str) -> str | None:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            return modprobe_name(base[: -len(suffix)])
    return None


@dataclass(frozen=True)
class _Edge:
    target: str
    soft: bool


def shared_index(modules_dir: Path, release: str) -> ModuleIndex:
    """The :class:`ModuleIndex` of a modules folder, loaded once per process.

    Every initramfs build resolves modules; parsing modules.dep and modules.alias again each
    time costs 0.1-0.2 s, a tenth of a TCG boot. The index is reloaded when modules.dep changes.

    Raises:
        ConfigError: as :meth:`ModuleIndex.load`.
    """
    try:
        info = (Path(modules_dir) / "modules.dep").stat()
        stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
    except OSError:
        stamp = (0, 0, 0)  # load() reports what is missing
    return _shared_index(Path(modules_dir), release, stamp)


@functools.lru_cache(maxsize=16)
def _shared_index(modules_dir: Path, release: str, stamp: tuple[int, int, int]) -> ModuleIndex:
    return ModuleIndex.load(modules_dir, release)


class ModuleIndex:
    """The module database of one kernel release: ``modules.dep`` and its companions.

    Each file is parsed at most once per index (``modules.dep`` at :meth:`load`, the optional
    files on first use), and each module's dependency list is computed once, so repeated
    :meth:`resolve` calls for every initramfs build stay cheap. Keep one index per kernel.
    """

    def __init__(
        self,
        modules_dir: Path,
        release: str,
        relpaths: dict[str, str],
        deps: dict[str, tuple[str, ...]],
    ) -> None:
        """Use :meth:`load`; this takes ``modules.dep`` already parsed."""
        self.modules_dir = modules_dir
        self.release = release
        self._relpaths = relpaths
        self._deps = deps
        self._edges: dict[str, tuple[_Edge, ...]] = {}
        self._vermagic: dict[Path, str] = {}

    @classmethod
    def load(cls, modules_dir: Path, release: str) -> ModuleIndex:
        """Read ``modules_dir/modules.dep`` (``modules_dir`` is ``lib/modules/<release>``).

        Raises:
            ConfigError: the folder or ``modules.dep`` is missing (the message says how to
                generate it with depmod), or a line of ``modules.dep`` is malformed.
        """
        modules_dir = Path(modules_dir)
        dep_file = modules_dir / "modules.dep"
        if not modules_dir.is_dir():
            raise ConfigError(
                f"modules folder {modules_dir} for kernel {release} does not exist; "
                "provision the kernel with its modules (lib/modules/<release>)"
            )
        try:
            text = dep_file.read_text(encoding="utf-8", errors="surrogateescape")
        except FileNotFoundError:
            raise ConfigError(
                f"{dep_file} is missing, so the modules of kernel {release} cannot be resolved; "
                f"generate it with: depmod -b {_depmod_root(modules_dir, release)} {release}"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read {dep_file}: {exc}") from exc
        relpaths, deps = _parse_dep(text, dep_file)
        log.debug("loaded %d modules from %s", len(deps), dep_file)
        return cls(modules_dir, release, relpaths, deps)

    # -- the optional files, parsed on first use ------------------------------------------

    @functools.cached_property
    def _builtin(self) -> frozenset[str]:
        names: set[str] = set()
        for _lineno, line in _lines(self.modules_dir / "modules.builtin"):
            name = _name_from_relpath(line)
            names.add(name if name is not None else modprobe_name(line))
        return frozenset(names)

    @functools.cached_property
    def _softdeps(self) -> dict[str, tuple[str, ...]]:
        """Module name -> the names (or aliases) its ``pre:`` softdeps ask for, in order."""
        path = self.modules_dir / "modules.softdep"
        pre: dict[str, list[str]] = {}
        for lineno, line in _lines(path):
            words = line.split()
            if words[0] != "softdep":
                continue
            if len(words) < 3:
                log.debug("%s:%d: ignoring incomplete softdep line %r", path, lineno, line)
                continue
            # Like kmod: words before the first "pre:"/"post:" belong to no list and are
            # ignored (cifs ships "softdep cifs gcm"); post: modules are not needed to boot.
            mode = ""
            for word in words[2:]:
                if word in ("pre:", "post:"):
                    mode = word
                elif mode == "pre:":
                    pre.setdefault(modprobe_name(words[1]), []).append(modprobe_name(word))
        return {name: tuple(targets) for name, targets in pre.items()}

    @functools.cached_property
    def _builtin_aliases(self) -> frozenset[str]:
        """Aliases of built-in modules, from the NUL-separated ``modules.builtin.modinfo``."""
        path = self.modules_dir / "modules.builtin.modinfo"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.debug("%s not found; treating it as empty", path)
            return frozenset()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        aliases: set[str] = set()
        for entry in data.split(b"\x00"):
            _module, dot_alias, alias = entry.partition(b".alias=")
            if dot_alias and alias and not _WILDCARD.search(alias.decode("utf-8", "replace")):
                aliases.add(modprobe_name(alias.decode("utf-8", errors="replace")))
        return frozenset(aliases)

    @functools.cached_property
    def _alias_table(self) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
        """(exact alias -> module names in file order, modules with a ``cpu:`` modalias).

        Wildcard aliases match hardware, not names someone writes in a test, so they only
        serve to tell which modules depend on a CPU feature.
        """
        aliases: dict[str, list[str]] = {}
        cpu_specific: set[str] = set()
        for _lineno, line in _lines(self.modules_dir / "modules.alias"):
            words = line.split()
            if len(words) != 3 or words[0] != "alias":
                continue
            target = modprobe_name(words[2])
            if _WILDCARD.search(words[1]):
                if words[1].startswith("cpu:"):
                    cpu_specific.add(target)
                continue
            targets = aliases.setdefault(modprobe_name(words[1]), [])
            if target not in targets:
                targets.append(target)
        exact = {alias: tuple(targets) for alias, targets in aliases.items()}
        return exact, frozenset(cpu_specific)

    # -- public queries -------------------------------------------------------------------

    def names(self) -> frozenset[str]:
        """Canonical names of every loadable module in ``modules.dep``."""
        return frozenset(self._relpaths)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is compiled into the kernel: listed in ``modules.builtin``, or an
        alias a built-in module provides (so :meth:`resolve` gives nothing for it)."""
        return self._find(modprobe_name(name)) is None

    def resolve(self, names: Sequence[str]) -> list[ModuleFile]:
        """Every requested module and all its dependencies, each once, in load order.

        A name may be a module name (``-`` and ``_`` are equal) or an exact alias. Built-in
        modules resolve to nothing. ``softdep X pre: Y`` loads ``Y`` before ``X``; a
        pre-softdep that is unknown or built in is skipped. The order is deterministic.

        Raises:
            UnknownModuleError: a requested name is not a module of this kernel; the message
                lists close names.
            ConfigError: the dependencies form a cycle, or ``modules.dep`` lists a module
                file that does not exist.
        """
        order: list[str] = []
        state: dict[str, bool] = {}  # False while on the DFS stack, True once placed
        for requested in names:
            root = self._lookup(requested)
            if root is not None and root not in state:
                self._place(root, state, order)
        return [self._module_file(name) for name in order]

    def check_vermagic(self, modules: Sequence[ModuleFile]) -> None:
        """Check that every module was built for this index's kernel release.

        The first word of a module's ``vermagic`` (in its ``.modinfo``) is the release it
        was built for; the kernel refuses to load a module whose vermagic differs.

        Raises:
            VermagicMismatchError: a module was built for another release: the modules
                folder belongs to another kernel build.
            ConfigError: a module file cannot be read or decompressed, or has no vermagic.
            MissingToolError: a ``.ko.zst`` module needs the ``zstd`` program.
        """
        for module in modules:
            vermagic = self._vermagic.get(module.path)
            if vermagic is None:
                vermagic = read_vermagic(module.path)
                self._vermagic[module.path] = vermagic
            built_for = vermagic.split(maxsplit=1)[0] if vermagic.strip() else ""
            if built_for != self.release:
                raise VermagicMismatchError(
                    f"module {module.path} has vermagic {vermagic!r}, but the kernel release is "
                    f"{self.release!r}: the modules folder {self.modules_dir} belongs to another "
                    "kernel build; provision the modules that were built with this kernel",
                    path=module.path,
                    vermagic=vermagic,
                    release=self.release,
                )

    # -- resolution -----------------------------------------------------------------------

    def _lookup(self, requested: str) -> str | None:
        """The module a requested name loads, or None if it is built in."""
        name = modprobe_name(requested.strip())
        found = self._find(name)
        if found is None:
            log.debug("module %s is built into kernel %s: nothing to load", name, self.release)
            return None
        if found:
            return found
        candidates = sorted(self._relpaths.keys() | self._builtin)
        close = difflib.get_close_matches(name, candidates, n=5)
        hint = f"close names: {', '.join(close)}" if close else "no module has a close name"
        raise UnknownModuleError(
            f"unknown kernel module {requested!r} for kernel {self.release} "
            f"(not in {self.modules_dir / 'modules.dep'}, modules.builtin or modules.alias); "
            f"{hint}; check the name, or whether this kernel build has the module at all",
            name=requested,
            release=self.release,
            suggestions=close,
        )

    def _find(self, name: str) -> str | None:
        """A canonical name -> the module name, None if built in, "" if unknown.

        Precedence follows modprobe: a loadable module's own name, then an exact alias,
        then a built-in module's name (``crc32`` is both the built-in library and an alias
        of the crypto modules ``crc32_generic``/``crc32_pclmul``; softdeps mean the latter).
        """
        if name in self._relpaths:
            return name
        if name in self._builtin_aliases:
            return None
        aliases, cpu_specific = self._alias_table
        loadable = [t for t in aliases.get(name, ()) if t in self._relpaths]
        if loadable:
            # See the module docstring: one module that loads on any CPU, not every match.
            portable = [t for t in loadable if t not in cpu_specific]
            choice = (portable or loadable)[0]
            if len(loadable) > 1:
                log.debug("alias %s -> %s (of %s)", name, choice, ", ".join(loadable))
            return choice
        if name in self._builtin or any(t in self._builtin for t in aliases.get(name, ())):
            return None
        return ""

    def _edges_of(self, name: str) -> tuple[_Edge, ...]:
        """What must load before ``name``, in the order it should be placed."""
        edges = self._edges.get(name)
        if edges is not None:
            return edges
        found: list[_Edge] = []
        for wanted in self._softdeps.get(name, ()):
            target = self._find(wanted)
            if not target:
                why = "is built in" if target is None else "is not a module of this kernel"
                log.debug("softdep %s pre: %s skipped: %s %s", name, wanted, wanted, why)
                continue
            found.append(_Edge(target, soft=True))
        # depmod writes the module that must load first last; modprobe walks the list
        # backwards, and so do we, to produce the same order.
        found.extend(_Edge(dep, soft=False) for dep in reversed(self._deps.get(name, ())))
        edges = tuple(found)
        self._edges[name] = edges
        return edges

    def _place(self, root: str, state: dict[str, bool], order: list[str]) -> None:
        """Depth-first post-order from ``root``. Iterative, so a long hand-written chain of
        dependencies cannot hit Python's recursion limit."""
        state[root] = False
        stack: list[tuple[str, Iterator[_Edge]]] = [(root, iter(self._edges_of(root)))]
        while stack:
            node, edges = stack[-1]
            for edge in edges:
                seen = state.get(edge.target)
                if seen is True:
                    continue
                if seen is False:
                    self._raise_cycle([n for n, _ in stack], edge)
                state[edge.target] = False
                stack.append((edge.target, iter(self._edges_of(edge.target))))
                break
            else:
                stack.pop()
                state[node] = True
                order.append(node)

    def _raise_cycle(self, path: list[str], closing: _Edge) -> None:
        cycle = [*path[path.index(closing.target) :], closing.target]
        arrows: list[str] = [cycle[0]]
        for before, after in itertools.pairwise(cycle):
            soft = any(e.soft for e in self._edges_of(before) if e.target == after)
            arrows.append(f" -(softdep)-> {after}" if soft else f" -> {after}")
        raise ConfigError(
            f"kernel modules of {self.release} depend on each other in a cycle: {''.join(arrows)} "
            f"(in {self.modules_dir / 'modules.dep'} or modules.softdep); "
            "fix the file, or regenerate it with depmod"
        )

    def _module_file(self, name: str) -> ModuleFile:
        relpath = self._relpaths[name]
        path = self.modules_dir / relpath
        if not path.is_file():
            raise ConfigError(
                f"{self.modules_dir / 'modules.dep'} lists module {name} as {relpath}, but "
                f"{path} does not exist; the modules folder of kernel {self.release} is "
                "incomplete: provision it again"
            )
        return ModuleFile(name=name, relpath=relpath, path=path)


def read_vermagic(path: Path) -> str:
    """The ``vermagic=`` string of a module file (``.ko``, ``.ko.xz``, ``.ko.gz``, ``.ko.zst``).

    Raises:
        ConfigError: the file cannot be read or decompressed, or has no vermagic.
        MissingToolError: a ``.ko.zst`` file needs the ``zstd`` program.
    """
    data = _read_module(path)
    match = _VERMAGIC.search(data)
    if match is None:
        raise ConfigError(
            f"module {path} has no vermagic= entry in its .modinfo: it is not a kernel module "
            "or is damaged; provision the kernel's modules again"
        )
    return match.group(1).decode("utf-8", errors="replace")


def _read_module(path: Path) -> bytes:
    name = path.name
    try:
        if name.endswith(".zst"):
            return _unzstd(path)
        raw = path.read_bytes()
        if name.endswith(".xz"):
            return lzma.decompress(raw)
        if name.endswith(".gz"):
            return gzip.decompress(raw)
        return raw
    except (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise ConfigError(f"module {path} cannot be decompressed ({exc}); it is damaged") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read module {path}: {exc}") from exc


def _unzstd(path: Path) -> bytes:
    # No zstd module in the standard library of 3.11; the CLI is a documented dependency.
    argv = [require("zstd"), "-d", "-c", "-q", "--", str(path)]
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", errors="replace").strip()
        raise ConfigError(f"module {path} cannot be decompressed with zstd: {stderr}")
    return proc.stdout


def _parse_dep(text: str, dep_file: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """``modules.dep`` -> (name -> relpath, name -> dependency names as listed)."""
    relpaths: dict[str, str] = {}
    deps: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, colon, tail = line.partition(":")
        name = _name_from_relpath(head.strip())
        if not colon or name is None:
            raise ConfigError(
                f"{dep_file}:{lineno}: expected 'path/module.ko: path/dep.ko ...', got {line!r}; "
                "fix the line or regenerate the file with depmod"
            )
        if name in deps:
            raise ConfigError(
                f"{dep_file}:{lineno}: module {name} is listed twice "
                f"({relpaths[name]} and {head.strip()}); keep one line per module"
            )
        relpaths[name] = head.strip()
        dep_names: list[str] = []
        for dep_path in tail.split():
            dep = _name_from_relpath(dep_path)
            if dep is None:
                raise ConfigError(
                    f"{dep_file}:{lineno}: dependency {dep_path!r} of {name} is not a module "
                    "path (*.ko, *.ko.xz, *.ko.zst, *.ko.gz); fix the line"
                )
            # A hand-written file may name a dependency without giving it a line of its own.
            relpaths.setdefault(dep, dep_path)
            dep_names.append(dep)
        deps[name] = tuple(dep_names)
    return relpaths, deps


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank, non-comment lines of an optional file (missing means empty)."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        log.debug("%s not found; treating it as empty", path)
        return
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def _depmod_root(modules_dir: Path, release: str) -> str:
    """The ``-b`` argument of depmod for a ``ROOT/lib/modules/RELEASE`` folder."""
    parent = modules_dir.parent
    if modules_dir.name == release and parent.name == "modules" and parent.parent.name == "lib":
        return str(parent.parent.parent)
    return "ROOT"
