"""How long each phase of a boot may take, scaled by one multiplier for slow machines.

Deadlines, not sleeps: every wait of the harness is bounded by one of these, so a hung guest
is a BOOT_TIMEOUT naming its phase, never a hung test run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Deadlines:
    """Seconds each phase may take before the boot is a BOOT_TIMEOUT."""

    firmware: float = 15.0  # QEMU started -> first console byte (or the firmware's hand-over)
    loader: float = 90.0  # hand-over -> kernel banner: GRUB or the EFI shell loading the kernel
    kernel: float = 60.0  # first byte (or kernel banner) -> /init started
    init: float = 60.0  # /init started -> success or failure marker
    shutdown: float = 20.0  # success -> QEMU exited (when the init powers off)
    command: float = 30.0  # one guest command
    multiplier: float = 1.0

    def of(self, phase: str) -> float:
        """The scaled deadline of ``phase``."""
        value: float = getattr(self, phase)
        return value * self.multiplier

    def scaled(self, multiplier: float) -> Deadlines:
        return replace(self, multiplier=self.multiplier * multiplier)

    @classmethod
    def from_options(cls, boot_timeout: float | None, multiplier: float = 1.0) -> Deadlines:
        """What ``--boot-timeout`` and ``--timeout-multiplier`` ask for: the boot timeout,
        when given, bounds both the kernel and the init phase."""
        if boot_timeout is None:
            return cls(multiplier=multiplier)
        return cls(kernel=boot_timeout, init=boot_timeout, multiplier=multiplier)


DEFAULT_DEADLINES = Deadlines()
