"""Snapshot pieces that need no QEMU: the ready point in the template, the go line and the
rest of the script, content digests, manifests, discarding, mode selection."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.image import templates
from harness.image.initramfs import InitramfsSpec, template_variables
from harness.plugin.fixtures import _snapshot_mode
from harness.snapshot import errors as snapshot_errors
from harness.snapshot import plan as snapshot_plan
from harness.snapshot import restore as snapshot
from harness.snapshot import store as snapshot_store

PAGE = 4096


def render(**variables: Any) -> str:
    spec = InitramfsSpec(variables=variables)
    return templates.render("init.sh.j2", template_variables(spec, ["/lib/modules/x/a.ko"]))


def test_ready_point_renders_a_wait_for_the_host_and_the_separator() -> None:
    script = render(ready_point=True, commands=["echo one", "echo two"])
    head, rest = snapshot_plan.split_script(script, template="init.sh.j2")
    assert head.endswith(snapshot_plan.READY_SEPARATOR)
    # The shared part loads modules, waits for the go line; the test's part runs its commands.
    assert "insmod /lib/modules/x/a.ko" in head and "mark READY" in head
    assert "read -r go_word go_nonce" in head and "nonce=$go_nonce" in head
    assert "echo one" not in head and "echo one" in rest
    # The success marker and the `after` action are a function of the shared part: the rest
    # only calls it.
    assert "finish() {" in head and "mark PASS" in head and rest.rstrip().endswith("finish")
    assert head.index("mark DEVICES-READY") < head.index("mark READY")
    # Shared code is defined before the ready point; what the rest sends stays small (each
    # byte crosses the emulated UART at every restore).
    assert "find_root() {" in head and "find_root() {" not in rest
    assert len(rest.encode()) < 250, rest  # two commands and the call
    # Before any disk is mounted: root handling is in the test's part, when there is a root.
    assert "find_root ||" not in rest
    rooted_head, rooted_rest = snapshot_plan.split_script(
        render(ready_point=True, root="LABEL=x", commands=[]), template="init.sh.j2"
    )
    assert "find_root ||" not in rooted_head and "find_root ||" in rooted_rest


def test_without_ready_point_the_script_is_what_it_was() -> None:
    plain = render(commands=["echo one"])
    assert "mark READY" not in plain and snapshot_plan.READY_SEPARATOR not in plain
    assert render(commands=["echo one"], ready_point=False) == plain
    with pytest.raises(snapshot_errors.SnapshotUnsupported, match="no ready point"):
        snapshot_plan.split_script(plain, template="init.sh.j2")


def test_commands_do_not_change_the_shared_part() -> None:
    first = snapshot_plan.split_script(render(ready_point=True, commands=["true"]), template="t")
    second = snapshot_plan.split_script(
        render(ready_point=True, commands=["false", "x"]), template="t"
    )
    assert first[0] == second[0]
    assert first[1] != second[1]


def test_go_line_carries_nonce_time_randomness_and_the_rest_size() -> None:
    rest = "echo a\necho \u00e9"  # the size counts bytes, not characters
    line = snapshot_plan.go_line("abc123", rest)
    word, nonce, epoch, seed, random, size = line.split()
    assert line.endswith("\n") and word == "GO" and nonce == "abc123"
    assert abs(int(epoch) - time.time()) <= 2
    assert re.fullmatch(r"[0-9a-f]{64}", seed)
    assert 0 <= int(random) < 32768
    assert int(size) == len(snapshot_plan.rest_message(rest).encode()) == len(rest.encode()) + 1
    assert snapshot_plan.go_line("abc123", rest).split()[3] != seed


def test_rest_message_is_whole_lines() -> None:
    assert snapshot_plan.rest_message("echo a\necho b") == "echo a\necho b\n"
    assert snapshot_plan.rest_message("echo a\n") == "echo a\n"


def test_nonce_is_left_out_of_the_key_cmdline() -> None:
    cmdline = "console=ttyS0 bootharness.nonce=0123abcd quiet"
    assert snapshot_plan._without_nonce(cmdline) == "console=ttyS0 quiet"


def _write_sparse(path: Path, pages: dict[int, bytes], size_pages: int) -> None:
    with path.open("wb") as handle:
        handle.truncate(size_pages * PAGE)
        for index, data in pages.items():
            handle.seek(index * PAGE)
            handle.write(data)


def test_content_digest_depends_on_content_not_on_holes(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    dense = tmp_path / "dense"
    _write_sparse(sparse, {3: b"x" * PAGE, 100: b"tail"}, 256)
    content = sparse.read_bytes()
    dense.write_bytes(content)  # zero pages written out: a different layout on disk
    assert snapshot_store.content_digest(sparse) == snapshot_store.content_digest(dense)
    changed = bytearray(content)
    changed[100 * PAGE + 2] ^= 1
    other = tmp_path / "other"
    other.write_bytes(bytes(changed))
    assert snapshot_store.content_digest(other) != snapshot_store.content_digest(dense)
    shorter = tmp_path / "shorter"
    shorter.write_bytes(content[:-PAGE])  # only zeros cut off: the size still counts
    assert snapshot_store.content_digest(shorter) != snapshot_store.content_digest(dense)


def test_content_digest_is_recomputed_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 10000)
    before = snapshot_store.content_digest(path)
    with path.open("r+b") as handle:
        handle.write(b"b")
    os.utime(path, ns=(1, 1))  # even with an old mtime, ctime and content differ
    assert snapshot_store.content_digest(path) != before


def _entry(tmp_path: Path) -> Path:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / snapshot_store.STATE_FILE).write_bytes(os.urandom(3 * PAGE + 5))
    _write_sparse(entry / snapshot_store.RAM_FILE, {1: b"r" * PAGE}, 64)
    snapshot_store.write_manifest(
        entry,
        [snapshot_store.STATE_FILE, snapshot_store.RAM_FILE],
        mechanism="shared-ram",
        ready_nonce="feed",
    )
    return entry


def test_load_accepts_a_snapshot_that_matches_its_manifest(tmp_path: Path) -> None:
    loaded = snapshot_store.load(_entry(tmp_path))
    assert loaded.mechanism == "shared-ram" and loaded.ready_nonce == "feed"
    assert loaded.ram_file == loaded.path / snapshot_store.RAM_FILE
    assert {p.name for p in loaded.files()} == {snapshot_store.STATE_FILE, snapshot_store.RAM_FILE}


def test_load_detects_a_truncated_file(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    state = entry / snapshot_store.STATE_FILE
    os.truncate(state, state.stat().st_size // 2)
    with pytest.raises(snapshot_errors.SnapshotCorrupt, match="truncated") as caught:
        snapshot_store.load(entry)
    assert caught.value.path == entry


def test_load_detects_a_changed_byte(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    ram = entry / snapshot_store.RAM_FILE
    with ram.open("r+b") as handle:
        handle.seek(PAGE + 7)
        handle.write(b"X")
    with pytest.raises(snapshot_errors.SnapshotCorrupt, match="digest"):
        snapshot_store.load(entry)


def test_load_refuses_an_entry_without_manifest_or_with_a_foreign_one(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    manifest = entry / snapshot_store.MANIFEST
    manifest.write_text(manifest.read_text().replace(snapshot_store.FORMAT, "other-format"))
    with pytest.raises(snapshot_errors.SnapshotCorrupt, match="other-format"):
        snapshot_store.load(entry)
    manifest.unlink()
    with pytest.raises(snapshot_errors.SnapshotCorrupt, match="incomplete"):
        snapshot_store.load(entry)


def test_discard_removes_only_the_snapshot_it_was_told_about(tmp_path: Path) -> None:
    entry = _entry(tmp_path)
    old = snapshot_store.load(entry)
    # Another worker rebuilt it meanwhile: its manifest is a new file.
    time.sleep(0.01)
    snapshot_store.write_manifest(
        entry, [snapshot_store.STATE_FILE], mechanism="stream", ready_nonce="beef"
    )
    assert not snapshot_store.discard(entry, "test", only=old)
    assert entry.exists()
    assert snapshot_store.discard(entry, "test")
    assert not entry.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".discarded")]
    assert not snapshot_store.discard(entry, "already gone")


def test_unsupported_mechanisms_are_remembered_per_qemu(tmp_path: Path) -> None:
    assert snapshot.unsupported_mechanisms(tmp_path, "q1") == {}
    snapshot._mark_unsupported(tmp_path, "q1", "shared-ram", "no x-ignore-shared")
    assert snapshot.unsupported_mechanisms(tmp_path, "q1") == {"shared-ram": "no x-ignore-shared"}
    assert snapshot.unsupported_mechanisms(tmp_path, "q2") == {}


class _Node:
    def __init__(self, **markers: SimpleNamespace) -> None:
        self.markers = markers
        self.nodeid = "test_x"

    def get_closest_marker(self, name: str) -> SimpleNamespace | None:
        return self.markers.get(name)


def _mode(asked: bool | str | None, option: str = "off", **markers: SimpleNamespace) -> str:
    request: Any = SimpleNamespace(node=_Node(**markers))
    return _snapshot_mode(request, SimpleNamespace(snapshots=option), asked)


def test_snapshot_mode_argument_then_markers_then_option() -> None:
    marker = SimpleNamespace(args=(), kwargs={})
    assert _mode(None) == "off"
    assert _mode(None, "stream") == "stream"
    assert _mode(True) == "auto" and _mode(True, "stream") == "stream"
    assert _mode(False, "auto", snapshot=marker) == "off"
    assert _mode(None, "auto", cold_boot=marker) == "off"
    assert _mode(None, snapshot=marker) == "auto"
    assert _mode(None, snapshot=SimpleNamespace(args=("stream",), kwargs={})) == "stream"
    assert _mode("shared-ram", cold_boot=marker) == "shared-ram"
    with pytest.raises(pytest.UsageError, match="bogus"):
        _mode("bogus")
