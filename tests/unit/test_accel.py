"""Tests for harness.vm.accel: accelerator choice, the KVM probe and its cache.

Fake QEMUs are small shell scripts that hang, fail like QEMU's MSR error, or exit the way
the probe guest makes QEMU exit. Every fake appends one line per run to ``invocations``
so a test can tell whether the probe ran. One test boots the real probe guest under TCG.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness
from harness.outcome import ConfigError, InfraError
from harness.vm import accel
from harness.vm.accel import AccelChoice, KvmFallbackWarning, choose_accelerator

MSR_LINE = "qemu-system-x86_64: error: failed to set MSR 0x48f to 0x7fefff00036dfb"
ASSERT_LINE = (
    "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3035: kvm_buf_set_msrs: "
    "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed."
)


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test is a "new process" as far as the in-process memo goes.
    monkeypatch.setattr(accel, "_MEMO", {})


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    device = tmp_path / "dev-kvm"
    device.touch()
    return device


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def make_fake(tmp_path: Path, body: str, name: str = "fake-qemu") -> Path:
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\necho "$$ $*" >> "{tmp_path}/invocations"\n{body}\n')
    script.chmod(0o755)
    return script


def invocations(tmp_path: Path) -> list[str]:
    path = tmp_path / "invocations"
    return path.read_text().splitlines() if path.exists() else []


def choose(
    requested: str, fake: Path, kvm_device: Path, cache_dir: Path, deadline: float = 5.0
) -> AccelChoice:
    return choose_accelerator(
        requested, qemu=str(fake), deadline=deadline, cache_dir=cache_dir, kvm_device=kvm_device
    )


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie is dead (only its parent's wait is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_dead(pid: int, within: float = 2.0) -> bool:
    end = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


SUCCESS = f"exit {accel.PROBE_EXIT_STATUS}"
MSR_EXIT_1 = f'echo "{MSR_LINE}" >&2\nexit 1'
MSR_ABORT = f"cat >&2 <<'EOF'\n{MSR_LINE}\n{ASSERT_LINE}\nEOF\nkill -ABRT $$"


# --- requested values -----------------------------------------------------------------


def test_forced_tcg_runs_nothing(tmp_path: Path, kvm_device: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    choice = choose("tcg", fake, kvm_device, cache_dir)
    assert (choice.name, choice.requested) == ("tcg", "tcg")
    assert "forced" in choice.reason
    assert invocations(tmp_path) == []
    assert not cache_dir.exists()


@pytest.mark.parametrize("value", ["", "KVM", "xen", "kvm:tcg", " auto"])
def test_invalid_value_is_config_error(
    value: str, tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    with pytest.raises(ConfigError) as info:
        choose(value, fake, kvm_device, cache_dir)
    assert repr(value) in str(info.value)
    assert "auto, kvm, tcg" in str(info.value)
    assert invocations(tmp_path) == []


def test_nonpositive_deadline_is_config_error(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    with pytest.raises(ConfigError, match="deadline"):
        choose("auto", fake, kvm_device, cache_dir, deadline=0)


# --- /dev/kvm -------------------------------------------------------------------------


def test_auto_without_device_is_tcg_without_probe(tmp_path: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    missing = tmp_path / "no-such-kvm"
    choice = choose("auto", fake, missing, cache_dir)
    assert choice.name == "tcg"
    assert str(missing) in choice.reason and "does not exist" in choice.reason
    assert invocations(tmp_path) == []


def test_auto_without_read_write_access_is_tcg(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_access = os.access

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if Path(str(path)) == kvm_device:
            return False
        return real_access(path, mode)  # type: ignore[arg-type]

    # Tests may run as root, for whom a chmod would not deny access.
    monkeypatch.setattr(os, "access", access)
    fake = make_fake(tmp_path, SUCCESS)
    choice = choose("auto", fake, kvm_device, cache_dir)
    assert choice.name == "tcg"
    assert "read/write" in choice.reason
    assert invocations(tmp_path) == []


def test_forced_kvm_without_device_is_infra_error(tmp_path: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    missing = tmp_path / "no-such-kvm"
    with pytest.raises(InfraError, match="does not exist"):
        choose("kvm", fake, missing, cache_dir)
    assert invocations(tmp_path) == []


# --- probe verdicts -------------------------------------------------------------------


def test_success_is_kvm_and_runs_the_kvm_probe_command(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = choose("auto", fake, kvm_device, cache_dir)
    assert (choice.name, choice.requested) == ("kvm", "auto")
    assert "passed" in choice.reason
    [line] = invocations(tmp_path)
    assert "-accel kvm " in line
    assert "isa-debug-exit,iobase=0xf4" in line


def test_forced_kvm_success_is_kvm(tmp_path: Path, kvm_device: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    assert choose("kvm", fake, kvm_device, cache_dir).name == "kvm"


def test_hang_falls_back_to_tcg_and_kills_the_process_group(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    # The child proves the whole group is killed, not only the process we started.
    fake = make_fake(
        tmp_path,
        f'sleep 1000 &\necho $! > "{tmp_path}/child.pid"\necho $$ > "{tmp_path}/leader.pid"\nwait',
    )
    start = time.monotonic()
    with pytest.warns(KvmFallbackWarning, match="hung"):
        choice = choose("auto", fake, kvm_device, cache_dir, deadline=1.0)
    elapsed = time.monotonic() - start
    pids = [int((tmp_path / f"{who}.pid").read_text()) for who in ("leader", "child")]
    try:
        assert choice.name == "tcg"
        assert "hung for 1.0 s" in choice.reason and "using TCG" in choice.reason
        assert elapsed >= 1.0  # the probe had its whole deadline
        for pid in pids:
            assert wait_dead(pid), f"probe process {pid} still alive"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_msr_error_falls_back_with_the_message(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="harness")  # the warning says it; the log keeps it
    fake = make_fake(tmp_path, MSR_EXIT_1)
    with pytest.warns(KvmFallbackWarning, match="failed to set MSR"):
        choice = choose("auto", fake, kvm_device, cache_dir)
    assert choice.name == "tcg"
    assert MSR_LINE in choice.reason
    assert "status 1" in choice.reason
    assert any("failed to set MSR" in r.getMessage() for r in caplog.records)


def test_msr_abort_names_the_error_and_the_signal(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    # QEMU prints the MSR error, then dies on an assertion: the error is the useful line.
    fake = make_fake(tmp_path, MSR_ABORT)
    with pytest.warns(KvmFallbackWarning):
        choice = choose("auto", fake, kvm_device, cache_dir)
    assert MSR_LINE in choice.reason
    assert "Assertion" in choice.reason
    assert "SIGABRT" in choice.reason


def test_forced_kvm_with_failing_probe_is_infra_error(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    fake = make_fake(tmp_path, MSR_EXIT_1)
    with pytest.raises(InfraError) as info:
        choose("kvm", fake, kvm_device, cache_dir)
    assert "failed to set MSR" in info.value.message
    assert MSR_LINE in info.value.evidence.stderr
    assert str(fake) in info.value.evidence.argv


def test_probe_kvm_reports_unstartable_qemu(tmp_path: Path) -> None:
    works, reason = accel.probe_kvm(str(tmp_path / "missing-qemu"), 1.0, tmp_path / "work")
    assert not works
    assert "could not start" in reason


SLOW_KVM = f'case "$*" in *"-accel kvm"*) sleep 0.6;; esac\n{SUCCESS}'
SLOW_BOTH = f"sleep 0.6\n{SUCCESS}"


def test_kvm_much_slower_than_tcg_is_refused(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accel, "_FAST_ENOUGH", 0.2)
    fake = make_fake(tmp_path, SLOW_KVM)
    with pytest.warns(KvmFallbackWarning, match="under TCG"):
        choice = choose("auto", fake, kvm_device, cache_dir)
    assert choice.name == "tcg"
    runs = invocations(tmp_path)
    assert len(runs) == 2
    assert "-accel kvm " in runs[0] and "-accel tcg " in runs[1]


def test_slow_kvm_on_a_slow_host_is_accepted(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TCG is just as slow, so the host is slow, not its KVM.
    monkeypatch.setattr(accel, "_FAST_ENOUGH", 0.2)
    fake = make_fake(tmp_path, SLOW_BOTH)
    choice = choose("auto", fake, kvm_device, cache_dir)
    assert choice.name == "kvm"
    assert len(invocations(tmp_path)) == 2


# --- once per run ---------------------------------------------------------------------


def test_cache_file_is_reused_by_a_new_process(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    first = choose("auto", fake, kvm_device, cache_dir)
    [cache_file] = cache_dir.glob("kvm-probe-*.json")
    entry = json.loads(cache_file.read_text())
    assert entry["key"]["qemu"] == str(fake.resolve())
    assert entry["verdict"]["works"] is True

    monkeypatch.setattr(accel, "_MEMO", {})  # as a second xdist worker would start
    second = choose("auto", fake, kvm_device, cache_dir)
    assert second == first
    assert len(invocations(tmp_path)) == 1


def test_failure_verdict_is_reused_too(tmp_path: Path, kvm_device: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, MSR_EXIT_1)
    for _ in range(2):
        accel._MEMO.clear()
        with pytest.warns(KvmFallbackWarning):
            assert choose("auto", fake, kvm_device, cache_dir).name == "tcg"
    assert len(invocations(tmp_path)) == 1


def test_memo_spares_even_the_cache_file(tmp_path: Path, kvm_device: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    choose("auto", fake, kvm_device, cache_dir)
    shutil.rmtree(cache_dir)
    assert choose("auto", fake, kvm_device, cache_dir).name == "kvm"
    assert len(invocations(tmp_path)) == 1


def test_changed_qemu_binary_is_probed_again(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    choose("auto", fake, kvm_device, cache_dir)
    make_fake(tmp_path, f"# upgraded\n{SUCCESS}")  # same path, new size and mtime
    monkeypatch.setattr(accel, "_MEMO", {})
    choose("auto", fake, kvm_device, cache_dir)
    assert len(invocations(tmp_path)) == 2


def test_hang_seen_with_short_deadline_is_not_reused_for_a_longer_one(
    tmp_path: Path, kvm_device: Path, cache_dir: Path
) -> None:
    fake = make_fake(tmp_path, "exec sleep 1000")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmFallbackWarning)
        for deadline, expected_runs in ((0.3, 1), (0.3, 1), (0.6, 2)):
            accel._MEMO.clear()
            choose("auto", fake, kvm_device, cache_dir, deadline=deadline)
            assert len(invocations(tmp_path)) == expected_runs


def test_corrupt_cache_file_is_ignored_and_rewritten(
    tmp_path: Path, kvm_device: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = make_fake(tmp_path, SUCCESS)
    choose("auto", fake, kvm_device, cache_dir)
    [cache_file] = cache_dir.glob("kvm-probe-*.json")
    cache_file.write_text("{ not json")
    monkeypatch.setattr(accel, "_MEMO", {})
    assert choose("auto", fake, kvm_device, cache_dir).name == "kvm"
    assert len(invocations(tmp_path)) == 2
    assert json.loads(cache_file.read_text())["verdict"]["works"] is True


def test_unusable_cache_dir_still_probes(tmp_path: Path, kvm_device: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    fake = make_fake(tmp_path, SUCCESS)
    assert choose("auto", fake, kvm_device, not_a_dir / "cache").name == "kvm"
    assert len(invocations(tmp_path)) == 1


def test_concurrent_processes_probe_once(tmp_path: Path, kvm_device: Path, cache_dir: Path) -> None:
    fake = make_fake(tmp_path, f"sleep 0.5\n{SUCCESS}")
    code = (
        "import sys; from pathlib import Path; from harness.vm.accel import choose_accelerator; "
        "print(choose_accelerator('auto', qemu=sys.argv[1], cache_dir=Path(sys.argv[2]), "
        "kvm_device=Path(sys.argv[3])).name)"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(harness.__file__).resolve().parents[1]))
    argv = [sys.executable, "-c", code, str(fake), str(cache_dir), str(kvm_device)]
    workers = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=30)[0].strip() for worker in workers]
    assert outputs == ["kvm", "kvm"]
    assert len(invocations(tmp_path)) == 1


# --- the real probe guest -------------------------------------------------------------


def test_boot_sector_is_a_bootable_sector() -> None:
    sector = accel.boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    exit_value = (accel.PROBE_EXIT_STATUS - 1) >> 1
    assert sector[:4] == bytes([0xB0, exit_value, 0xE6, 0xF4])  # mov al, v; out 0xf4, al


@pytest.fixture
def real_qemu() -> Iterator[str]:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    yield path


@pytest.mark.boot  # a real QEMU guest
def test_real_probe_guest_exits_85_under_tcg(real_qemu: str, tmp_path: Path) -> None:
    probe = accel._run_probe(real_qemu, "tcg", 20.0, tmp_path)
    assert probe.works, probe.reason
    assert not probe.hung
    assert "TCG probe passed" in probe.reason
