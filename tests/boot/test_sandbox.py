"""QEMU confines itself (harness.vm.sandbox): seccomp filtering on, and, when the harness runs
as root, another user; read from /proc/PID/status of the running QEMU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.outcome import InfraError
from harness.plugin.fixtures import BootVm
from harness.vm import sandbox
from harness.vm.qmp import QmpError


def status_of(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


@pytest.mark.skipif(os.geteuid() != 0, reason="the harness drops QEMU's privileges only as root")
def test_qemu_started_as_root_runs_as_another_user_with_seccomp_on(boot: BootVm) -> None:
    vm = boot(variables={"commands": ["echo confined"]})
    status = status_of(vm.machine.pid)
    uids = {int(value) for value in status["Uid"].split()}  # real, effective, saved, fs
    gids = {int(value) for value in status["Gid"].split()}
    assert 0 not in uids and 0 not in gids, status["Uid"]
    assert len(uids) == 1 and len(gids) == 1
    assert status["Seccomp"] == "2", "seccomp filter mode"
    assert int(status["Seccomp_filters"]) >= 1
    assert status["NoNewPrivs"] == "1"
    vm.expect_pass()


def test_a_forbidden_system_call_kills_qemu_and_the_error_says_so(boot: BootVm) -> None:
    """``spawn=deny``: QEMU may not run a helper (an ``exec:`` migration would); the kernel
    kills it with SIGSYS and the error names the sandbox instead of an empty stderr."""
    vm = boot(variables={"after": "shell"})
    with pytest.raises(QmpError):
        vm.qmp.command("migrate", uri="exec:true")
    assert vm.machine.wait(10.0) == -31  # SIGSYS
    error = vm.machine.exited_error("died")
    assert isinstance(error, InfraError) and "seccomp sandbox refused a system call" in str(error)


def test_sandbox_off_leaves_qemu_unconfined(boot: BootVm) -> None:
    vm = boot(variables={"commands": ["true"]}, sandbox=sandbox.OFF)
    status = status_of(vm.machine.pid)
    assert status["Seccomp"] == "0"
    assert status["Uid"].split()[0] == str(os.geteuid())
    assert "-sandbox" not in vm.machine.argv and "-runas" not in vm.machine.argv
    vm.expect_pass()


def test_sandbox_arguments() -> None:
    qemu = "qemu-system-x86_64"
    assert sandbox.Sandbox(user="").args(qemu) == [
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]
    dropped = sandbox.Sandbox(user="123:456").args(qemu)
    assert "elevateprivileges=allow" in dropped[1]  # QEMU drops privileges after the filter
    assert dropped[2:] in (["-runas", "123:456"], ["-run-with", "user=123:456"])
    assert sandbox.OFF.args(qemu) == []
    assert sandbox.from_options("on", "none") == sandbox.Sandbox(user="")
    assert sandbox.from_options("off", "nobody") == sandbox.OFF
