"""``bootharness boot``: boot one kernel with an initramfs from a template, print the report.

The report is written as the boot goes (:mod:`harness.cli.progress`): head, phases, outcome.
With ``--snapshot`` the VM starts the way the ``boot`` fixture's ``snapshot=True`` starts one
(:func:`harness.snapshot.restore.prepare_vm`): from the cached snapshot of its definition,
made first if there is none, under the same keys and locks; a snapshot that cannot be made or
used means a cold boot, said on the report's ``start:`` line. Commands that differ only in
their ``--run`` share one snapshot.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from harness import upkeep
from harness.cli.common import (
    accelerator,
    add_boot_options,
    add_foreign_options,
    attach,
    boot_request,
    cache_of,
    catalogue_of,
    image_options,
    new_run_dir,
    one_kernel,
)
from harness.cli.progress import BootProgress
from harness.kernel.provision import provision
from harness.outcome import ConfigError
from harness.snapshot import restore
from harness.snapshot.errors import SnapshotWarning
from harness.vm import boot
from harness.vm.deadlines import Deadlines


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``boot``."""
    run = commands.add_parser(
        "boot", parents=[common, image_options()], help="boot a kernel under QEMU"
    )
    add_boot_options(run)
    add_foreign_options(run)
    run.add_argument(
        "--shell", action="store_true", help="after the init succeeds, attach to a shell"
    )
    run.set_defaults(func=cmd_boot)


def cmd_boot(args: argparse.Namespace) -> int:
    if args.shell and not sys.stdin.isatty():
        raise ConfigError("--shell needs a terminal on stdin; run it from an interactive shell")
    root = cache_of(args)
    kernel = provision(one_kernel(catalogue_of(args), args.kernel), root)
    accel = accelerator(args.accel, root)
    deadlines = Deadlines.from_options(args.boot_timeout, args.timeout_multiplier)
    after = "shell" if args.shell else None
    request = boot_request(args, kernel, accel=accel, deadlines=deadlines, after=after)
    workdir = args.workdir or new_run_dir(root, kernel.name)
    if args.snapshot is not None:
        vm = restore.prepare_vm(request, cache_root=root, workdir=workdir, mechanism=args.snapshot)
    else:
        vm = boot.prepare_vm(request, cache_root=root, workdir=workdir)
    with warnings.catch_warnings():
        # A cold boot instead of a snapshot is said once: on the report's start line.
        warnings.simplefilter("ignore", SnapshotWarning)
        if args.shell:
            with vm:
                vm.start()
                vm.expect_pass()
                print("console attached; Ctrl-] to leave", file=sys.stderr, flush=True)
                attach(vm.console.child)
            return 0
        qemu = boot.qemu_version(vm.spec.qemu, cache_root=root)
        head = boot.header_lines(kernel.name, kernel.release, qemu, accel, args.boot_path)
        print("\n".join(head), flush=True)
        with BootProgress(vm, sys.stdout, live=sys.stdout.isatty()) as progress:
            result = boot.run(vm, kernel=kernel, accel=accel, cache_root=root)
            progress.finish(result.marks)
    print("\n".join(result.end_lines()))
    upkeep.prune_now(root)  # at most hourly: every boot adds a folder under runs/
    return result.outcome.cli_exit
