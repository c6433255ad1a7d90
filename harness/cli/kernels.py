"""``bootharness kernels`` and ``bootharness fetch``: what kernels.toml lists, and provisioning."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from harness.cli import text as report
from harness.cli.common import cache_of, catalogue_of
from harness.kernel.provision import is_provisioned, provision
from harness.outcome import HarnessError


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``kernels`` and ``fetch``."""
    kernels = commands.add_parser("kernels", parents=[common], help="list the known kernels")
    kernels.set_defaults(func=cmd_kernels)

    fetch = commands.add_parser("fetch", parents=[common], help="download and unpack kernels")
    fetch.add_argument(
        "selectors",
        nargs="*",
        metavar="NAME|TAG",
        help='kernels to fetch (default: the default kernel; "all": every kernel)',
    )
    fetch.set_defaults(func=cmd_fetch)


def cmd_kernels(args: argparse.Namespace) -> int:
    catalogue = catalogue_of(args)
    root = cache_of(args)
    rows = []
    for entry in catalogue.kernels:
        fetched = is_provisioned(entry, root)
        release = None
        if fetched:
            try:
                release = provision(entry, root, progress=False).release
            except HarnessError as error:  # one broken kernel must not hide the others
                print(f"bootharness: {error.message}", file=sys.stderr)
        rows.append(report.KernelRow(entry, entry.name == catalogue.default, fetched, release))
    print("\n".join(report.kernel_table(rows)))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    catalogue = catalogue_of(args)
    root = cache_of(args)
    entries = (
        list(catalogue.kernels) if "all" in args.selectors else catalogue.select(args.selectors)
    )
    rows = [["NAME", "RELEASE", "VMLINUZ"]]
    for entry in entries:
        kernel = provision(entry, root)
        rows.append([kernel.name, kernel.release, str(kernel.vmlinuz)])
    print("\n".join(report.table(rows)))
    return 0
