"""Render init scripts from Jinja2 templates, safely.

Template values are data, not code: every ``{{ value }}`` is shell-quoted unless the template
says otherwise with ``|raw`` (for snippets of shell code a test passes in on purpose). An
undefined variable is an error, not an empty string, and every rendered script must pass
``sh -n`` under the same busybox shell that will run it, so a broken template fails at build
time with its name and line instead of as a kernel panic minutes later.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import lazyimport, tools
from harness.outcome import ConfigError

if TYPE_CHECKING:
    import jinja2
else:  # only rendering needs it: a warm boot reads a template's declarations, renders nothing
    jinja2 = lazyimport.module("jinja2")

log = logging.getLogger(__name__)

# Shipped as package data (harness/data), so an installed wheel finds them too.
BUILTIN_TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "initrd_templates"
TEMPLATES_ENV = "BOOTHARNESS_TEMPLATES"
DEFAULT_TEMPLATE = "init.sh.j2"


class TemplateError(ConfigError):
    """A template could not be found, rendered, or rendered into a valid script."""


class Raw(str):
    """A string already fit for the shell; the auto-quoting leaves it alone."""

    __slots__ = ()


def shell_quote(value: object) -> Raw:
    """Quote one value as a single shell word."""
    if isinstance(value, Raw):
        return value
    return Raw(shlex.quote(str(value)))


def shell_words(values: Iterable[object]) -> Raw:
    """Quote each value and join them with spaces: a list becomes several shell words."""
    return Raw(" ".join(shell_quote(value) for value in values))


def raw(value: object) -> Raw:
    """Mark a value as shell code, to be inserted unquoted. Use only for code, never data."""
    return Raw(str(value))


def _finalize(value: object) -> object:
    # Jinja calls this on the result of every {{ expression }}: quoting here makes
    # "safe by default" hold for every template, including users' own.
    return shell_quote(value)


def template_dirs(extra: Sequence[Path] = ()) -> list[Path]:
    """Where templates are looked up, first match wins: explicit folders, then
    $BOOTHARNESS_TEMPLATES (colon-separated), then the shipped initrd_templates/."""
    dirs = [Path(p) for p in extra]
    env = os.environ.get(TEMPLATES_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(BUILTIN_TEMPLATES)
    return dirs


def check_folders(extra_dirs: Sequence[Path]) -> None:
    """Raises TemplateError when a template folder the caller named does not exist."""
    for folder in extra_dirs:
        if not Path(folder).is_dir():
            raise TemplateError(f"template folder {folder} does not exist")


def environment(extra_dirs: Sequence[Path] = ()) -> jinja2.Environment:
    """The Jinja2 environment: strict undefined, auto shell-quoting, filters q/words/raw."""
    check_folders(extra_dirs)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in template_dirs(extra_dirs)]),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = shell_quote
    env.filters["words"] = shell_words
    env.filters["raw"] = raw
    return env


def render(
    template: str,
    variables: Mapping[str, Any],
    *,
    extra_dirs: Sequence[Path] = (),
    check_syntax: bool = True,
) -> str:
    """Render ``template`` with ``variables`` and check the result with ``sh -n``.

    Raises:
        TemplateError: unknown template, undefined variable, Jinja syntax error, or a
            rendered script that the shell rejects; the message names the template.
    """
    env = environment(extra_dirs)
    try:
        text = env.get_template(template).render(**variables)
    except jinja2.TemplateNotFound as error:
        searched = ", ".join(str(d) for d in template_dirs(extra_dirs))
        raise TemplateError(
            f"init template {error.name!r} not found in: {searched}; "
            f"pass a template folder or use one of: {', '.join(list_templates(extra_dirs))}"
        ) from error
    except jinja2.UndefinedError as error:
        raise TemplateError(
            f"init template {template!r}: {error.message}; pass it as a template variable"
        ) from error
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(
            f"init template {error.filename or template}:{error.lineno}: {error.message}"
        ) from error
    if check_syntax:
        check_shell_syntax(text, name=template)
    return text


# A template declares settings for the harness in a Jinja comment of its own, which renders
# to nothing: ``{# bootharness: markers=off #}``.
_DECLARATION = re.compile(r"\{#-?\s*bootharness:(?P<body>[^#]*?)-?#\}")


def declarations(template: str, *, extra_dirs: Sequence[Path] = ()) -> dict[str, str]:
    """The ``{# bootharness: key=value ... #}`` settings ``template`` declares in its source.

    Raises:
        TemplateError: the template cannot be found, or a declaration is not key=value.
    """
    source = template_source(template, extra_dirs=extra_dirs)
    settings: dict[str, str] = {}
    for match in _DECLARATION.finditer(source):
        for word in match.group("body").split():
            key, sep, value = word.partition("=")
            if not sep or not key:
                raise TemplateError(
                    f"init template {template!r}: declaration {word!r} is not key=value "
                    "(e.g. {# bootharness: markers=off #})"
                )
            settings[key] = value
    return settings


def template_source(template: str, *, extra_dirs: Sequence[Path] = ()) -> str:
    """The source of ``template`` from the first folder that has it, as the renderer's loader
    finds it (``/``-separated, no ``..``), read without Jinja2.

    Raises:
        TemplateError: a named folder does not exist, or no folder has the template.
    """
    check_folders(extra_dirs)
    folders = template_dirs(extra_dirs)
    pieces = [piece for piece in template.split("/") if piece and piece != "."]
    if all(piece != ".." and os.path.sep not in piece for piece in pieces):
        for folder in folders:
            path = folder.joinpath(*pieces)
            if pieces and path.is_file():
                return path.read_text(encoding="utf-8")
    searched = ", ".join(str(d) for d in folders)
    raise TemplateError(f"init template {template!r} not found in: {searched}")


def prints_markers(template: str, *, extra_dirs: Sequence[Path] = ()) -> bool:
    """Whether the init rendered from ``template`` prints the harness's markers: yes unless
    it declares ``{# bootharness: markers=off #}`` (a user's own init; see harness.vm.patterns).

    Raises:
        TemplateError: the template cannot be found, or ``markers`` is neither on nor off.
    """
    value = declarations(template, extra_dirs=extra_dirs).get("markers", "on")
    if value not in ("on", "off"):
        raise TemplateError(f"init template {template!r}: markers={value!r}: use on or off")
    return value == "on"


def list_templates(extra_dirs: Sequence[Path] = ()) -> list[str]:
    """Names of the templates that can be rendered (``*.j2`` files)."""
    names: set[str] = set()
    for folder in template_dirs(extra_dirs):
        if folder.is_dir():
            names.update(p.name for p in folder.glob("*.j2"))
    return sorted(names)


def check_shell_syntax(script: str, *, name: str) -> None:
    """Run ``busybox sh -n`` on ``script``: the shell that runs /init is busybox ash.

    Raises:
        TemplateError: with the shell's own message and the offending line.
    """
    busybox = tools.require("busybox")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as handle:
        handle.write(script)
        path = handle.name
    try:
        result = subprocess.run(
            [busybox, "sh", "-n", path], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(path)
    if result.returncode != 0:
        message = result.stderr.strip().replace(path, name)
        raise TemplateError(
            f"init template {name!r} renders a script that `sh -n` rejects: {message}"
        )


ALL = "all"


def select(selectors: Sequence[str]) -> list[str]:
    """Template file names for ``selectors`` (``init.sh`` or ``init.sh.j2``; ``all``).

    Raises:
        ConfigError: unknown templates, listed with the known ones.
    """
    known = list_templates()
    if not selectors:
        return [DEFAULT_TEMPLATE]
    if ALL in selectors:
        return known
    chosen: list[str] = []
    unknown: list[str] = []
    for name in selectors:
        full = name if name.endswith(".j2") else f"{name}.j2"
        (chosen if full in known else unknown).append(full)
    if unknown:
        raise ConfigError(
            f"unknown init template(s) {', '.join(map(repr, unknown))}; "
            f"use {ALL} or any of: {', '.join(known)} (folders: $BOOTHARNESS_TEMPLATES)"
        )
    return list(dict.fromkeys(chosen))
