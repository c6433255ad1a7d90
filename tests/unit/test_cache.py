"""build_once: built at most once across processes, never seen half-built."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from harness import cache


def _slow_build(target: str, log: str) -> None:
    def build(partial: Path) -> None:
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        partial.mkdir()
        time.sleep(0.5)
        (partial / "done").write_text("yes")

    cache.build_once(Path(target), build)


def test_two_processes_build_the_same_entry_once(tmp_path: Path) -> None:
    target, log = tmp_path / "entry", tmp_path / "builds.log"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_slow_build, args=(str(target), str(log))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert len(log.read_text().split()) == 1
    assert (target / "done").read_text() == "yes"


def test_a_failed_build_leaves_nothing_that_counts(tmp_path: Path) -> None:
    target = tmp_path / "entry"

    def crash(partial: Path) -> None:
        partial.write_text("half")
        raise RuntimeError("download interrupted")

    with pytest.raises(RuntimeError):
        cache.build_once(target, crash)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    assert cache.build_once(target, lambda partial: partial.write_text("whole")) is True
    assert target.read_text() == "whole"
    assert cache.build_once(target, lambda partial: partial.write_text("again")) is False


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    assert cache.cache_root() == tmp_path / "xdg" / "bootharness"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_digest_separates_parts() -> None:
    assert cache.digest(["ab", "c"]) != cache.digest(["a", "bc"])
    assert cache.digest([b"x"]) == cache.digest(["x"])
