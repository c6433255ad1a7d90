"""The cache's flock locks and its records: a record is used only while its key matches and
every file it was made from is unchanged; a lock excludes other processes and times out."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from harness import cache


def _hold(lock: str, ready: str, seconds: float) -> None:
    with cache.locked(lock):
        Path(ready).write_text("held")
        time.sleep(seconds)


def test_a_lock_held_by_another_process_times_out_then_is_free(tmp_path: Path) -> None:
    lock, ready = tmp_path / "x.lock", tmp_path / "ready"
    holder = multiprocessing.get_context("fork").Process(
        target=_hold, args=(str(lock), str(ready), 1.0)
    )
    holder.start()
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(TimeoutError), cache.locked(lock, timeout=0.2):
        pass
    holder.join(10)
    with cache.locked(lock, timeout=5.0):  # released when the holder ended
        pass


def test_a_lock_dies_with_its_holder(tmp_path: Path) -> None:
    lock, ready = tmp_path / "x.lock", tmp_path / "ready"
    holder = multiprocessing.get_context("fork").Process(
        target=_hold, args=(str(lock), str(ready), 60.0)
    )
    holder.start()
    while not ready.exists():
        time.sleep(0.01)
    holder.kill()
    holder.join(10)
    with cache.locked(lock, timeout=5.0):
        pass


def test_a_record_holds_while_its_inputs_are_unchanged(tmp_path: Path) -> None:
    source, record = tmp_path / "source", tmp_path / "records" / "r.json"
    source.write_text("one")
    cache.remember(record, "k", {"answer": 42}, [cache.file_identity(source)])
    assert cache.recall(record, "k") == {"answer": 42}
    assert cache.recall(record, "other key") is None
    source.write_text("two")  # new size, new times
    assert cache.recall(record, "k") is None


def test_a_record_of_a_file_that_is_gone_or_replaced_is_not_used(tmp_path: Path) -> None:
    source, record = tmp_path / "source", tmp_path / "r.json"
    source.write_text("same")
    cache.remember(record, "k", "v", [cache.file_identity(source)])
    replacement = tmp_path / "new"
    replacement.write_text("same")
    os.replace(replacement, source)  # same content and size, another inode
    assert cache.recall(record, "k") is None
    source.unlink()
    assert cache.recall(record, "k") is None


def test_unreadable_or_unwritable_records_are_only_misses(tmp_path: Path) -> None:
    record = tmp_path / "r.json"
    record.write_text("{not json")
    assert cache.recall(record, "k") is None
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache.remember(blocked / "r.json", "k", "v", [])  # its folder cannot exist: no error
    assert cache.recall(blocked / "r.json", "k") is None


def test_remembered_digest_follows_the_file(tmp_path: Path) -> None:
    source, record = tmp_path / "source", tmp_path / "digest.json"
    source.write_bytes(b"abc")
    first = cache.remembered_digest(source, record)
    assert first == cache.file_digest(source)
    assert cache.recall(record, f"harness.cache.file_digest {source}") == first
    source.write_bytes(b"abcd")
    assert cache.remembered_digest(source, record) == cache.file_digest(source) != first
