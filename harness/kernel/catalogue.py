"""Parse and validate ``kernels.toml``, the catalogue of kernels bootharness knows.

The file holds an optional top-level ``default`` (a kernel name) and one ``[kernels."NAME"]``
table per kernel. A kernel comes from a Debian package (``debian_package``), from local files
(``vmlinuz``, and optionally ``modules``, ``config``, ``system_map``) or from a kernel tree the
harness builds (``tree`` or ``linux_source``, with ``config``, ``fragments``); every kernel
may carry ``tags``, extra ``cmdline`` text and a ``note``. See the shipped ``kernels.toml``.

Everything is checked when the file is loaded, and every problem is reported at once in one
:class:`CatalogueError`, each naming the file, the kernel, the key and a fix. Decisions:

* No ``default``: the first kernel in the file is the default.
* A tag repeated within one kernel is dropped silently (the first is kept): selecting it still
  picks the same kernel, so nothing is ambiguous and there is nothing to fix.
* A tag that is another kernel's name is an error (selecting it would be ambiguous), and the tag
  ``default`` may only be on the default kernel (anything else would contradict ``default``).
* Local paths: ``~`` expands; relative paths are relative to the folder of the file as given
  (not of a symlink's target); paths are stored resolved. They must exist when the file loads,
  so a typo fails before any VM starts. A ``modules`` folder without ``modules.dep`` is fine
  (depmod makes one), but it must be a folder.
* A kernel built from source (``tree`` or ``linux_source``) takes ``config`` as its base
  configuration (``minimal``, a make target, ``kernel:NAME`` or a file), ``fragments`` (files,
  or names of fragments shipped in ``harness/kernel/fragments``) and ``debug_info``.
  ``kernel:NAME`` must name a kernel of the same file that is not itself built from source.
* ``debian_package`` must name a versioned kernel image (``linux-image-<version>...``): a
  meta-package such as ``linux-image-amd64`` holds no kernel and drifts between runs, and
  ``-dbg`` packages hold only debug symbols.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from harness import lazyimport
from harness.outcome import ConfigError

if TYPE_CHECKING:
    import difflib
else:  # only the "did you mean" of an error message uses it
    difflib = lazyimport.module("difflib")

log = logging.getLogger(__name__)

FILE_NAME = "kernels.toml"
# The catalogue shipped as package data: used when no kernels.toml is found.
SHIPPED_CATALOGUE = Path(__file__).resolve().parent.parent / "data" / "kernels.toml"
ENV_VAR = "BOOTHARNESS_KERNELS"

# Names end up in pytest ids, cache folders and log file names, so keep them to a safe set;
# the first character may not be '.' or '-' (hidden files, things that look like options).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_NAME_RULE = "use only letters, digits and . _ + - (starting with a letter or digit)"
_IMAGE_PACKAGE_RE = re.compile(r"linux-image-[0-9][a-z0-9+.-]*\Z")
_EXAMPLE_PACKAGE = "linux-image-6.1.0-56-amd64-unsigned"
_TOML_POSITION_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\Z")

# The harness's own config fragments (package data), named in ``fragments`` by bare name.
SHIPPED_FRAGMENTS = Path(__file__).resolve().parent / "fragments"
# Base configs a source kernel may start from without a file: the harness's minimal kernel,
# the tree's make targets, or ``kernel:NAME`` (the config of another kernel of the file).
MINIMAL_CONFIG = "minimal"
_CONFIG_TARGET_RE = re.compile(
    r"(?:def|tiny|allno|allmod|allyes|alldef)config\Z|[a-z0-9_]+_defconfig\Z"
)
_SOURCE_PACKAGE_RE = re.compile(r"linux-source-[0-9]+\.[0-9]+\Z")
_FRAGMENT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*\Z")

_TOP_KEYS = ("default", "kernels")
_LOCAL_ONLY_KEYS = ("modules", "config", "system_map")
_SOURCE_KEYS = ("tree", "linux_source")
_SOURCE_ONLY_KEYS = ("fragments", "debug_info")
_KERNEL_KEYS = (
    "debian_package",
    "vmlinuz",
    *_SOURCE_KEYS,
    *_LOCAL_ONLY_KEYS,
    *_SOURCE_ONLY_KEYS,
    "debug_symbols",
    "tags",
    "cmdline",
    "note",
)


@dataclass(frozen=True)
class DebianPackage:
    """A kernel provisioned from a Debian ``linux-image-*`` package.

    ``debug_symbols`` also fetches the matching ``-dbg`` package (large: hundreds of MB) for
    its real System.map and its vmlinux with debug info, so traces show file:line.
    """

    package: str
    debug_symbols: bool = False


@dataclass(frozen=True)
class LocalFiles:
    """A kernel built locally; every path is absolute and existed when the file was loaded."""

    vmlinuz: Path
    modules: Path | None = None
    config: Path | None = None
    system_map: Path | None = None


@dataclass(frozen=True)
class SourceTree:
    """A kernel the harness builds from source (:mod:`harness.kernel.source`).

    The tree is a folder (``tree``, git or not) or Debian's kernel source package
    (``package``, e.g. ``linux-source-6.1``, unpacked once into the cache). ``config`` is the
    base configuration: :data:`MINIMAL_CONFIG` (``make tinyconfig`` plus the shipped minimal
    fragment), a make target of the tree (``defconfig``, ``tinyconfig``,
    ``x86_64_defconfig``...), ``kernel:NAME`` (the config of ``base_kernel``) or a file
    (``config_file``). ``fragments`` are applied on top, in order; every option they set
    must survive ``olddefconfig``.
    """

    tree: Path | None = None
    package: str = ""
    config: str = MINIMAL_CONFIG
    config_file: Path | None = None
    base_kernel: KernelEntry | None = None
    fragments: tuple[Path, ...] = ()
    debug_info: bool = False

    @property
    def label(self) -> str:
        """The tree as a person names it: the package, or the folder."""
        return self.package or str(self.tree)


KernelSource = DebianPackage | LocalFiles | SourceTree


@dataclass(frozen=True)
class KernelEntry:
    """One validated ``[kernels."NAME"]`` table."""

    name: str
    source: KernelSource
    tags: tuple[str, ...] = ()
    cmdline: str = ""
    note: str = ""
    origin: Path | None = None  # the kernels.toml it came from, for messages about it

    def matches(self, selector: str) -> bool:
        """True if ``selector`` is this kernel's name, one of its tags, or ``tag:`` + a tag."""
        if selector.startswith("tag:"):
            return selector.removeprefix("tag:") in self.tags
        return selector == self.name or selector in self.tags


@dataclass(frozen=True)
class Catalogue:
    """The validated contents of one ``kernels.toml``."""

    path: Path
    kernels: tuple[KernelEntry, ...]  # in file order
    default: str

    @property
    def names(self) -> tuple[str, ...]:
        """Kernel names in file order."""
        return tuple(kernel.name for kernel in self.kernels)

    @property
    def tags(self) -> tuple[str, ...]:
        """Every tag, once, in order of first appearance."""
        return tuple(dict.fromkeys(tag for kernel in self.kernels for tag in kernel.tags))

    def get(self, name: str) -> KernelEntry:
        """Return the kernel called ``name``.

        Raises:
            ConfigError: no such kernel; the message names the file and lists close names.
        """
        for kernel in self.kernels:
            if kernel.name == name:
                return kernel
        raise ConfigError(
            f"{self.path}: no kernel named {name!r}{_did_you_mean(name, self.names)}; "
            f"known kernels: {_listing(self.names)}"
        )

    def select(self, selectors: Sequence[str]) -> list[KernelEntry]:
        """Return the kernels matching any of ``selectors``, each once, in file order.

        A selector is a kernel name, a tag, or ``tag:TAG`` (only tags). No selectors selects
        the default kernel.

        Raises:
            ConfigError: some selector matched nothing; the message lists every such
                selector, close matches, and the known names and tags.
        """
        if not selectors:
            return [self.get(self.default)]
        chosen: set[str] = set()
        unmatched: list[str] = []
        for selector in selectors:
            hits = [kernel.name for kernel in self.kernels if kernel.matches(selector)]
            if not hits:
                unmatched.append(selector)
            chosen.update(hits)
        if unmatched:
            raise ConfigError(
                f"{self.path}: no kernel name or tag matches "
                + ", ".join(self._with_hint(selector) for selector in unmatched)
                + f"; known kernels: {_listing(self.names)}; known tags: {_listing(self.tags)}; "
                "select with NAME, TAG or tag:TAG"
            )
        return [kernel for kernel in self.kernels if kernel.name in chosen]

    def _with_hint(self, selector: str) -> str:
        if selector.startswith("tag:"):
            tag = selector.removeprefix("tag:")
            close = ["tag:" + t for t in difflib.get_close_matches(tag, self.tags, n=3)]
        else:
            close = difflib.get_close_matches(selector, [*self.names, *self.tags], n=3)
        return f"{selector!r} (did you mean {_or(close)}?)" if close else repr(selector)


class CatalogueError(ConfigError):
    """``kernels.toml`` is unreadable or invalid; ``problems`` holds every problem found.

    Each problem is one line naming the file (and the kernel and key where there is one) and
    saying how to fix it; the message lists them all, one per line.
    """

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{path}: {len(self.problems)} problems:\n" + "\n".join(self.problems)
        super().__init__(message)


def load_catalogue(path: Path) -> Catalogue:
    """Read and validate ``path``.

    Raises:
        CatalogueError: the file cannot be read, is not valid TOML, or breaks any rule of the
            format; every problem found is reported at once.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogueError(
            path, [f"{path}: no such file; create it, or point ${ENV_VAR} at an existing one"]
        ) from None
    except UnicodeDecodeError as error:
        raise CatalogueError(
            path,
            [f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"],
        ) from None
    except OSError as error:
        raise CatalogueError(path, [f"{path}: cannot read it: {error.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CatalogueError(path, [_syntax_problem(path, text, error)]) from None
    catalogue = _Validator(path, data).catalogue()
    log.debug(
        "loaded %d kernels from %s (default %s)", len(catalogue.kernels), path, catalogue.default
    )
    return catalogue


def find_catalogue(explicit: str | Path | None = None, start: Path | None = None) -> Path:
    """Locate the ``kernels.toml`` to use and return its absolute path.

    In order: ``explicit`` (a file, or a folder holding ``kernels.toml``); else
    ``$BOOTHARNESS_KERNELS``; else ``kernels.toml`` in ``start`` (default: the current folder)
    or the nearest of its parents; else the catalogue shipped with the package
    (:data:`SHIPPED_CATALOGUE`), so an installed tool boots from any folder.

    Raises:
        ConfigError: the explicit or environment path does not exist.
    """
    if explicit is not None:
        return _existing(Path(explicit), "given explicitly")
    from_env = os.environ.get(ENV_VAR, "")
    if from_env:
        return _existing(Path(from_env), f"from ${ENV_VAR}")
    here = (start if start is not None else Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / FILE_NAME
        if candidate.is_file():
            return candidate
    log.info("no %s in %s or above it: using the shipped %s", FILE_NAME, here, SHIPPED_CATALOGUE)
    return SHIPPED_CATALOGUE


def _existing(path: Path, origin: str) -> Path:
    try:
        path = path.expanduser()
    except RuntimeError as error:  # '~' with no home directory, or an unknown '~user'
        raise ConfigError(f"kernels file {str(path)!r} ({origin}): {error}") from None
    path = path.absolute()
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise ConfigError(f"kernels file {path} ({origin}) does not exist; check the path")
    return path


def _syntax_problem(path: Path, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    position = _TOML_POSITION_RE.search(message)
    reason = message[: position.start()] if position else message
    lines = text.splitlines() or [""]
    if position and position.group(1):
        line, column = int(position.group(1)), int(position.group(2))
    else:  # "at end of document": something opened earlier was never closed
        line, column = len(lines), len(lines[-1]) + 1
    source = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    hint = "fix the TOML syntax there (see https://toml.io)"
    if reason.startswith("Cannot declare") and "'kernels'" in reason:
        hint = "each kernel name may appear only once: rename or remove one of the tables"
    elif source.startswith("["):
        hint = (
            'quote kernel names that hold anything but letters, digits, - and _: [kernels."NAME"]'
        )
    return f"{path}:{line}:{column}: invalid TOML: {reason} in {source!r}; {hint}"


class _Validator:
    """Turns parsed TOML into a :class:`Catalogue`, collecting every problem on the way."""

    def __init__(self, path: Path, data: dict[str, object]) -> None:
        self.path = path
        self.data = data
        # The folder of the file as given, so a relative path means what the user sees.
        self.base = path.absolute().parent
        self.problems: list[str] = []
        # Every kernel's name and tags, valid or not, so one bad kernel neither makes a
        # `default` that names it look wrong nor hides a tag that clashes with a name.
        self.names: list[str] = []
        self.tags_of: dict[str, tuple[str, ...]] = {}
        # Source kernels whose config is another kernel's (config = "kernel:NAME").
        self.base_of: dict[str, str] = {}

    def problem(self, message: str, kernel: str | None = None, key: str | None = None) -> None:
        where = str(self.path)
        if kernel is not None:
            where += f": kernel {kernel!r}"
        self.problems.append(f"{where}: key {key!r} {message}" if key else f"{where}: {message}")

    def catalogue(self) -> Catalogue:
        for key in self.data:
            if key not in _TOP_KEYS:
                self.problem(
                    f"is not known{_did_you_mean(key, _TOP_KEYS, n=1)}; the top level holds only "
                    'default = "NAME" and [kernels."NAME"] tables',
                    key=key,
                )
        entries = self.kernels(self.data.get("kernels"))
        default = self.default(self.names)
        self.cross_check(default)
        entries = self.resolve_bases(entries)
        if self.problems:
            raise CatalogueError(self.path, self.problems)
        return Catalogue(path=self.path, kernels=tuple(entries), default=default)

    def resolve_bases(self, entries: list[KernelEntry]) -> list[KernelEntry]:
        """Give each ``config = "kernel:NAME"`` source kernel the entry of NAME."""
        by_name = {entry.name: entry for entry in entries}
        resolved = []
        for entry in entries:
            base = self.base_of.get(entry.name)
            if base is not None and isinstance(entry.source, SourceTree):
                target = by_name.get(base)
                if base not in self.names:
                    self.problem(
                        f"is 'kernel:{base}', but there is no kernel {base!r} in this file"
                        f"{_did_you_mean(base, self.names)}",
                        kernel=entry.name,
                        key="config",
                    )
                elif target is not None and isinstance(target.source, SourceTree):
                    self.problem(
                        f"is 'kernel:{base}', a kernel built from source too; name a Debian "
                        "or local kernel (its config is known without a build), or a file",
                        kernel=entry.name,
                        key="config",
                    )
                elif target is not None:
                    source = dataclasses.replace(entry.source, base_kernel=target)
                    entry = dataclasses.replace(entry, source=source)
            resolved.append(entry)
        return resolved

    def kernels(self, table: object) -> list[KernelEntry]:
        example = (
            '[kernels."my-build"] with vmlinuz = "path/to/bzImage" '
            f'or debian_package = "{_EXAMPLE_PACKAGE}"'
        )
        if table is None:
            self.problem(f"has no kernels: the [kernels] table is missing; add one, e.g. {example}")
            return []
        if not isinstance(table, dict):
            self.problem(
                f"must be a table of kernels, got {_got(table)}; write one table per kernel, "
                f"e.g. {example}",
                key="kernels",
            )
            return []
        if not table:
            self.problem(f"has no kernels: [kernels] is empty; add one, e.g. {example}")
        entries = []
        for name, value in table.items():
            entry = self.kernel(name, value)
            if entry is not None:
                entries.append(entry)
        return entries

    def kernel(self, name: str, table: object) -> KernelEntry | None:
        if not name:
            self.problem(
                f'has an empty name; give it one: [kernels."my-kernel"] ({_NAME_RULE})', kernel=name
            )
        elif not _NAME_RE.match(name):
            self.problem(
                f"name is not valid: names are used in test ids and file names, so {_NAME_RULE}; "
                f'e.g. [kernels."{_sanitize(name)}"]',
                kernel=name,
            )
        if not isinstance(table, dict):
            self.names.append(name)
            self.problem(
                f'must be a table, got {_got(table)}; write it as [kernels."{name}"] followed '
                'by debian_package = "..." or vmlinuz = "..."',
                kernel=name,
            )
            return None
        if not any(key in _KERNEL_KEYS for key in table):
            split = list(_split_names(name, table))
            if split:
                self.names.extend(split)
                # An unquoted dot in a table header nests tables instead of naming one kernel.
                for full in split:
                    self.problem(
                        f"looks like kernel {full!r} split at its dots: quote the name in the "
                        f'table header: [kernels."{full}"]',
                        kernel=name,
                    )
                return None
        self.names.append(name)

        for key, value in table.items():
            if key in _KERNEL_KEYS:
                continue
            hint = (
                _did_you_mean(key, _KERNEL_KEYS, n=1) or f"; known keys: {_listing(_KERNEL_KEYS)}"
            )
            if isinstance(value, dict):
                hint += f'; if "{name}.{key}" is a kernel name, quote it: [kernels."{name}.{key}"]'
            self.problem(f"is not known{hint}", kernel=name, key=key)

        tags = self.tags_of[name] = self.tags(name, table.get("tags", []))
        cmdline = self.string(name, table, "cmdline", 'cmdline = "loglevel=7"')
        if "\n" in cmdline or "\r" in cmdline:
            self.problem(
                "must be one line (the kernel command line has no newlines); join the parts "
                "with spaces",
                kernel=name,
                key="cmdline",
            )
        note = self.string(name, table, "note", 'note = "what this kernel is for"')
        source = self.source(name, table)
        if source is None:
            return None
        return KernelEntry(
            name=name, source=source, tags=tags, cmdline=cmdline, note=note, origin=self.path
        )

    def source(self, name: str, table: dict[str, object]) -> KernelSource | None:
        has_package, has_vmlinuz = "debian_package" in table, "vmlinuz" in table
        kinds = [key for key in ("debian_package", "vmlinuz", *_SOURCE_KEYS) if key in table]
        if len(kinds) > 1:
            self.problem(
                f"has both {' and '.join(kinds)}; keep one: a kernel comes from a Debian package "
                "(debian_package), local files (vmlinuz) or a source tree (tree or linux_source)",
                kernel=name,
            )
            return None
        if not any(key in table for key in _SOURCE_KEYS):
            for key in _SOURCE_ONLY_KEYS:
                if key in table:
                    self.problem(
                        "only applies to kernels built from source (tree = ... or "
                        'linux_source = "linux-source-6.1"): remove it',
                        kernel=name,
                        key=key,
                    )
        if "debug_symbols" in table and not has_package:
            self.problem(
                "only applies to Debian packages (debian_package = ...): it fetches the "
                "matching -dbg package; for a source kernel write debug_info = true",
                kernel=name,
                key="debug_symbols",
            )
        if any(key in table for key in _SOURCE_KEYS):
            return self.source_tree(name, table)
        if has_package:
            for key in _LOCAL_ONLY_KEYS:
                if key in table:
                    self.problem(
                        "only applies to local kernels (vmlinuz = ...); a Debian package brings "
                        "its own modules, config and System.map: remove it",
                        kernel=name,
                        key=key,
                    )
            found = self.package(name, table["debian_package"])
            debug = table.get("debug_symbols", False)
            if not isinstance(debug, bool):
                self.problem(
                    f"must be true or false, got {_got(debug)}; write debug_symbols = true",
                    kernel=name,
                    key="debug_symbols",
                )
            elif found is not None and debug:
                found = dataclasses.replace(found, debug_symbols=True)
            return found
        if has_vmlinuz:
            vmlinuz = self.local_path(name, "vmlinuz", table["vmlinuz"], "file")
            optional = {
                key: self.local_path(name, key, table[key], "dir" if key == "modules" else "file")
                for key in _LOCAL_ONLY_KEYS
                if key in table
            }
            if vmlinuz is None:
                return None
            return LocalFiles(
                vmlinuz=vmlinuz,
                modules=optional.get("modules"),
                config=optional.get("config"),
                system_map=optional.get("system_map"),
            )
        self.problem(
            f'has no source; add debian_package = "{_EXAMPLE_PACKAGE}" (a Debian kernel '
            'package), vmlinuz = "path/to/bzImage" (a kernel you built) or tree = "path/to/linux" '
            "(a kernel tree the harness builds)",
            kernel=name,
        )
        return None

    def source_tree(self, name: str, table: dict[str, object]) -> SourceTree | None:
        for key in ("modules", "system_map"):
            if key in table:
                self.problem(
                    "only applies to local kernels (vmlinuz = ...); a kernel built from source "
                    "gets its modules and System.map from the build: remove it",
                    kernel=name,
                    key=key,
                )
        tree: Path | None = None
        package = ""
        if "tree" in table:
            tree = self.local_path(name, "tree", table["tree"], "dir")
            if tree is None:
                return None
            if not (tree / "Makefile").is_file() or not (tree / "Kconfig").is_file():
                self.problem(
                    f"is {table['tree']!r}: {tree} has no Makefile and Kconfig at its top; point "
                    "it at the top of a Linux kernel tree",
                    kernel=name,
                    key="tree",
                )
                return None
        else:
            value = table["linux_source"]
            if not isinstance(value, str) or not _SOURCE_PACKAGE_RE.match(value):
                self.problem(
                    f"is {_got(value)}, which is not a Debian kernel source package; write "
                    'linux_source = "linux-source-6.1" (apt-cache search --names-only '
                    "'^linux-source-' lists them)",
                    kernel=name,
                    key="linux_source",
                )
                return None
            package = value
        config, config_file = self.base_config(name, table.get("config", MINIMAL_CONFIG))
        fragments = self.fragments(name, table.get("fragments", []))
        debug_info = table.get("debug_info", False)
        if not isinstance(debug_info, bool):
            self.problem(
                f"must be true or false, got {_got(debug_info)}; write debug_info = true",
                kernel=name,
                key="debug_info",
            )
            debug_info = False
        if config is None or fragments is None:
            return None
        if config.startswith("kernel:"):
            self.base_of[name] = config.removeprefix("kernel:")
        return SourceTree(
            tree=tree,
            package=package,
            config=config,
            config_file=config_file,
            fragments=fragments,
            debug_info=debug_info,
        )

    def base_config(self, name: str, value: object) -> tuple[str | None, Path | None]:
        fix = (
            f'write config = "{MINIMAL_CONFIG}" (the harness\'s minimal kernel), "defconfig" '
            '(or another make target), "kernel:NAME" (the config of kernel NAME) or a file path'
        )
        if not isinstance(value, str) or not value.strip():
            self.problem(
                f"must be a non-empty string, got {_got(value)}; {fix}", kernel=name, key="config"
            )
            return None, None
        if value == MINIMAL_CONFIG or _CONFIG_TARGET_RE.match(value):
            return value, None
        if value.startswith("kernel:"):
            if not _NAME_RE.match(value.removeprefix("kernel:")):
                self.problem(
                    f"is {value!r}, which names no kernel; {fix}", kernel=name, key="config"
                )
                return None, None
            return value, None
        path = self.local_path(name, "config", value, "file")
        return (None, None) if path is None else ("file", path)

    def fragments(self, name: str, value: object) -> tuple[Path, ...] | None:
        fix = (
            'write fragments = ["debug", "path/to/extra.config"] (a name is a fragment shipped '
            f"with the harness: {_listing(shipped_fragments())})"
        )
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(
                f"must be a list of strings, got {_got(value)}; {fix}", kernel=name, key="fragments"
            )
            return None
        paths: list[Path] = []
        for item in value:
            if _FRAGMENT_NAME_RE.match(item) and not (self.base / item).exists():
                shipped = SHIPPED_FRAGMENTS / f"{item}.config"
                if not shipped.is_file():
                    self.problem(
                        f"has {item!r}, which is neither a file nor a shipped fragment"
                        f"{_did_you_mean(item, shipped_fragments())}; {fix}",
                        kernel=name,
                        key="fragments",
                    )
                    return None
                paths.append(shipped)
                continue
            path = self.local_path(name, "fragments", item, "file")
            if path is None:
                return None
            paths.append(path)
        return tuple(paths)

    def package(self, name: str, value: object) -> DebianPackage | None:
        fix = f'write debian_package = "{_EXAMPLE_PACKAGE}"'
        if not isinstance(value, str):
            self.problem(
                f"must be a string, got {_got(value)}; {fix}", kernel=name, key="debian_package"
            )
            return None
        if not _IMAGE_PACKAGE_RE.match(value) or value.endswith("-dbg"):
            self.problem(
                f"is {value!r}, which does not look like a Debian kernel image package "
                "(linux-image-<version>-<flavour>, not a meta-package or -dbg); "
                f"{fix}; apt-cache search --names-only '^linux-image-[0-9]' lists them",
                kernel=name,
                key="debian_package",
            )
            return None
        return DebianPackage(value)

    def local_path(
        self, name: str, key: str, value: object, kind: Literal["file", "dir"]
    ) -> Path | None:
        fix = f'write {key} = "path/to/{"folder" if kind == "dir" else "file"}"'
        if not isinstance(value, str):
            self.problem(f"must be a string path, got {_got(value)}; {fix}", kernel=name, key=key)
            return None
        if not value.strip():
            self.problem(f"must not be empty; {fix} or remove the key", kernel=name, key=key)
            return None
        try:
            given = Path(value).expanduser()
        except RuntimeError as error:  # '~' with no home directory, or an unknown '~user'
            self.problem(f"is {value!r}, which cannot be expanded: {error}", kernel=name, key=key)
            return None
        resolved = (self.base / given).resolve()
        origin = (
            ""
            if given.is_absolute()
            else f" (relative to {self.base}, the folder of {self.path.name})"
        )
        if not resolved.exists():
            self.problem(
                f"is {value!r}: {resolved}{origin} does not exist; fix the path, or build it first",
                kernel=name,
                key=key,
            )
            return None
        if kind == "dir" and not resolved.is_dir():
            what = (
                "the top of a Linux kernel tree"
                if key == "tree"
                else "the folder holding modules.dep and kernel/ (e.g. .../lib/modules/RELEASE)"
            )
            self.problem(
                f"is {value!r}: {resolved}{origin} is not a folder; point it at {what}",
                kernel=name,
                key=key,
            )
            return None
        if kind == "file" and not resolved.is_file():
            self.problem(
                f"is {value!r}: {resolved}{origin} is not a file; point it at the file itself",
                kernel=name,
                key=key,
            )
            return None
        return resolved

    def tags(self, name: str, value: object) -> tuple[str, ...]:
        fix = 'write tags = ["a", "b"]'
        if not isinstance(value, list):
            self.problem(
                f"must be a list of strings, got {_got(value)}; {fix}", kernel=name, key="tags"
            )
            return ()
        tags: list[str] = []
        for position, tag in enumerate(value, start=1):
            if not isinstance(tag, str):
                self.problem(
                    f"must be a list of strings, got {_got(tag)} at position {position}; {fix}",
                    kernel=name,
                    key="tags",
                )
            elif not _NAME_RE.match(tag):
                self.problem(
                    f"has tag {tag!r}, which is not valid: tags are selectors, so {_NAME_RULE}",
                    kernel=name,
                    key="tags",
                )
            elif tag not in tags:  # repeats are harmless: drop them (see module docstring)
                tags.append(tag)
        return tuple(tags)

    def string(self, name: str, table: dict[str, object], key: str, example: str) -> str:
        value = table.get(key, "")
        if isinstance(value, str):
            return value
        self.problem(f"must be a string, got {_got(value)}; write {example}", kernel=name, key=key)
        return ""

    def default(self, names: list[str]) -> str:
        if "default" not in self.data:
            # Documented rule: without a default, the first kernel in the file is the default.
            return names[0] if names else ""
        value = self.data["default"]
        if not isinstance(value, str):
            example = names[0] if names else "NAME"
            self.problem(
                f'must be a kernel name, got {_got(value)}; write default = "{example}"',
                key="default",
            )
            return ""
        if names and value not in names:
            self.problem(
                f"is {value!r}, which is not a kernel in this file{_did_you_mean(value, names)}; "
                f"known kernels: {_listing(names)}",
                key="default",
            )
        return value

    def cross_check(self, default: str) -> None:
        names = set(self.names)
        for name, tags in self.tags_of.items():
            for tag in tags:
                if tag in names and tag != name:
                    self.problem(
                        f"has tag {tag!r}, which is also the name of kernel {tag!r}, so selecting "
                        f"{tag!r} would be ambiguous; rename the tag or that kernel",
                        kernel=name,
                        key="tags",
                    )
            # An unknown default is reported on its own; do not blame the tag for it too.
            if "default" in tags and default in names and name != default:
                self.problem(
                    f"has tag 'default' but the default kernel is {default!r}; remove the tag, "
                    f'or set default = "{name}"',
                    kernel=name,
                    key="tags",
                )


def shipped_fragments() -> list[str]:
    """Names of the config fragments shipped with the harness (``minimal``, ``debug``...)."""
    return sorted(path.stem for path in SHIPPED_FRAGMENTS.glob("*.config"))


def _split_names(prefix: str, table: dict[str, object], depth: int = 0) -> Iterable[str]:
    """Dotted names under ``prefix`` whose tables hold kernel keys ([kernels.a.b] -> 'a.b')."""
    for key, value in table.items():
        if not isinstance(value, dict):
            continue
        full = f"{prefix}.{key}"
        if any(k in _KERNEL_KEYS for k in value):
            yield full
        elif depth < 8:
            yield from _split_names(full, value, depth + 1)


def _did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    close = difflib.get_close_matches(word, list(choices), n=n)
    return f"; did you mean {_or(close)}?" if close else ""


def _or(words: Sequence[str]) -> str:
    quoted = [repr(word) for word in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _listing(words: Iterable[str]) -> str:
    return ", ".join(repr(word) for word in words) or "(none)"


def _sanitize(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).lstrip(".-")
    return cleaned or "my-kernel"


def _got(value: object) -> str:
    """A TOML-like rendering of a wrong value and its type, for 'got ...' messages."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    if isinstance(value, str):
        return f"{json.dumps(value)} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"{value} (a {type(value).__name__})"
