"""Kernel configuration text: read fragments, merge them, and check what survived.

Pure: no I/O beyond what the caller passes in. A fragment is a ``.config`` excerpt: lines
``CONFIG_X=y`` (or ``m``, a number, a string) and ``# CONFIG_X is not set``. Kconfig may
refuse what a fragment asks for (an option whose dependencies are not met, one the tree
does not have, a choice overridden by another): :func:`lost_options` compares what was
asked with the ``.config`` that ``olddefconfig`` wrote, so a build never silently runs
without an option a test relies on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_SET_RE = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)\Z")
_UNSET_RE = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set\Z")

UNSET = "n"  # how an option that is "not set" is represented in a mapping


@dataclass(frozen=True)
class Lost:
    """An option a fragment asked for that the final configuration does not have."""

    option: str
    wanted: str
    got: str  # "n" when the option is not set or unknown to the tree
    fragment: str  # where it was asked for

    def render(self) -> str:
        return f"{self.option}={self.wanted} (from {self.fragment}) ended up {self.got}"


def parse(text: str) -> dict[str, str]:
    """Options of a ``.config`` or fragment: ``CONFIG_X`` -> value, unset ones as ``"n"``.

    Values keep their quotes (``"foo"``) so they can be written back as they were; a later
    line for the same option wins, as in Kconfig.
    """
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        match = _SET_RE.match(line)
        if match:
            options[match.group(1)] = match.group(2).strip()
            continue
        match = _UNSET_RE.match(line)
        if match:
            options[match.group(1)] = UNSET
    return options


def merge(base: str, fragments: Iterable[str]) -> str:
    """``base`` with each fragment's options applied in order (what merge_config.sh -m does).

    An option a fragment sets is removed from where it was and appended at the end, so in a
    choice (SLAB/SLUB/SLOB, the unwinders) the member a fragment turns on comes after the
    base's and wins when Kconfig reads the file (the last ``=y`` of a choice does).
    """
    wanted: dict[str, str] = {}
    for fragment in fragments:
        wanted.update(parse(fragment))
    lines = []
    for raw in base.splitlines():
        line = raw.strip()
        match = _SET_RE.match(line) or _UNSET_RE.match(line)
        if not (match and match.group(1) in wanted):
            lines.append(raw)
    lines += [_line(option, value) for option, value in wanted.items()]
    return "\n".join(lines) + "\n"


def _line(option: str, value: str) -> str:
    return f"# {option} is not set" if value == UNSET else f"{option}={value}"


def lost_options(requested: Mapping[str, Mapping[str, str]], final: str) -> list[Lost]:
    """Every option asked for by a fragment that ``final`` (the ``.config``) does not have.

    ``requested`` maps a fragment's name to its parsed options (:func:`parse`), in order; a
    later fragment's value for an option replaces an earlier one's.
    """
    asked: dict[str, tuple[str, str]] = {}
    for name, options in requested.items():
        for option, value in options.items():
            asked[option] = (value, name)
    got = parse(final)
    lost = []
    for option, (value, name) in asked.items():
        have = got.get(option, UNSET)
        if have != value:
            lost.append(Lost(option, value, have, name))
    return lost
