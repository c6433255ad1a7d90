"""What a kernel can do, from its build configuration; skip tests it cannot run.

An option is satisfied when the kernel has it built in or as a module (``y`` or ``m``);
``"CONFIG_X=y"`` only when it is built in (what the kernel needs before any module can load,
like the RAM disk of a legacy initrd). ``"A|B"`` is satisfied by either (ext2 is served by
``CONFIG_EXT2_FS`` or by ext4 with ``CONFIG_EXT4_USE_FOR_EXT2``). A kernel whose
configuration is unknown (a local build without ``config =``) is never skipped: the boot
itself then tells.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest

from harness.kernel.provision import Kernel

MARKER = "kernel_config"


def missing(kernel: Kernel, options: Iterable[str]) -> list[str]:
    """The options (as written, ``A|B`` kept whole) ``kernel`` lacks; [] when unknown."""
    if not kernel.config:
        return []
    return [
        option
        for option in dict.fromkeys(options)
        if not any(_has(kernel, alt.strip()) for alt in option.split("|"))
    ]


def _has(kernel: Kernel, option: str) -> bool:
    name, equals, value = option.partition("=")
    if equals:
        return kernel.config.get(name) == value
    return kernel.has_config(option)


def _described(kernel: Kernel, option: str) -> str:
    """``CONFIG_X=y (has m)`` for a value requirement the kernel meets otherwise."""
    name, equals, _ = option.partition("=")
    if equals and "|" not in option:
        return f"{option} (has {kernel.config.get(name, 'not set')})"
    return option


def lacks_reason(kernel: Kernel, requirements: Mapping[str, Iterable[str]]) -> str | None:
    """Why ``kernel`` cannot serve ``requirements`` (what -> options), or None if it can.

    e.g. ``kernel debian-6.1-cloud-amd64 (6.1.0-56-cloud-amd64) lacks CONFIG_SATA_AHCI,
    needed by controller ahci``.
    """
    reasons = []
    for what, options in requirements.items():
        lacking = [_described(kernel, option) for option in missing(kernel, options)]
        if lacking:
            reasons.append(f"{', '.join(lacking)}, needed by {what}")
    if not reasons:
        return None
    return f"kernel {kernel.name} ({kernel.release}) lacks " + "; ".join(reasons)


def require_config(kernel: Kernel, *options: str, why: str = "this test") -> None:
    """Skip the running test unless ``kernel`` has every option (``A|B``: either).

    Raises:
        pytest.skip.Exception: with the kernel and the missing options in its reason.
    """
    reason = lacks_reason(kernel, {why: options})
    if reason is not None:
        pytest.skip(reason)
