"""Driving a running guest for real: shell commands, QMP state, power, reset, hotplug, exit codes.

Every test boots the default kernel under QEMU; the rescue-mode checks share one boot.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import tools
from harness.image import initramfs
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError, KernelFault, Outcome
from harness.plugin.fixtures import BootVm, GuestFactory
from harness.vm import faults, power
from harness.vm.accel import AccelChoice
from harness.vm.boot import BootRequest, Vm, prepare_vm
from harness.vm.deadlines import Deadlines
from harness.vm.exitcode import DEBUG_EXIT_DEVICE, GuestExitError
from harness.vm.hotplug import add_disk, remove_disk
from harness.vm.shell import CommandFailed, CommandTimeout, GuestShell

SHELL = {"after": "shell"}


def test_shell_returns_exact_output_and_status_even_after_early_input(boot: BootVm) -> None:
    vm = boot(variables={**SHELL, "commands": ["sleep 1"]})
    # Typed while the init still runs, before any shell reads the console: an unclosed
    # quote that swallows the next lines, until the attach's Ctrl-C retry clears it.
    vm.console.sendline('echo "unterminated')
    sh = vm.shell()
    assert sh.sync_attempts >= 2

    result = sh.run("echo out; echo err >&2; (exit 7)")
    assert (result.output, result.status) == ("out\nerr\n", 7)
    assert sh.run("printf 'no newline'").output == "no newline"
    assert sh.run("printf 'trailing\\n\\n\\n'").output == "trailing\n\n\n"
    assert sh.run("printf '\\303\\251t\\303\\251\\n'").output == "été\n"
    # The command runs in the shell itself: state persists between commands.
    sh.check("cd /proc/self && marker_variable=kept")
    assert sh.run('pwd; echo "$marker_variable"').output.splitlines()[1] == "kept"
    # Quotes, $ and backslashes arrive untouched; a long command goes in pieces.
    tricky = "a'b\"c$HOME\\n`x`"
    assert sh.run(f"cat <<'EOF'\n{tricky}\nEOF").output == tricky + "\n"
    long_word = "x" * 5000
    assert sh.run(f"echo {long_word} | wc -c").output.strip() == "5001"
    # Output shaped like kernel messages is the command's own and comes back whole.
    dmesg = sh.check("dmesg")
    assert re.match(r"\[ *0\.000000\] Linux version ", dmesg), dmesg[:200]
    assert len(dmesg.splitlines()) > 100
    # stdin is /dev/null, so a command that reads it cannot eat the next command.
    assert sh.run("cat").output == ""

    with pytest.raises(CommandFailed, match=r"'ls /no/such' exited 1") as caught:
        sh.check("ls /no/such")
    assert caught.value.outcome is Outcome.TEST_FAIL
    assert "No such file" in caught.value.result.output


def test_output_interleaved_with_kernel_messages_is_exact(boot: BootVm) -> None:
    # printk.devkmsg=on: no rate limit on /dev/kmsg, so the flood really floods; <0> is the
    # emergency level, which reaches the console whatever the log level (the frame check
    # below sees the noise inside the command's output on the console).
    sh = boot(variables=SHELL, cmdline="printk.devkmsg=on").shell()
    flood = sh.check(
        "(while :; do echo '<0>bootharness noise' >/dev/kmsg; done) >/dev/null 2>&1 & echo $!"
    ).strip()
    recorder = sh.vm.machine.console.recorder
    expected = "".join(f"line {i} of the output\n" for i in range(1, 301))
    split_lines = 0
    for _ in range(10):
        start = len(recorder.text)
        result = sh.run(
            'for i in $(seq 1 300); do echo "line $i of the output"; done; sh -c "exit 3"'
        )
        assert (result.output, result.status) == (expected, 3)
        raw = recorder.text[start:]
        frame = raw[raw.index(":B==") : raw.rindex(":E ")]
        assert "bootharness noise" in frame, "no kernel message landed inside the output"
        # A record that starts in the middle of a line of the framed output.
        split_lines += len(re.findall(r"[^\n]\[ *\d+\.\d{6}\] bootharness noise", frame))
        if split_lines:
            break
    assert split_lines, "no kernel message split a line of output in 10 tries"
    sh.check(f"kill {flood}")


def test_hung_command_ends_at_its_deadline_and_the_vm_stays_usable(boot: BootVm) -> None:
    vm = boot(variables=SHELL, deadlines=Deadlines(command=3.0))
    sh = vm.shell()
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as caught:
        sh.run("sleep 1000")  # the default deadline: Deadlines.command
    deadline = vm.deadlines.of("command")
    waited = time.monotonic() - started
    assert waited >= deadline, waited  # not before the deadline
    error = caught.value
    assert error.outcome is Outcome.BOOT_TIMEOUT
    assert error.command == "sleep 1000" and "'sleep 1000'" in error.message
    assert error.vm_usable and "still usable" in error.message
    assert error.evidence.console_tail and error.evidence.log_path == vm.machine.console_log
    assert sh.run("echo alive").output == "alive\n"

    # A command that ignores Ctrl-C: the shell cannot answer, so the VM is torn down.
    sh = vm.shell(resync_timeout=2.0)
    with pytest.raises(CommandTimeout) as caught:
        sh.run("trap '' INT; while :; do :; done", timeout=2.0)
    assert not caught.value.vm_usable and "VM was stopped" in caught.value.message
    assert vm.machine.poll() is not None, "QEMU must be gone after an unrecoverable timeout"


def test_qmp_state_pause_and_resume(boot: BootVm) -> None:
    vm = boot(variables=SHELL, devices=["virtio-scsi-pci,id=scsi0"])
    sh = vm.shell()
    state = vm.state
    assert state.status().running and state.status().status == "running"
    pci = {device.qdev_id: device for device in state.pci_devices()}
    assert pci["scsi0"].vendor_id == 0x1AF4, pci  # virtio
    assert pci["scsi0"].description == "SCSI controller"
    assert state.block_devices() == []
    since = len(vm.qmp.events)
    state.stop()
    assert state.status() == type(state.status())("paused", False)
    state.expect_event(["STOP"], 5.0, since=since)
    # A paused guest runs nothing: a line typed now is only answered after cont.
    vm.console.sendline("echo answered-after-resume")
    vm.console.drain(0.5)
    assert "answered-after-resume" not in vm.console.recorder.text
    state.cont()
    state.expect_event(["RESUME"], 5.0, since=since)
    vm.console.expect("answered-after-resume", phase="command", timeout=5.0)
    assert sh.run("echo running").output == "running\n"


def test_power_button_powers_off_with_reason(boot: BootVm, kernel: Kernel) -> None:
    vm = boot(variables={**SHELL, "power_button": True}, modules=power.power_button_modules(kernel))
    sh = vm.shell()
    sh.wait_until("pidof acpid", 5.0)
    sh.check("grep -q 'Power Button' /proc/bus/input/devices")
    event = vm.power_button()
    assert event.name == "SHUTDOWN"
    assert event.data == {"guest": True, "reason": "guest-shutdown"}
    assert vm.machine.poll() == 0
    marks = {m.name: m.detail for m in vm.marks}
    assert "qmp:POWERDOWN" in marks and marks["qmp:SHUTDOWN"] == "guest-shutdown"
    assert "reboot: Power down" in vm.machine.console.recorder.text
    logged = [json.loads(line) for line in vm.machine.qmp_log.read_text().splitlines()]
    assert {"event": "SHUTDOWN", "data": event.data} in [
        {"event": e["event"], "data": e["data"]} for e in logged
    ]


def test_reset_on_purpose_boots_again_and_guest_reboot_still_ends_qemu(guest: GuestFactory) -> None:
    sh = guest()
    vm = sh.vm
    sh.check("echo first boot > /run/left-behind")
    event = vm.reset()
    assert event.data == {"guest": False, "reason": "host-qmp-system-reset"}
    recorder = vm.machine.console.recorder
    assert recorder.scanner.boots == 2
    assert not recorder.serious_faults()
    names = [m.name for m in vm.marks]
    assert names.count("kernel-banner") == 2 and names.count("INIT-START") == 2
    assert names.index("qmp:RESET") < len(names) - names[::-1].index("kernel-banner")
    # The shell follows the new boot; the initramfs is fresh again.
    assert sh.run("cat /run/left-behind").status != 0
    assert sh.run("echo second").output == "second\n"
    # -no-reboot holds again: a reboot the guest asks for ends QEMU instead of booting.
    since = len(vm.qmp.events)
    sh.send_final("reboot -f")
    shutdown = vm.state.expect_event(["SHUTDOWN"], 20.0, since=since)
    assert shutdown.data["reason"] == "guest-reset"
    assert vm.machine.wait(10.0) == 0
    assert recorder.scanner.boots == 2


def test_unexpected_reboot_is_a_kernel_fault(guest: GuestFactory) -> None:
    sh = guest()
    vm = sh.vm
    vm.state.set_reboot_action("reset")  # let it boot again, without announcing it
    sh.send_final("reboot -f")
    with pytest.raises(KernelFault, match="unexpected-reboot") as caught:
        vm.expect_marker("INIT-START", phase="kernel")
    assert caught.value.outcome is Outcome.KERNEL_FAULT
    assert "Linux version" in caught.value.evidence.excerpt


def test_hotplugged_disks_appear_and_disappear_in_the_guest(boot: BootVm, tmp_path: Path) -> None:
    images = {}
    for name, size in (("scsi", "8M"), ("blk", "4M")):
        images[name] = tmp_path / f"{name}.img"
        subprocess.run(
            [tools.require("qemu-img"), "create", "-f", "raw", str(images[name]), size],
            check=True,
            capture_output=True,
        )
    # mdev logs every uevent it gets for a disk: proof the guest saw the change, not only
    # devtmpfs.
    mdev_conf = b'(sd[a-z]|vd[a-z]) 0:0 660 *echo "$ACTION $MDEV" >>/run/uevents.log\n'
    vm = boot(
        variables={**SHELL, "mdev_daemon": True},
        modules=["virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod"],
        files={"etc/mdev.conf": mdev_conf},
        devices=["virtio-scsi-pci,id=scsi0"],
    )
    sh = vm.shell()
    # Disks only: a kernel with the RAM disk driver built in (the minimal one) has /dev/ram0.
    listing = "ls /sys/block | grep -v '^ram'"
    assert sh.run(listing).output.split() == []

    scsi = add_disk(vm.qmp, images["scsi"], "hp-scsi", driver="scsi-hd", bus="scsi0.0")
    blk = add_disk(vm.qmp, images["blk"], "hp-blk", driver="virtio-blk-pci")
    sh.wait_until("[ -b /dev/sda ] && [ -b /dev/vda ]", 20.0)
    assert sh.run(listing).output.split() == ["sda", "vda"]
    sizes = sh.check("cat /sys/block/sda/size /sys/block/vda/size").split()
    assert sizes == [str(8 * 2048), str(4 * 2048)]
    sh.wait_until("grep -q 'add sda' /run/uevents.log && grep -q 'add vda' /run/uevents.log", 5.0)
    nodes = {b.node_name: b for b in vm.state.block_devices()}
    # The image went to QEMU as our open descriptor (a sandboxed QEMU opens no paths).
    assert nodes["hp-scsi-node"].filename == f"/dev/fdset/{scsi.fdset}"
    assert "hp-blk" in {p.qdev_id for p in vm.state.pci_devices()}

    for disk in (scsi, blk):
        event = remove_disk(vm.qmp, disk)
        assert event.data["device"] == disk.device_id
    sh.wait_until("! [ -e /dev/sda ] && ! [ -e /dev/vda ]", 20.0)
    assert sh.run(listing).output.split() == []
    log = sh.check("cat /run/uevents.log").splitlines()
    assert "remove sda" in log and "remove vda" in log, log
    assert vm.state.block_devices() == []
    assert "hp-blk" not in {p.qdev_id for p in vm.state.pci_devices()}


def test_guest_exit_code_3_fails_the_test_with_that_code(boot: BootVm) -> None:
    vm = boot(variables={"after": "exit-code", "exit_code": 3}, devices=[DEBUG_EXIT_DEVICE])
    with pytest.raises(GuestExitError, match="exited with code 3") as caught:
        vm.wait_exit_code()
    assert caught.value.code == 3
    assert caught.value.outcome is Outcome.TEST_FAIL
    assert vm.machine.poll() == (3 << 1) | 1
    assert [m.detail for m in vm.marks if m.name == "EXIT-CODE"] == ["3"]


def test_guest_exit_code_0_from_the_shell_passes(guest: GuestFactory) -> None:
    sh = guest(devices=[DEBUG_EXIT_DEVICE])
    sh.exit_with(0)
    assert sh.vm.wait_exit_code() == 0
    assert sh.vm.machine.poll() == 1


def test_exit_code_without_the_device_is_a_config_error(boot: BootVm) -> None:
    vm = boot(variables={"after": "poweroff"})
    with pytest.raises(ConfigError, match="isa-debug-exit"):
        vm.wait_exit_code()
    vm.wait_shutdown()


# --- rescue mode: kernel and initramfs only, no disk; one boot for the module ----------


@pytest.fixture(scope="module")
def rescue(
    request: pytest.FixtureRequest,
    kernel: Kernel,
    bootharness_accel: AccelChoice,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GuestShell]:
    from harness.plugin.settings import settings_key

    settings = request.config.stash[settings_key]
    request = BootRequest(
        kernel,
        initramfs.InitramfsSpec(variables=SHELL),
        accel=bootharness_accel.name,
        deadlines=settings.deadlines,
    )
    vm: Vm = prepare_vm(
        request, cache_root=settings.cache_dir, workdir=tmp_path_factory.mktemp("rescue") / "vm"
    )
    with vm:
        vm.start()
        yield vm.shell()


@pytest.mark.boot
def test_rescue_tmpfs_size_limit_is_enforced(rescue: GuestShell) -> None:
    rescue.check("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small")
    result = rescue.run("dd if=/dev/zero of=/mnt/small/fill bs=1k count=2048")
    assert result.status != 0
    assert "No space left on device" in result.output
    used = int(rescue.check("du -k /mnt/small/fill").split()[0])
    assert 0 < used <= 1024
    assert " /mnt/small tmpfs rw" in rescue.check("cat /proc/mounts")
    rescue.check("umount /mnt/small")


@pytest.mark.boot
def test_rescue_dev_shm_and_devpts(rescue: GuestShell) -> None:
    mounts = rescue.check("cat /proc/mounts")
    assert re.search(r"^tmpfs /dev/shm tmpfs rw", mounts, re.M), mounts
    assert re.search(r"^devpts /dev/pts devpts rw", mounts, re.M), mounts
    assert rescue.check("echo shared > /dev/shm/x && cat /dev/shm/x") == "shared\n"
    # Opening /dev/ptmx makes a new pty: its number shows in /dev/pts while it is open.
    before = set(rescue.check("ls /dev/pts").split())
    during = set(rescue.check("exec 3<>/dev/ptmx; ls /dev/pts; exec 3>&-").split())
    assert len(during - before) == 1 and (during - before).pop().isdigit(), (before, during)


@pytest.mark.boot
def test_rescue_proc_and_sys_contents(rescue: GuestShell, kernel: Kernel) -> None:
    assert rescue.check("uname -r").strip() == kernel.release
    cmdline = rescue.check("cat /proc/cmdline")
    assert f"bootharness.nonce={rescue.vm.nonce}" in cmdline
    assert rescue.check("echo $$").strip() == "1"  # the shell is PID 1
    memtotal_kb = int(re.search(r"MemTotal:\s+(\d+) kB", rescue.check("cat /proc/meminfo"))[1])
    assert 400 * 1024 < memtotal_kb <= 512 * 1024
    assert rescue.check("cat /sys/class/tty/ttyS0/dev").strip() == "4:64"
    assert rescue.check("cat /sys/devices/system/cpu/online").strip() == "0"
    assert "Power Button" not in rescue.check("cat /proc/bus/input/devices")  # no button module


@pytest.mark.boot
def test_rescue_dmesg_is_free_of_faults(rescue: GuestShell) -> None:
    dmesg = rescue.check("dmesg")
    assert dmesg.count("Linux version") == 1
    found = faults.classify(dmesg)
    assert found == [], [f.line for f in found]
    errors = rescue.check("dmesg -r | grep -E '^<[0-3]>' || true")
    assert errors == "", errors
