"""Real VMs started from snapshots (harness/snapshot.py) under TCG.

A restored VM behaves like a booted one (its own nonce, console, QMP, fault detection, guest
shell, clock, randomness); disks are per-test overlays; the saved files never change; a
changed template makes a new snapshot; a truncated or unloadable snapshot is discarded and
the test boots cold. Tests through the ``boot`` fixture use the run's cache (their
snapshots are made once and reused by later runs); the others use a private cache.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.image import templates
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import KernelFault
from harness.snapshot import errors as snapshot_errors
from harness.snapshot import plan as snapshot_plan
from harness.snapshot import restore as snapshot
from harness.snapshot import store as snapshot_store
from harness.storage import disks
from harness.storage.controllers import Disk
from harness.vm.boot import BootRequest, Vm


def lines_after(text: str, marker: str) -> list[str]:
    """Console lines that follow the first line containing ``marker``."""
    return text.split(marker, 1)[1].splitlines()[1:]


def test_restored_vm_runs_with_its_own_nonce_console_qmp_and_clock(boot) -> None:
    vm = boot(
        variables={"commands": ["date +%s", "cat /proc/cmdline"]},
        snapshot=True,
    )
    assert vm.boot_mechanism in snapshot_store.MECHANISMS, vm.start_plan.note
    assert vm.qmp.command("query-status")["status"] == "running"
    vm.expect_pass()
    vm.wait_shutdown()
    text = vm.machine.console_log.read_text()
    old = re.search(r"bootharness\.nonce=([0-9a-f]+)", text)
    assert old is not None, text
    # The snapshot boot's nonce is on the command line; this run has its own.
    assert old.group(1) == vm.start_plan.snapshot.ready_nonce != vm.nonce
    assert f"[bootharness:{old.group(1)}]" not in text
    assert f"[bootharness:{vm.nonce}] PASS" in text
    # Nothing from before the snapshot is replayed, and no kernel banner came.
    assert "Linux version" not in text and "INIT-START" not in text
    names = [m.name for m in vm.marks]
    assert names.index("restored") < names.index("RESUMED") < names.index("RUN")
    assert names.index("RUN") < names.index("PASS") < names.index("shutdown")
    # The guest clock is the host's, not the snapshot's.
    guest_time = int(lines_after(text, f"[bootharness:{vm.nonce}] RUN 1")[0].strip())
    assert abs(guest_time - time.time()) < 10


def test_two_restores_get_fresh_randomness(boot) -> None:
    commands = ["echo random $RANDOM $RANDOM", "cat /proc/sys/kernel/random/uuid"]
    seen = []
    for _ in range(2):
        vm = boot(variables={"commands": commands}, snapshot=True)
        assert vm.boot_mechanism in snapshot_store.MECHANISMS, vm.start_plan.note
        vm.expect_pass()
        text = vm.machine.console.recorder.text
        seen.append(lines_after(text, f"[bootharness:{vm.nonce}] RUN 1")[0:3:2])
        vm.stop()
    assert seen[0][0] != seen[1][0], seen  # the shell's $RANDOM
    assert seen[0][1] != seen[1][1], seen  # the kernel's pool


def test_kernel_fault_after_restore_is_detected(boot) -> None:
    vm = boot(variables={"commands": ["echo c > /proc/sysrq-trigger", "sleep 30"]}, snapshot=True)
    assert vm.boot_mechanism in snapshot_store.MECHANISMS, vm.start_plan.note
    with pytest.raises(KernelFault, match="sysrq triggered crash"):
        vm.expect_pass()
    assert vm.qmp.wait_event(["GUEST_PANICKED"], time.monotonic() + 5.0) is not None


def test_guest_shell_works_after_restore(boot) -> None:
    vm = boot(variables={"after": "shell"}, snapshot=True)
    assert vm.boot_mechanism in snapshot_store.MECHANISMS, vm.start_plan.note
    shell = vm.shell()
    assert shell.check("echo $((6 * 7))").strip() == "42"
    assert shell.run("test -e /no/such/file").status == 1
    assert shell.check("cat /proc/1/comm").strip() in ("init", "sh")


def overlay_head(overlay: Path, tmp_path: Path, size: int) -> bytes:
    """The first ``size`` bytes a qcow2 overlay shows (its base below where not written)."""
    raw = tmp_path / f"{overlay.parent.parent.name}-{overlay.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    with raw.open("rb") as handle:
        return handle.read(size)


def test_two_restored_vms_do_not_see_each_others_disk_writes(boot, tmp_path: Path) -> None:
    base = disks.empty(tmp_path / "base.raw", "8M", fmt="raw")
    before = disks.DiskImage.digest(base)
    attached = [Disk(base, "virtio-blk")]
    # Read through the page cache's back: what the disk holds, not what the guest cached.
    uncached = "sync && echo 3 > /proc/sys/vm/drop_caches"
    first = boot(
        disks=attached,
        snapshot=True,
        variables={
            "commands": [
                "test -b /dev/vda",
                "echo written-by-first | dd of=/dev/vda conv=fsync 2>/dev/null",
                uncached,
                "head -c 16 /dev/vda | grep -q written-by-first",
            ]
        },
    )
    assert first.boot_mechanism in snapshot_store.MECHANISMS, first.start_plan.note
    first.expect_pass()
    first.wait_shutdown()
    second = boot(
        disks=attached,
        snapshot=True,
        variables={"commands": [uncached, "! head -c 16 /dev/vda | grep -q written"]},
    )
    assert second.boot_mechanism in snapshot_store.MECHANISMS, second.start_plan.note
    second.expect_pass()
    second.wait_shutdown()
    first_overlay = first.storage.overlay(first.machine.workdir)
    second_overlay = second.storage.overlay(second.machine.workdir)
    assert first_overlay != second_overlay
    assert overlay_head(first_overlay, tmp_path, 16) == b"written-by-first"
    assert overlay_head(second_overlay, tmp_path, 16) == bytes(16)
    assert disks.DiskImage.digest(base) == before


def test_cold_boot_marker_opts_out(boot, request: pytest.FixtureRequest) -> None:
    # The snapshot marker asks for a snapshot start; cold_boot must win over it. Without the
    # cold_boot marker honoured, this VM would get a SnapshotStart plan and resume.
    request.node.add_marker(pytest.mark.snapshot)
    request.node.add_marker(pytest.mark.cold_boot)
    vm = boot(variables={"commands": ["true"]})
    vm.expect_pass()
    assert vm.start_plan is None and vm.boot_mechanism == "cold"
    assert vm.marks[1].name == "first-byte" and vm.machine.console.recorder.mark("kernel-banner")


def test_snapshot_marker_alone_starts_from_a_snapshot(boot, request: pytest.FixtureRequest) -> None:
    """The counterpart of the test above: the same VM with only the snapshot marker resumes."""
    request.node.add_marker(pytest.mark.snapshot)
    vm = boot(variables={"commands": ["true"]})
    vm.expect_pass()
    assert isinstance(vm.start_plan, snapshot.SnapshotStart)
    assert vm.boot_mechanism in snapshot_store.MECHANISMS, vm.start_plan.note


# -- a private cache: snapshots made and broken on purpose


@dataclass
class Made:
    root: Path
    plan: snapshot_plan.Plan
    snapshot: snapshot_store.Snapshot


def private_vm(
    kernel: Kernel, root: Path, workdir: Path, commands: list[str], **options: object
) -> Vm:
    spec = InitramfsSpec(variables={"commands": commands}, **options)  # type: ignore[arg-type]
    return snapshot.prepare_vm(BootRequest(kernel, spec), cache_root=root, workdir=workdir)


def file_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        with path.open("rb") as handle:
            hashes[path.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return hashes


@pytest.fixture(scope="module")
def made(kernel: Kernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    """One snapshot of the default definition in a private cache, made by a first VM."""
    root = tmp_path_factory.mktemp("snapcache")
    with private_vm(kernel, root, root / "vm-make", ["true"]) as vm:
        vm.start()
        vm.expect_pass()
        assert vm.start_plan.created and vm.start_plan.snapshot is not None, vm.start_plan.note
        saved = vm.start_plan.snapshot
    plan = snapshot_plan.make_plan(kernel, InitramfsSpec(), cache_root=root)
    yield Made(root, plan, saved)
    shutil.rmtree(root, ignore_errors=True)


def test_saved_snapshot_files_are_unchanged_after_restores(
    made: Made, kernel: Kernel, tmp_path: Path
) -> None:
    before = file_hashes(made.snapshot.path)
    assert snapshot_store.STATE_FILE in before
    if made.snapshot.mechanism == "shared-ram":
        assert snapshot_store.RAM_FILE in before
    # Guests that write a lot of memory (RAM pages are copy-on-write, never the file's).
    fill = ["dd if=/dev/urandom of=/tmp/fill bs=1M count=24 2>/dev/null", "rm /tmp/fill"]
    for index in range(2):
        with private_vm(kernel, made.root, tmp_path / f"vm{index}", fill) as vm:
            vm.start()
            assert vm.start_plan.snapshot == made.snapshot and not vm.start_plan.created
            vm.expect_pass()
    assert file_hashes(made.snapshot.path) == before


def test_changing_one_byte_of_the_template_makes_a_new_snapshot(
    kernel: Kernel, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    folder = tmp_path / "templates"
    folder.mkdir()
    template = folder / templates.DEFAULT_TEMPLATE
    shutil.copy(templates.BUILTIN_TEMPLATES / templates.DEFAULT_TEMPLATE, template)
    spec = InitramfsSpec(template_dirs=(folder,))
    first = private_vm(kernel, root, tmp_path / "a", ["true"], template_dirs=(folder,))
    with first:
        first.start()
        first.expect_pass()
    assert first.start_plan.created and first.boot_mechanism in snapshot_store.MECHANISMS
    old = snapshot_plan.make_plan(kernel, spec, cache_root=root)
    text = template.read_text()
    template.write_text(text.replace("# /init rendered", "# /init Rendered", 1))
    new = snapshot_plan.make_plan(kernel, spec, cache_root=root)
    assert new.image.digest != old.image.digest and new.key != old.key
    assert not any(new.entry(root, m).exists() for m in snapshot_store.MECHANISMS)
    second = private_vm(kernel, root, tmp_path / "b", ["true"], template_dirs=(folder,))
    with second:
        second.start()
        second.expect_pass()
    assert second.start_plan.created and second.boot_mechanism in snapshot_store.MECHANISMS
    assert (
        second.start_plan.snapshot is not None
        and second.start_plan.snapshot.path != first.start_plan.snapshot.path
    )


def copy_snapshot(made: Made, root: Path) -> Path:
    """A copy of ``made``'s snapshot in another cache (content digests ignore sparseness)."""
    target = root / "snapshots" / made.snapshot.path.name
    target.parent.mkdir(parents=True)
    subprocess.run(
        ["cp", "-r", "--sparse=always", str(made.snapshot.path), str(target)], check=True
    )
    return target


@pytest.mark.parametrize("saved", [snapshot_store.STATE_FILE, snapshot_store.RAM_FILE])
def test_truncated_snapshot_file_is_detected_and_made_again_and_the_test_passes(
    made: Made, kernel: Kernel, tmp_path: Path, saved: str
) -> None:
    if saved == snapshot_store.RAM_FILE and made.snapshot.mechanism != "shared-ram":
        pytest.skip("the stream mechanism keeps no RAM file")
    root = tmp_path / "cache"
    entry = copy_snapshot(made, root)
    file = entry / saved
    old_identity = (entry / snapshot_store.MANIFEST).stat().st_ino
    with file.open("r+b") as handle:
        handle.truncate(file.stat().st_size - 4096)
    with private_vm(kernel, root, tmp_path / "vm", ["echo remade"]) as vm:
        with pytest.warns(snapshot_errors.SnapshotWarning, match="truncated.*made again"):
            vm.start()
        vm.expect_pass()
    assert vm.boot_mechanism == made.snapshot.mechanism, "restored from the new snapshot"
    assert vm.start_plan.created and vm.machine.console.recorder.mark("kernel-banner") is None
    assert (entry / snapshot_store.MANIFEST).stat().st_ino != old_identity
    assert snapshot_store.load(entry).path == entry, "the new snapshot passes every check"


def test_snapshot_that_fails_to_restore_is_discarded_and_the_test_boots_cold(
    made: Made, kernel: Kernel, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    entry = copy_snapshot(made, root)
    # Same size, manifest agreeing: it passes the checks, and QEMU refuses to load it.
    state = entry / snapshot_store.STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)
    files = [snapshot_store.STATE_FILE] + (
        [snapshot_store.RAM_FILE] if made.snapshot.mechanism == "shared-ram" else []
    )
    snapshot_store.write_manifest(
        entry, files, mechanism=made.snapshot.mechanism, ready_nonce=made.snapshot.ready_nonce
    )
    assert snapshot_store.load(entry).path == entry
    with private_vm(kernel, root, tmp_path / "vm", ["true"]) as vm:
        with pytest.warns(snapshot_errors.SnapshotWarning, match="restor"):
            vm.start()
        vm.expect_pass()
    assert vm.boot_mechanism == "cold"
    assert not entry.exists(), "a snapshot that does not restore is discarded"


def test_falls_back_to_the_stream_mechanism_when_shared_ram_does_not_work(
    kernel: Kernel, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    plan = snapshot_plan.make_plan(kernel, InitramfsSpec(), cache_root=root)
    # As if the probe had found x-ignore-shared missing from this QEMU.
    snapshot._mark_unsupported(root, plan.key_parts["qemu"], "shared-ram", "test says so")
    with private_vm(kernel, root, tmp_path / "vm", ["echo streamed"]) as vm:
        vm.start()
        vm.expect_pass()
    assert vm.boot_mechanism == "stream" and vm.start_plan.created
    assert not plan.entry(root, "shared-ram").exists()
    assert [p.name for p in plan.entry(root, "stream").iterdir() if p.is_file()].count(
        snapshot_store.RAM_FILE
    ) == 0
