"""The state of a kernel tree, as a key: what a build of it depends on.

A git tree is its commit plus a digest of what differs from it (``git diff HEAD`` and the
content of untracked files), so checking out another commit or editing one line gives a new
state, and checking the commit out again gives the old one back. Any other folder is a digest
of the content of every file; per-file digests are kept in the cache keyed by size, mtime and
inode, so only files that changed are read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import cache, tools
from harness.outcome import ConfigError, InfraError

log = logging.getLogger(__name__)

# Folders that never hold sources: version control and editor droppings.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})


@dataclass(frozen=True)
class TreeState:
    """One state of a tree: ``key`` changes when and only when its content does."""

    key: str
    commit: str = ""  # git trees: the full commit id
    dirty: str = ""  # git trees with changes: a digest of the changes

    @property
    def label(self) -> str:
        """Short and readable: ``1a2b3c4d5e6f``, ``1a2b3c4d5e6f+dirty-0a1b2c3d`` or a digest."""
        if self.key.startswith("package:"):
            return self.key.removeprefix("package:")
        if not self.commit:
            return f"content-{self.key.removeprefix('content:')[:12]}"
        return self.commit[:12] + (f"+dirty-{self.dirty[:8]}" if self.dirty else "")


def is_git(tree: Path) -> bool:
    """True when ``tree`` is the top of a git work tree."""
    return (tree / ".git").exists()


def state_of(tree: Path, digests_dir: Path) -> TreeState:
    """The state of ``tree`` now (git, or a content digest with its cache in ``digests_dir``).

    Raises:
        ConfigError: git cannot read the tree (no commit yet, not a repository).
        MissingToolError: git is not installed.
    """
    if is_git(tree):
        return _git_state(tree)
    return TreeState(key="content:" + content_digest(tree, digests_dir))


def _git(tree: Path, *args: str) -> bytes:
    result = subprocess.run(
        [tools.require("git"), "-C", str(tree), *args], capture_output=True, check=False
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise ConfigError(f"{tree}: git {' '.join(args)} failed: {message}")
    return result.stdout


def _git_state(tree: Path) -> TreeState:
    commit = _git(tree, "rev-parse", "--verify", "HEAD").decode().strip()
    status = _git(tree, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if not status:
        return TreeState(key=f"git:{commit}", commit=commit)
    parts: list[bytes | str] = [_git(tree, "diff", "HEAD", "--binary", "--no-ext-diff")]
    for entry in sorted(status.split(b"\0")):
        if entry.startswith(b"?? "):
            relative = entry[3:].decode(errors="surrogateescape")
            path = tree / relative
            parts += [relative, cache.file_digest(path) if path.is_file() else "special"]
    dirty = cache.digest(parts)
    return TreeState(key=f"git:{commit}+{dirty}", commit=commit, dirty=dirty)


def content_digest(tree: Path, digests_dir: Path) -> str:
    """A digest of every file's path, mode and content under ``tree`` (symlinks by target).

    Raises:
        InfraError: the tree cannot be read.
    """
    digests_dir.mkdir(parents=True, exist_ok=True)
    memo_path = digests_dir / (cache.digest([str(tree.resolve())])[:24] + ".json")
    try:
        memo: dict[str, list[object]] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    fresh: dict[str, list[object]] = {}
    hasher = hashlib.sha256()
    try:
        for relative, stat, link in _walk(tree):
            if link is not None:
                entry_digest = "link:" + link
            else:
                stamp: list[object] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
                known = memo.get(relative)
                if known is not None and known[:3] == stamp:
                    entry_digest = str(known[3])
                else:
                    entry_digest = cache.file_digest(tree / relative)
                fresh[relative] = [*stamp, entry_digest]
            executable = "x" if stat.st_mode & 0o111 else "-"
            hasher.update(f"{relative}\0{executable}\0{entry_digest}\n".encode(errors="replace"))
    except OSError as error:
        raise InfraError(f"cannot read the kernel tree {tree}: {error}") from None
    if fresh != memo:
        scratch = memo_path.with_name(memo_path.name + f".{os.getpid()}")
        scratch.write_text(json.dumps(fresh))
        os.replace(scratch, memo_path)
    return hasher.hexdigest()


def _walk(tree: Path) -> list[tuple[str, os.stat_result, str | None]]:
    """Every file under ``tree``, sorted by relative path: (path, stat, symlink target)."""
    found: list[tuple[str, os.stat_result, str | None]] = []
    pending = [""]
    while pending:
        folder = pending.pop()
        with os.scandir(tree / folder if folder else tree) as entries:
            for entry in entries:
                relative = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_symlink():
                    found.append((relative, entry.stat(follow_symlinks=False), os.readlink(entry)))
                elif entry.is_dir():
                    if entry.name not in _SKIP_DIRS:
                        pending.append(relative)
                elif entry.is_file():
                    found.append((relative, entry.stat(), None))
    found.sort(key=lambda item: item[0])
    return found
