"""``bootharness cache verify|prune|du`` (harness.upkeep): what the policy keeps, and only that."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
from filelock import FileLock

from harness import cache, manifest, upkeep
from harness.cli.main import main

DAY = upkeep.DAY


def aged(path: Path, days: float) -> Path:
    """Make ``path`` (and its lock file, its last use) ``days`` old."""
    when = time.time() - days * DAY
    for item in (path, Path(str(path) + cache.LOCK_SUFFIX)):
        if item.exists():
            os.utime(item, (when, when))
    if path.is_dir() and path.parent.name == "runs":
        for child in path.iterdir():
            os.utime(child, (when, when))
    return path


def image(root: Path, name: str, size: int, days: float) -> Path:
    target = root / "initramfs" / name
    cache.build_once(target, lambda partial: partial.write_bytes(os.urandom(size)))
    return aged(target, days)


def run(root: Path, name: str, days: float) -> Path:
    folder = root / "runs" / name
    folder.mkdir(parents=True)
    (folder / "console.log").write_text("boot\n")
    return aged(folder, days)


def snapshot(root: Path, name: str, days: float) -> Path:
    def make(partial: Path) -> None:
        partial.mkdir()
        (partial / "state.mig").write_bytes(os.urandom(4096))
        record = manifest.record_of(partial / "state.mig", manifest.CONTENT)
        data = {"format": "bootharness-snapshot-1", "files": {"state.mig": record.to_json()}}
        (partial / "manifest.json").write_text(json.dumps(data))

    target = root / "snapshots" / name
    cache.build_once(target, make, verify=False)
    return aged(target, days)


def package(root: Path, name: str, days: float) -> Path:
    def make(partial: Path) -> None:
        (partial / "root" / "boot").mkdir(parents=True)
        (partial / "root" / "boot" / "vmlinuz-1").write_bytes(b"k" * 1000)
        (partial / "kernel.json").write_text('{"release": "1", "vmlinuz": "boot/vmlinuz-1"}')

    target = root / "kernels" / "debian" / name
    cache.build_once(target, make)
    deb = target.with_name(name + ".deb")
    cache.build_once(deb, lambda partial: partial.write_bytes(b"deb"))
    vmlinux = target / "vmlinux-abc"
    cache.build_once(vmlinux, lambda partial: partial.write_bytes(b"elf"))
    aged(deb, days + 30)  # read only to unpack again: it lives as long as its tree
    aged(vmlinux, days)
    return aged(target, days)


def names(root: Path) -> set[str]:
    return {entry.path.name for entry in upkeep.entries(root)}


def test_prune_keeps_what_the_policy_says_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    run(root, "old-run", 8)
    run(root, "new-run", 1)
    image(root, "stale.cpio.gz", 1000, 31)
    image(root, "fresh.cpio.gz", 1000, 2)
    snapshot(root, "old-snap", 15)
    snapshot(root, "new-snap", 3)
    package(root, "linux-image-old", 61)
    package(root, "linux-image-used", 1)
    # Debris: an interrupted build, a discarded entry not yet deleted, a lock without entry.
    (root / "initramfs" / ".x.cpio.gz.abcd1234").mkdir()
    (root / "initramfs" / ".discarded-y-1234abcd").write_bytes(b"junk")
    (root / "initramfs" / "gone.cpio.gz.lock").touch()
    for leftover in (root / "initramfs").glob(".*"):
        aged(leftover, 1)
    aged(root / "initramfs" / "gone.cpio.gz.lock", 2)

    report = upkeep.prune(root, upkeep.Policy())

    assert names(root) == {
        "new-run",
        "fresh.cpio.gz",
        "new-snap",
        "linux-image-used",
        "linux-image-used.deb",
        "vmlinux-abc",
    }
    removed = {path.name for path, _ in report.removed}
    assert removed == {
        "old-run",
        "stale.cpio.gz",
        "old-snap",
        "linux-image-old",
        "linux-image-old.deb",
        ".x.cpio.gz.abcd1234",
        ".discarded-y-1234abcd",
        "gone.cpio.gz.lock",
    }
    assert not (root / "initramfs" / "stale.cpio.gz.manifest.json").exists()
    assert not (root / "initramfs" / "stale.cpio.gz.lock").exists()
    assert report.freed > 0


def test_a_size_cap_removes_the_least_recently_used_first_but_never_recent_ones(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    for name, days in (("a", 5), ("b", 4), ("c", 3), ("d", 0.01)):
        image(root, name, 1 << 20, days)
    policy = upkeep.Policy(images_size=int(2.5 * (1 << 20)))
    removed = [path.name for path, _ in upkeep.prune(root, policy).removed]
    # d (used minutes ago) and c are kept; b would pass the cap; a too. Oldest go.
    assert sorted(removed) == ["a", "b"]
    tiny = upkeep.Policy(images_size=1)
    assert [p.name for p, _ in upkeep.prune(root, tiny).removed] == ["c"]
    assert names(root) == {"d"}, "what was used within the hour stays whatever the cap"


def _hold(
    lock: str, ready: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    with FileLock(lock):
        ready.set()
        done.wait(30)


def test_an_entry_being_built_or_used_under_its_lock_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    busy = image(root, "busy", 100, 90)
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(busy) + cache.LOCK_SUFFIX, ready, done))
    holder.start()
    try:
        assert ready.wait(10)
        assert upkeep.prune(root).removed == []
        assert busy.exists()
    finally:
        done.set()
        holder.join(10)
    assert [p.name for p, _ in upkeep.prune(root).removed] == ["busy"]


def test_dry_run_removes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    run(root, "old-run", 30)
    report = upkeep.prune(root, dry_run=True)
    assert [p.name for p, _ in report.removed] == ["old-run"]
    assert (root / "runs" / "old-run").exists()


def test_verify_finds_and_discards_damaged_entries(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    good = image(root, "good", 5000, 0)
    bad = image(root, "bad", 5000, 0)
    snap = snapshot(root, "snap", 0)
    (root / "initramfs" / "legacy").write_bytes(b"no manifest")  # an older harness's entry
    (root / "initramfs" / "legacy.lock").touch()
    with bad.open("r+b") as handle:
        handle.seek(4000)
        handle.write(b"rot")
    (snap / "state.mig").write_bytes(b"short")
    report = upkeep.verify(root)
    assert sorted(p.name for p, _ in report.damaged) == ["bad", "snap"]
    assert report.intact == 1 and [p.name for p in report.unmanaged] == ["legacy"]
    assert good.exists() and not bad.exists() and not snap.exists()


def test_cache_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    image(root, "img", 3000, 0)
    run(root, "old-run", 10)
    assert main(["cache", "du", "--cache", str(root)]) == 0
    out = capsys.readouterr().out
    assert "images" in out and "runs" in out and "free of" in out
    assert main(["cache", "verify", "--cache", str(root)]) == 0
    assert "1 intact, 0 damaged" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache", str(root), "--runs-age", "20"]) == 0
    assert "0 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache", str(root)]) == 0
    assert "removed" in capsys.readouterr().out and not (root / "runs" / "old-run").exists()
    with (root / "initramfs" / "img").open("r+b") as handle:
        handle.truncate(10)
    assert main(["cache", "verify", "--cache", str(root)]) == 1
    assert "DAMAGED" in capsys.readouterr().out


def test_prune_now_runs_at_most_hourly(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    run(root, "old-run", 30)
    assert upkeep.prune_now(root) is not None
    run(root, "older-run", 40)
    assert upkeep.prune_now(root) is None
    assert (root / "runs" / "older-run").exists()


def test_what_the_harness_did_not_build_is_never_pruned(tmp_path: Path) -> None:
    """Only build_once's entries (a lock file beside them) are pruned: a folder of another
    tool's files, old as they may be, stays whole."""
    root = tmp_path / "cache"
    foreign = root / "kernels" / "source" / "tree"
    (foreign / "arch").mkdir(parents=True)
    for path in (foreign / "Makefile", foreign / "arch" / "Kconfig"):
        path.write_text("old\n")
        aged(path, 400)
    aged(foreign, 400)
    package(root, "linux-image-old", 90)
    removed = {path.name for path, _ in upkeep.prune(root).removed}
    assert removed == {"linux-image-old", "linux-image-old.deb"}
    assert (foreign / "arch" / "Kconfig").exists() and (foreign / "Makefile").exists()
