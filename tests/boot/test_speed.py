"""What makes runs fast, proven on real boots: the console log stays whole under a flood (the
console is on pipes), ``bootharness boot`` loads no report, plugin, bisect or pytest module,
``bootharness boot --snapshot`` starts from the fixture's snapshot, and a second restore in
one process takes the spare QEMU the first one started (a dead spare is not used, and the
snapshot survives it). Speed itself is measured by bench/cli.py and bench/snapshot.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.bisect.oracles import BootOracle
from harness.cache import cache_root
from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.outcome import Outcome, TestFailure
from harness.report import bundle, replay
from harness.snapshot import restore, spare, store
from harness.vm.boot import BootRequest, Vm

REPO = Path(__file__).resolve().parents[2]
LINE = "bootharness flood line {:04d} 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUV"
FLOOD = (
    "i=0; while [ $i -lt 600 ]; do "
    "printf '<4>bootharness flood line %04d 0123456789 abcdefghijklmnopqrstuvwxyz "
    "ABCDEFGHIJKLMNOPQRSTUV\\n' $i > /dev/kmsg; i=$((i+1)); done"
)


def test_the_console_log_is_whole_after_a_flood(boot) -> None:
    """600 kernel lines (~65 KB) through the UART: every one reaches the harness and
    QEMU's console.log intact, none doubled or cut (a socket console lost ~6% under load)."""
    vm = boot(variables={"commands": [FLOOD]}, snapshot=False)
    vm.expect_pass()
    vm.wait_shutdown()
    expected = [LINE.format(i) for i in range(600)]
    for text in (vm.machine.console.recorder.text, vm.machine.console_log.read_text()):
        found = [
            line.split("] ", 1)[1].rstrip("\r")
            for line in text.splitlines()
            if "flood line" in line
        ]
        assert found == expected


PROBE = """
import json, sys
from harness.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of its own (kernels and the KVM verdict linked from the run's cache): the
    snapshots made here are this module's."""
    root = tmp_path_factory.mktemp("speed-cache")
    shared = cache_root()
    for name in ("kernels", "accel"):
        if (shared / name).exists():
            (root / name).symlink_to(shared / name)
    return root


def cli(cache: Path, tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    argv = [sys.executable, "-c", PROBE, "--cache", str(cache), "boot", "--accel", "tcg"]
    argv += ["--workdir", str(tmp_path / "run"), *args]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result, done.stdout


def test_a_boot_from_the_command_line_loads_only_what_it_uses(
    private_cache: Path, tmp_path: Path
) -> None:
    result, out = cli(private_cache, tmp_path, "--run", "true")
    assert result["code"] == 0, out
    modules = result["modules"]
    assert isinstance(modules, list)
    never = ("pytest", "_pytest", "harness.report", "harness.plugin", "harness.bisect")
    assert [m for m in modules if m.startswith(never)] == []
    assert "outcome:  PASS" in out and "start:    cold" in out
    # The same boot again hits every cache: nothing to render, so no template engine.
    again, out = cli(private_cache, tmp_path / "again", "--run", "true")
    assert again["code"] == 0, out
    assert isinstance(again["modules"], list)
    assert [m for m in again["modules"] if m.startswith(("jinja2", *never))] == []
    assert "outcome:  PASS" in out


def test_boot_snapshot_makes_then_uses_the_snapshot(private_cache: Path, tmp_path: Path) -> None:
    """The first ``--snapshot`` command makes the snapshot (unless a test before it in this
    module did), the next one, with other commands, restores the same one."""
    made_before = list((private_cache / "snapshots").glob("*-*/manifest.json"))
    first, out = cli(private_cache, tmp_path / "1", "--run", "true", "--snapshot")
    assert first["code"] == 0, out[:400]
    assert ("snapshot, made now\n" in out) == (not made_before), out[:400]
    made = set((private_cache / "snapshots").glob("*-*/manifest.json"))
    second, out = cli(private_cache, tmp_path / "2", "--run", "echo other", "--snapshot")
    assert second["code"] == 0, out[:400]
    start = next(line for line in out.splitlines() if line.startswith("start:"))
    assert start.split(None, 1)[1] in (f"{m} snapshot" for m in store.MECHANISMS), start
    assert "RESUMED" in out and "outcome:  PASS" in out
    # Other tests of this module may have made snapshots of their own definitions before.
    assert set((private_cache / "snapshots").glob("*-*/manifest.json")) == made


@pytest.fixture
def spares(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "spares"
    folder.mkdir()
    yield folder
    spare.discard()


def restore_vm(
    kernel: Kernel,
    cache: Path,
    workdir: Path,
    spares: Path,
    word: str,
    template_dirs: tuple[Path, ...] = (),
) -> Vm:
    spec = InitramfsSpec(variables={"commands": [f"echo {word}"]}, template_dirs=template_dirs)
    return restore.prepare_vm(
        BootRequest(kernel, spec), cache_root=cache, workdir=workdir, spares=spares
    )


def assert_restored_without_a_spare(vm: Vm) -> None:
    """``vm`` resumed from its snapshot with a QEMU of its own, and the snapshot stays."""
    plan = vm.start_plan
    assert isinstance(plan, restore.SnapshotStart)
    assert vm.boot_mechanism in store.MECHANISMS and not plan.from_spare
    assert plan.snapshot is not None and plan.snapshot.path.exists()


def test_a_second_restore_takes_the_spare_of_the_first(
    kernel: Kernel, private_cache: Path, tmp_path: Path, spares: Path
) -> None:
    for n, word in enumerate(("one", "two", "three")):
        workdir = tmp_path / f"vm{n}"
        with restore_vm(kernel, private_cache, workdir, spares, word) as vm:
            vm.start()
            assert vm.boot_mechanism in store.MECHANISMS
            plan = vm.start_plan
            assert isinstance(plan, restore.SnapshotStart)
            assert plan.from_spare == (n > 0)
            vm.expect_pass()
            vm.wait_shutdown()
        # The spare's files moved into this VM's folder: the evidence is where it belongs.
        log = (workdir / "restored" / "console.log").read_text()
        assert f"RUN 1\n{word}" in log.replace("\r", "") and f"[bootharness:{vm.nonce}] PASS" in log
        # A spare was loaded and warmed up before it was taken: its guest said WARMED under
        # the snapshot's ready nonce, before this test's nonce ever reached it.
        assert plan.snapshot is not None
        warmed = f"[bootharness:{plan.snapshot.ready_nonce}] WARMED"
        assert (warmed in log) == (n > 0), log[:300]
        if n > 0:
            assert log.index(warmed) < log.index(f"[bootharness:{vm.nonce}] RESUMED")


def test_a_dead_spare_is_not_used_and_the_snapshot_stays(
    kernel: Kernel, private_cache: Path, tmp_path: Path, spares: Path
) -> None:
    with restore_vm(kernel, private_cache, tmp_path / "a", spares, "a") as vm:
        vm.start()
        vm.expect_pass()
    waiting = spare.current()
    assert waiting is not None
    waiting.kill()
    with restore_vm(kernel, private_cache, tmp_path / "b", spares, "b") as vm:
        vm.start()
        assert_restored_without_a_spare(vm)
        vm.expect_pass()


def test_an_init_without_the_warm_up_loop_restores_without_spares(
    kernel: Kernel, private_cache: Path, tmp_path: Path, spares: Path
) -> None:
    """A user's template from before the warm-up reads WARM as a bad go line: that spare
    fails, is not used, and each restore starts its own QEMU (the snapshot stays)."""
    own = tmp_path / "templates"
    own.mkdir()
    shipped = (REPO / "initrd_templates" / "init.sh.j2").read_text()
    loop = shipped[shipped.index("while read -r go_word") : shipped.index('[ "$go_word" = GO ]')]
    read = 'read -r go_word go_nonce go_epoch go_seed go_random go_size || fail "no go line"\n'
    (own / "init.sh.j2").write_text(shipped.replace(loop, read))
    for n, word in enumerate(("one", "two")):
        workdir = tmp_path / f"vm{n}"
        with restore_vm(kernel, private_cache, workdir, spares, word, (own,)) as vm:
            vm.start()
            assert_restored_without_a_spare(vm)
            vm.expect_pass()
        if n == 0:
            assert spare.current() is not None, "a spare was started for the second restore"


def test_bisect_steps_that_differ_in_commands_share_one_snapshot(
    kernel: Kernel, private_cache: Path, tmp_path: Path
) -> None:
    """A boot oracle with ``snapshot`` judges each step from the snapshot of the shared
    part (so git bisect over commands or the end of a template restores instead of booting),
    and a failing command is still a failure."""
    for commands, outcome in ((["true"], Outcome.PASS), (["false"], Outcome.TEST_FAIL)):
        oracle = BootOracle(
            kernels=lambda name: kernel,
            spec=InitramfsSpec(variables={"commands": commands}),
            cache_root=private_cache,
            workdir=tmp_path / commands[0],
            snapshot="auto",
        )
        observed = oracle(kernel.name)
        assert observed.outcome is outcome, observed.message
        assert observed.log_path is not None and observed.log_path.parent.name == "restored"


def test_a_snapshot_started_failure_replays_cold_and_from_its_snapshot(
    kernel: Kernel, private_cache: Path, tmp_path: Path, spares: Path
) -> None:
    """The bundle of a test that resumed from a snapshot records the plan: the replay boots
    the snapshot's image to its ready point and sends the same rest (it used to wait there
    for ever), or resumes from the same snapshot with ``snapshot``; the failure reproduces."""
    with restore_vm(kernel, private_cache, tmp_path / "vm", spares, "x; false") as vm:
        vm.start()
        assert vm.boot_mechanism in store.MECHANISMS
        with pytest.raises(TestFailure):
            vm.expect_pass()
    target = bundle.write(
        tmp_path / "bundle", vm, test="t.py::t", outcome="TEST_FAIL", message="it failed"
    )
    recorded = bundle.load(target)
    assert recorded.data["snapshot"]["rest"]
    for mechanism, start in ((None, "cold, to the snapshot's ready point"), ("auto", "snapshot")):
        again = replay.prepare(
            recorded, tmp_path / f"replay-{mechanism}", cache_root=private_cache, snapshot=mechanism
        )
        result = replay.run(again)
        assert result.outcome is Outcome.TEST_FAIL, result.render()
        assert result.start.endswith(start), result.start
        assert "command 1 exited 1" in result.message
