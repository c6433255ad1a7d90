"""``bootharness accel``: the accelerator boots on this host use, and why.

The same decision every boot takes (:func:`harness.vm.accel.choose_accelerator`: KVM only
when a probe guest really runs under it, the verdict cached per QEMU binary and host boot),
said on one line, so a CI job's log shows whether its runner gave the container /dev/kvm.
``--accel kvm`` makes it a check: exit 4 (INFRA_ERROR) when KVM cannot be used.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from harness.cli.common import cache_of
from harness.vm.accel import VALID_REQUESTS, KvmFallbackWarning, choose_accelerator


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``accel``."""
    parser = commands.add_parser(
        "accel", parents=[common], help="say which accelerator boots use here (KVM or TCG) and why"
    )
    parser.add_argument(
        "--accel", choices=VALID_REQUESTS, default="auto", help="kvm: fail unless KVM works"
    )
    parser.set_defaults(func=cmd_accel)


def cmd_accel(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmFallbackWarning)  # said below, once
        choice = choose_accelerator(args.accel, cache_dir=cache_of(args) / "accel")
    print(f"accel: {choice.name} ({choice.reason})")
    return 0
