"""Power events the test asks for: the ACPI power button, and a reset that boots again.

**Power button.** QMP ``system_powerdown`` only raises the ACPI power-button event; the
guest must act on it. The default init does when rendered with ``power_button=True`` and
built with :func:`power_button_modules` (``evdev`` and the ACPI ``button`` driver, when
the kernel has them as modules): busybox ``acpid`` reads the button's input events and runs
``/etc/acpi/PWRF/00000080``, which powers off. :func:`press_power_button` then waits for
QEMU's SHUTDOWN event and records its reason (``guest-shutdown``) on the VM's timeline.

**Reset.** The harness runs QEMU with ``-no-reboot``, so a reset the guest asks for ends QEMU
(no reboot loop can hide a crash) and so does a QMP ``system_reset``: QEMU turns any reset
request into a shutdown while the reboot action is ``shutdown``. :func:`reset` therefore
raises the number of boots the fault scanner expects, switches the reboot action to
``reset`` just for this request, resets, switches it back as soon as QEMU reports the RESET,
and waits for the new kernel banner and the init's INIT-START marker. A second ``Linux
version`` banner that no :func:`reset` announced stays what it was: an ``unexpected-reboot``
kernel fault.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from harness.kernel.provision import Kernel
from harness.outcome import BootTimeout, KernelFault
from harness.vm.console import ConsoleClosed, Mark
from harness.vm.faults import PRINTK_PREFIX
from harness.vm.guest import Guest
from harness.vm.qmp import QmpEvent
from harness.vm.state import EventTimeout, VmState

log = logging.getLogger(__name__)

POWER_BUTTON_MODULES = ("evdev", "button")
_BANNER = re.compile(PRINTK_PREFIX + "Linux version ")


def power_button_modules(kernel: Kernel) -> tuple[str, ...]:
    """The modules the guest needs to see the ACPI power button (those built as modules)."""
    options = {"evdev": "CONFIG_INPUT_EVDEV", "button": "CONFIG_ACPI_BUTTON"}
    if not kernel.config:  # no config to read: ask for both and let resolution decide
        return POWER_BUTTON_MODULES
    return tuple(name for name in POWER_BUTTON_MODULES if kernel.config.get(options[name]) == "m")


def record_event(vm: Guest, event: QmpEvent) -> None:
    """Put a QMP event on the VM's timeline (``vm.marks``), with its reason."""
    recorder = vm.machine.console.recorder
    reason = str(event.data.get("reason", ""))
    recorder.marks.append(Mark(f"qmp:{event.name}", event.received - recorder.started, reason))


def press_power_button(vm: Guest, timeout: float | None = None) -> QmpEvent:
    """Press the ACPI power button and wait for the guest to power off; the SHUTDOWN event.

    ``timeout`` defaults to the ``shutdown`` deadline. QEMU is reaped and the console read
    to its end, so a fault printed while shutting down still counts.

    Raises:
        EventTimeout: no SHUTDOWN within the deadline (the guest ignored the button: was it
            built with ``power_button=True`` and :func:`power_button_modules`?).
        KernelFault: the kernel faulted while shutting down.
        QmpError: QEMU refused ``system_powerdown``.
    """
    limit = vm.deadlines.of("shutdown") if timeout is None else timeout
    state = VmState(vm.qmp)
    since = len(vm.qmp.events)
    state.system_powerdown()
    event = state.expect_event(
        ["SHUTDOWN"],
        limit,
        since=since,
        what="the guest did not act on the ACPI power button: build it with "
        "power_button=True and the evdev and button modules",
    )
    for powerdown in state.events("POWERDOWN", since=since):
        record_event(vm, powerdown)
    record_event(vm, event)
    log.info("power button: SHUTDOWN %s", event.data)
    if vm.wait_shutdown() is None:
        raise BootTimeout(f"QEMU did not exit within {limit:.1f} s after SHUTDOWN {event.data}")
    return event


def reset(vm: Guest, timeout: float | None = None) -> QmpEvent:
    """Reset the machine on purpose and wait until the kernel boots again to INIT-START.

    Returns the RESET event (reason ``host-qmp-system-reset``). ``timeout`` bounds the wait
    for the RESET event (default: the ``shutdown`` deadline); the new boot then has the usual
    ``kernel`` deadline.

    Raises:
        EventTimeout: QEMU did not report the reset.
        InfraError: QEMU exited during the reset.
        KernelFault: the new boot faulted, or the kernel booted more often than announced.
        BootTimeout: the new boot did not reach INIT-START in time.
    """
    limit = vm.deadlines.of("shutdown") if timeout is None else timeout
    recorder = vm.machine.console.recorder
    boots = recorder.scanner.boots
    _expect_one_more_boot(vm)
    state = VmState(vm.qmp)
    since = len(vm.qmp.events)
    state.set_reboot_action("reset")
    try:
        state.system_reset()
        event = state.expect_event(
            ["RESET"], limit, since=since, match=lambda e: e.data.get("guest") is False
        )
        record_event(vm, event)
        # SeaBIOS answers a warm reset with hard resets of its own (guest-reset events):
        # those must still reset, so -no-reboot's action comes back only with the kernel.
        _expect_banner(vm)
    finally:
        # A reset the guest asks for later must end QEMU again (-no-reboot's meaning).
        if vm.machine.poll() is None:
            state.set_reboot_action("shutdown")
    vm.expect_marker("INIT-START", phase="kernel")
    if recorder.scanner.boots != boots + 1:
        raise KernelFault(
            f"expected one new boot after the reset, the console shows "
            f"{recorder.scanner.boots - boots}",
            vm.evidence("kernel"),
        )
    log.info("reset: %s, booted again at %.2f s", event.data, time.monotonic() - recorder.started)
    return event


def _expect_banner(vm: Guest) -> None:
    try:
        vm.machine.console.expect(_BANNER, phase="kernel", timeout=vm.deadlines.of("firmware"))
    except ConsoleClosed:
        raise vm.machine.exited_error("exited while the guest was being reset") from None


def _expect_one_more_boot(vm: Guest) -> None:
    vm.machine.announce_boot()


__all__: Sequence[str] = (
    "POWER_BUTTON_MODULES",
    "EventTimeout",
    "power_button_modules",
    "press_power_button",
    "record_event",
    "reset",
)
