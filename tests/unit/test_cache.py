"""build_once: built at most once across processes, never seen half-built."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import cache, manifest


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


# -- manifests: every entry is checked on use and rebuilt when damaged


def counting_build(content: bytes) -> tuple[list[int], Callable[[Path], None]]:
    calls: list[int] = []

    def build(partial: Path) -> None:
        calls.append(1)
        partial.write_bytes(content)

    return calls, build


def test_a_built_file_gets_a_manifest_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "image.cpio"
    calls, build = counting_build(b"x" * 300_000)
    assert cache.build_once(target, build) is True
    made = manifest.read(target)
    assert made.files[""].size == 300_000
    assert manifest.location(target).name == "image.cpio" + manifest.SIDECAR_SUFFIX
    assert cache.check(target, full=True) == []
    assert cache.build_once(target, build) is False and len(calls) == 1


def test_a_truncated_file_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    target = tmp_path / "vmlinux"
    calls, build = counting_build(b"\x7fELF" + bytes(range(256)) * 1000)
    cache.build_once(target, build)
    with target.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.warns(cache.CacheCorruptWarning, match="1000 bytes, the manifest says 256004"):
        assert cache.build_once(target, build) is True
    assert len(calls) == 2 and target.stat().st_size == 256004
    assert cache.check(target, full=True) == []


def test_a_flipped_byte_is_found_by_the_sample_or_the_full_check(tmp_path: Path) -> None:
    target = tmp_path / "image"
    calls, build = counting_build(bytes(1_000_000))
    cache.build_once(target, build)
    times = target.stat()
    with target.open("r+b") as handle:  # at the start: inside the sampled blocks
        handle.write(b"\x01")
    os.utime(target, ns=(times.st_atime_ns, times.st_mtime_ns))  # same size, same time
    with pytest.warns(cache.CacheCorruptWarning, match="sampled content differs"):
        cache.build_once(target, build)
    assert len(calls) == 2
    with target.open("r+b") as handle:  # outside the samples: only the full check sees it
        handle.seek(200_000)
        handle.write(b"\x01")
    os.utime(target, ns=(times.st_atime_ns, target.stat().st_mtime_ns))
    assert cache.check(target, full=True) == [
        f"{target}: content differs from the manifest's digest"
    ]


def test_a_folder_entry_keeps_its_manifest_inside(tmp_path: Path) -> None:
    target = tmp_path / "tree"

    def build(partial: Path) -> None:
        (partial / "boot").mkdir(parents=True)
        (partial / "boot" / "vmlinuz").write_bytes(b"k" * 5000)
        (partial / "link").symlink_to("boot/vmlinuz")

    cache.build_once(target, build)
    assert (target / manifest.FOLDER_MANIFEST).is_file()
    assert set(manifest.read(target).files) == {"boot/vmlinuz", "link"}
    (target / "boot" / "vmlinuz").write_bytes(b"k" * 10)
    with pytest.warns(cache.CacheCorruptWarning, match="vmlinuz: 10 bytes"):
        assert cache.build_once(target, build) is True
    (target / "link").unlink()
    (target / "link").symlink_to("elsewhere")
    assert cache.check(target) == [
        f"{target / 'link'}: symlink points to elsewhere, not boot/vmlinuz"
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_entry_of_an_older_harness_is_adopted_or_rebuilt(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.write_bytes(b"made before manifests")
    _, build = counting_build(b"new")
    # No check to pass: rebuilt, with a warning naming why.
    with pytest.warns(cache.CacheCorruptWarning, match="no manifest"):
        cache.build_once(old, build)
    assert old.read_bytes() == b"new"

    kept = tmp_path / "kept"
    kept.write_bytes(b"made before manifests")
    assert cache.build_once(kept, build, adopt=lambda path: None) is False
    assert kept.read_bytes() == b"made before manifests" and manifest.read(kept).files[""].size

    bad = tmp_path / "bad"
    bad.write_bytes(b"half")

    def refuse(path: Path) -> None:
        raise ValueError("cut short")

    with pytest.warns(cache.CacheCorruptWarning, match="cut short"):
        cache.build_once(bad, build, adopt=refuse)
    assert bad.read_bytes() == b"new"


def test_content_digest_ignores_sparseness(tmp_path: Path) -> None:
    sparse, full = tmp_path / "sparse", tmp_path / "full"
    with sparse.open("wb") as handle:
        handle.truncate(1 << 20)
        handle.seek(500_000)
        handle.write(b"data")
    full.write_bytes(sparse.read_bytes())
    assert manifest.content_digest(sparse) == manifest.content_digest(full)
