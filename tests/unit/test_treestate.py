"""harness.kernel.treestate: a tree's state changes when and only when its content does."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.kernel import treestate
from harness.outcome import ConfigError


def git(tree: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), *args], check=True, capture_output=True, text=True
    ).stdout


def make_repo(tree: Path) -> str:
    tree.mkdir()
    (tree / "Makefile").write_text("all:\n")
    (tree / "init").mkdir()
    (tree / "init" / "main.c").write_text("int x = 1;\n")
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return git(tree, "rev-parse", "HEAD").strip()


def test_git_state_is_the_commit_and_a_digest_of_changes(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    commit = make_repo(tree)
    clean = treestate.state_of(tree, tmp_path / "digests")
    assert clean.key == f"git:{commit}" and clean.commit == commit and not clean.dirty
    assert clean.label == commit[:12]

    (tree / "init" / "main.c").write_text("int x = 2;\n")  # a one-line change
    edited = treestate.state_of(tree, tmp_path / "digests")
    assert edited.commit == commit and edited.dirty and edited.key != clean.key
    assert edited.label == f"{commit[:12]}+dirty-{edited.dirty[:8]}"

    (tree / "new.c").write_text("int y;\n")  # an untracked file counts too
    untracked = treestate.state_of(tree, tmp_path / "digests")
    assert untracked.key not in (clean.key, edited.key)

    (tree / "new.c").unlink()
    (tree / "init" / "main.c").write_text("int x = 1;\n")
    assert treestate.state_of(tree, tmp_path / "digests") == clean


def test_a_repository_without_commits_is_a_config_error(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    tree.mkdir()
    git(tree, "init", "-q")
    with pytest.raises(ConfigError, match="rev-parse"):
        treestate.state_of(tree, tmp_path / "digests")


def test_content_digest_follows_content_not_timestamps(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    (tree / "init").mkdir(parents=True)
    (tree / "Makefile").write_text("all:\n")
    (tree / "init" / "main.c").write_text("int x = 1;\n")
    digests = tmp_path / "digests"
    first = treestate.state_of(tree, digests)
    assert first.key.startswith("content:") and first.label.startswith("content-")
    assert list(digests.iterdir()), "per-file digests are remembered"

    (tree / "init" / "main.c").write_text("int x = 1;\n")  # same bytes, new mtime
    assert treestate.state_of(tree, digests) == first
    (tree / "init" / "main.c").write_text("int x = 2;\n")
    changed = treestate.state_of(tree, digests)
    assert changed != first
    (tree / "init" / "main.c").chmod(0o755)  # the mode is content too
    assert treestate.state_of(tree, digests) != changed
    (tree / "init" / "main.c").chmod(0o644)
    (tree / "init" / "main.c").write_text("int x = 1;\n")
    assert treestate.state_of(tree, digests) == first
