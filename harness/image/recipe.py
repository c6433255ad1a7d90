"""Which image an initramfs spec builds, remembered between runs (the warm path of a build).

Finding a cached image the slow way means doing everything but the write: render the
template (and check it with ``sh -n``), parse the kernel's config and module index, read
busybox and list its applets, read every module and hash every entry, ~0.1-0.2 s on the
machines we measured, in every process. A recipe record keeps the answer: under a key made of
the spec and the kernel, the image's path, digest, modules and /init, valid while every file
it was made from (kernel config, modules.dep, module files, busybox, the template folders and
their files, the spec's own files, and the image itself) keeps its identity
(:func:`harness.cache.recall`). A warm build is then one small JSON read and a few ``stat``
calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import cache
from harness.cache import Identity

FORMAT = "bootharness-initramfs-recipe-1"
FOLDER = "recipes"


@dataclass(frozen=True)
class Recipe:
    """Where the record of one spec lives, its key, and its inputs' identities as found
    before the build read them."""

    record: Path
    key: str
    inputs: tuple[Identity, ...]

    def recall(self) -> dict[str, Any] | None:
        """The remembered image (its fields as JSON data), or None."""
        value = cache.recall(self.record, self.key)
        return value if isinstance(value, dict) else None

    def keep(self, value: Mapping[str, Any], more_inputs: Iterable[Identity]) -> None:
        """Remember ``value`` (JSON data), valid only while the recipe's inputs and
        ``more_inputs`` (files the build found on its way, such as the module files, and
        the image it wrote) keep their identity."""
        cache.remember(self.record, self.key, dict(value), [*self.inputs, *more_inputs])


def plain(value: Any) -> Any:
    """``value`` as JSON data (paths as strings), or raise TypeError: a spec whose variables
    are anything else (objects without a stable text) gets no record."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"not plain data: {type(value).__name__}")


def recipe(
    parts: Mapping[str, Any],
    *,
    cache_root: Path,
    files: Iterable[Path],
    folders: Sequence[Path],
    trees: Iterable[Path],
) -> Recipe | None:
    """The recipe of a build described by ``parts`` (JSON-able after :func:`plain`), whose
    result depends on ``files`` (identity taken now; missing ones count as such), the
    ``folders`` (templates: each folder and every file in it), and ``trees`` (the spec's own
    files: every file and folder below each). None when it cannot be recorded."""
    try:
        text = json.dumps({"format": FORMAT, **plain(parts)}, sort_keys=True)
        inputs = [cache.file_identity(path) for path in files]
        for folder in folders:
            if folder.is_dir():
                inputs += [cache.file_identity(p) for p in _below(folder)]
        for tree in trees:
            inputs += [cache.file_identity(p) for p in _below(tree)]
    except (TypeError, ValueError, OSError):
        return None
    key = cache.digest([text])
    return Recipe(cache_root / "initramfs" / FOLDER / f"{key[:32]}.json", key, tuple(inputs))


def _below(root: Path) -> list[Path]:
    """``root`` and everything under it (a folder's identity changes when entries come or go)."""
    if not root.is_dir():
        return [root]
    found = [root]
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        found += [Path(folder, name) for name in sorted([*dirs, *names])]
    return found
