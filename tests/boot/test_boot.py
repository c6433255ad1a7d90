"""Real boots of the default kernel under TCG: every outcome (docs/architecture.md)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.kernel.provision import Kernel
from harness.outcome import BootTimeout, ConfigError, InfraError, KernelFault, Outcome, TestFailure
from harness.storage import firmware
from harness.vm import boot as boot_module
from harness.vm.deadlines import Deadlines
from harness.vm.machine import MachineSpec


def test_boot_reaches_success_marker(boot) -> None:
    vm = boot()
    vm.expect_pass()
    vm.wait_shutdown()
    names = [m.name for m in vm.marks]
    # Phases in the order a boot passes them.
    for earlier, later in zip(
        ["qemu-started", "first-byte", "kernel-banner", "INIT-START", "MODULES-LOADED", "PASS"],
        ["first-byte", "kernel-banner", "INIT-START", "MODULES-LOADED", "PASS", "shutdown"],
        strict=True,
    ):
        assert names.index(earlier) < names.index(later), names
    log = vm.machine.console_log.read_text()
    assert log.count("Linux version") == 1
    assert not vm.machine.console.recorder.serious_faults()
    # The init powered off through sysrq (no process started after PASS), not the fallback.
    assert log.index("PASS") < log.index("sysrq: Power Off") < log.index("reboot: Power down")


def test_failing_command_is_test_fail_with_reason(boot) -> None:
    vm = boot(variables={"commands": ["test -e /no/such/file"]})
    with pytest.raises(TestFailure, match="command 1 exited 1") as caught:
        vm.expect_pass()
    assert caught.value.outcome is Outcome.TEST_FAIL
    assert caught.value.evidence.log_path == vm.machine.console_log


def test_init_that_exits_is_kernel_fault_even_after_its_pass_marker(boot) -> None:
    vm = boot(variables={"after": "exit"}, start=False)
    # The init prints PASS, then exits: the kernel panics. Whichever wait the panic ends
    # (it may arrive in the same console read as PASS), the run's one outcome is the fault.
    result = boot_module.run(vm, kernel=vm.kernel, accel=vm.spec.accel)
    assert result.outcome is Outcome.KERNEL_FAULT, result.render()
    error = result.error
    assert isinstance(error, KernelFault)
    assert "init-died" in error.message
    assert "Attempted to kill init" in error.evidence.excerpt
    # The marker really was printed: the fault won over it, it did not replace a missing one.
    assert f"[bootharness:{vm.nonce}] PASS" in vm.machine.console_log.read_text()


def test_sysrq_crash_is_kernel_fault_from_the_console(boot) -> None:
    vm = boot(variables={"commands": ["echo c > /proc/sysrq-trigger", "sleep 30"]})
    with pytest.raises(KernelFault, match="sysrq triggered crash") as caught:
        vm.expect_pass()
    # Judged from the console's own fault line, not from a deadline running out.
    assert any(m.name.startswith("fault:") for m in vm.marks), vm.marks
    # The same panic reached QEMU through the pvpanic device.
    assert vm.qmp.wait_event(["GUEST_PANICKED"], time.monotonic() + 2.0) is not None, [
        e.name for e in vm.qmp.events
    ]
    assert "Kernel panic" in caught.value.evidence.excerpt


def test_pvh_boots_start_from_qboot_and_keep_pvpanic_and_the_full_log(boot) -> None:
    """qboot is the fast firmware of PVH boots; it must still hand the kernel ACPI (pvpanic
    is found through it) and lose none of the log."""
    qboot = firmware.qboot()
    assert qboot is not None, "qemu-system-data installs /usr/share/qemu/qboot.rom"
    vm = boot(variables={"commands": ["echo c > /proc/sysrq-trigger", "sleep 30"]})
    argv = vm.machine.argv
    assert argv[argv.index("-bios") + 1] == str(qboot)
    with pytest.raises(KernelFault):
        vm.expect_pass()
    assert vm.qmp.wait_event(["GUEST_PANICKED"], time.monotonic() + 2.0) is not None
    log = vm.machine.console_log.read_text()
    assert log.count("Linux version") == 1 and "ACPI: Interpreter enabled" in log


def test_a_firmware_option_of_none_boots_through_seabios(boot) -> None:
    vm = boot(firmware=None)
    vm.expect_pass()
    assert "-bios" not in vm.machine.argv


def test_init_that_sleeps_forever_is_boot_timeout_at_its_deadline(boot) -> None:
    deadlines = Deadlines(init=4.0)
    vm = boot(variables={"commands": ["sleep 100000"]}, deadlines=deadlines)
    started = time.monotonic()
    with pytest.raises(BootTimeout, match="init phase") as caught:
        vm.expect_pass()
    waited = time.monotonic() - started
    assert waited >= deadlines.of("init")  # not before the deadline
    assert caught.value.outcome is Outcome.BOOT_TIMEOUT
    assert vm.machine.poll() is None, "QEMU must still be alive at a timeout"


def test_bad_qemu_option_is_infra_error_with_qemus_message(kernel: Kernel, tmp_path: Path) -> None:
    spec = MachineSpec(kernel=kernel.vmlinuz, extra_args=("-no-such-option",))
    vm = boot_module.Vm(spec, tmp_path / "vm", nonce="x")
    with pytest.raises(InfraError) as caught, vm:
        vm.start()
    assert "-no-such-option" in caught.value.message
    assert "invalid option" in caught.value.message
    assert caught.value.evidence.argv[-1] == "-no-such-option"
    assert vm.machine.poll() is not None


def test_missing_kernel_file_is_config_error(tmp_path: Path) -> None:
    toml = tmp_path / "kernels.toml"
    toml.write_text('[kernels."mine"]\nvmlinuz = "no/such/bzImage"\n')
    from harness.kernel.catalogue import load_catalogue

    with pytest.raises(ConfigError, match="no/such/bzImage") as caught:
        load_catalogue(toml)
    assert caught.value.outcome is Outcome.CONFIG_ERROR
