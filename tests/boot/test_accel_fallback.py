"""On a machine whose KVM hangs, ``auto`` falls back to TCG within 10 s, says so, and boots."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest

from harness.image.initramfs import InitramfsSpec
from harness.kernel.provision import Kernel
from harness.vm import accel, boot

pytestmark = pytest.mark.boot  # every test here starts QEMU, some without the boot fixture

# A QEMU that hangs whenever it is asked for KVM (as KVM guests do on these machines) and is
# the real QEMU otherwise: the fault is injected, the boot is real.
HANGING_KVM_QEMU = """#!/bin/sh
case " $* " in *" kvm "*) exec sleep 1000 ;; esac
exec {real} "$@"
"""


@pytest.fixture
def hanging_kvm_qemu(tmp_path: Path) -> str:
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(HANGING_KVM_QEMU.format(real=real))
    wrapper.chmod(0o755)
    return str(wrapper)


def test_auto_falls_back_to_tcg_within_ten_seconds_and_boots(
    kernel: Kernel, hanging_kvm_qemu: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_kvm = tmp_path / "kvm"
    fake_kvm.touch()  # the device exists, as it does on these machines
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = accel.choose_accelerator(
            "auto",
            qemu=hanging_kvm_qemu,
            cache_dir=tmp_path / "cache",
            kvm_device=fake_kvm,
            deadline=2.0,
        )
    assert choice.name == "tcg"
    # The probe waited its whole deadline before giving up (a lower bound: how much longer
    # it took on a loaded machine is bench material, not a test's).
    assert time.monotonic() - started >= 2.0
    assert "hung for 2.0 s" in choice.reason, choice.reason
    assert any("TCG" in str(w.message) for w in caught), "the fallback must be announced"

    # Boot through the same hanging-KVM wrapper: it must be asked for TCG only.
    monkeypatch.setenv("PATH", f"{Path(hanging_kvm_qemu).parent}:{os.environ['PATH']}")
    request = boot.BootRequest(kernel, InitramfsSpec(), accel=choice.name)
    vm = boot.prepare_vm(request, cache_root=tmp_path / "img", workdir=tmp_path / "vm")
    result = boot.run(vm, kernel=kernel, accel=choice.name)
    assert result.outcome.name == "PASS", result.render()
    assert "-accel tcg" in " ".join(vm.machine.argv)


def test_auto_on_this_host_agrees_with_a_direct_probe(tmp_path: Path) -> None:
    """The real decision on this machine's real /dev/kvm (whatever state it is in) is the one
    an independent look at the device and a direct probe give, and it is cached."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        choice = accel.choose_accelerator("auto", cache_dir=tmp_path / "cache")
    kvm = Path("/dev/kvm")
    if not kvm.exists() or not os.access(kvm, os.R_OK | os.W_OK):
        expected = "tcg"
    else:
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu is not None
        works, _ = accel.probe_kvm(qemu, accel.PROBE_DEADLINE, tmp_path / "probe")
        expected = "kvm" if works else "tcg"
    assert choice.name == expected, choice.reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = accel.choose_accelerator("auto", cache_dir=tmp_path / "cache")
    assert again == choice  # the verdict is kept (in the process, and in the cache folder)
