"""What the guest drivers (shell, power, exit codes) need from a VM being booted.

:class:`harness.vm.boot.Vm` satisfies this protocol and offers the drivers as methods
(``vm.shell()``, ``vm.reset()``, ``vm.wait_exit_code()``); the drivers depend on this small
protocol instead of on ``Vm`` itself, so the imports run one way: boot -> drivers -> guest.
"""

from __future__ import annotations

from typing import Protocol

from harness.outcome import Evidence
from harness.vm.console import Console, Mark
from harness.vm.deadlines import Deadlines
from harness.vm.machine import Machine, MachineSpec
from harness.vm.qmp import Qmp


class Guest(Protocol):
    """A started (or startable) VM: its machine, console, QMP, nonce and deadlines."""

    spec: MachineSpec
    machine: Machine
    nonce: str
    deadlines: Deadlines

    @property
    def console(self) -> Console: ...

    @property
    def qmp(self) -> Qmp: ...

    @property
    def marks(self) -> list[Mark]: ...

    def evidence(self, phase: str) -> Evidence: ...

    def check_faults(self, phase: str) -> None: ...

    def expect_marker(
        self, *events: str, phase: str, timeout: float | None = None
    ) -> tuple[str, str]: ...

    def expect_pass(self) -> None: ...

    def wait_shutdown(self) -> int | None: ...

    def stop(self) -> None: ...
