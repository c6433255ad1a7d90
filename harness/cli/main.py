"""The ``bootharness`` command: list and fetch kernels, build and inspect initramfs images, boot.

Parsing, calls into the library, printing; nothing else lives here. The exit code is the
outcome's (docs/architecture.md): a usage error, like a bad ``kernels.toml``, exits 5; a
:class:`~harness.outcome.HarnessError` exits with its outcome's code; any other exception is
a harness bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from harness import upkeep
from harness.cli import bisect as bisect_commands
from harness.cli import build as build_commands
from harness.cli import cache as cache_commands
from harness.cli import foreign as foreign_commands
from harness.cli import matrix as matrix_commands
from harness.cli import report as report_commands
from harness.cli import text as report
from harness.cli.common import (
    USAGE_EXIT,
    Parser,
    accelerator,
    add_boot_options,
    add_foreign_options,
    add_global_options,
    attach,
    boot_request,
    cache_of,
    catalogue_of,
    image_options,
    initramfs_spec,
    new_run_dir,
    one_kernel,
    setup_logging,
)
from harness.cli.progress import BootProgress
from harness.image import cpio, initramfs
from harness.kernel.provision import is_provisioned, provision
from harness.outcome import ConfigError, HarnessError
from harness.vm import boot
from harness.vm.deadlines import Deadlines

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error
        return done.code if isinstance(done.code, int) else USAGE_EXIT
    setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except HarnessError as error:
        print(f"bootharness: {error}", file=sys.stderr)
        return error.outcome.cli_exit
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bootharness``, with every subcommand."""
    parser = Parser(prog="bootharness", description=__doc__.split("\n", 1)[0])
    add_global_options(parser, suppress=False)
    # The same options after the subcommand too; SUPPRESS keeps the subparser from
    # overwriting a value given before it with its default.
    common = Parser(add_help=False)
    add_global_options(common, suppress=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

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

    image = image_options()
    ramfs = commands.add_parser("initramfs", help="build or inspect initramfs images")
    ramfs_commands = ramfs.add_subparsers(title="commands", metavar="COMMAND", required=True)
    build = ramfs_commands.add_parser(
        "build", parents=[common, image], help="build an initramfs (cached)"
    )
    build.add_argument("-o", "--output", type=Path, help="copy the image to this file or folder")
    build.set_defaults(func=cmd_initramfs_build)
    ls = ramfs_commands.add_parser("ls", parents=[common], help="list an initramfs like ls -l")
    ls.add_argument("file", type=Path, help="an initramfs: cpio, compressed or concatenated")
    ls.add_argument("--paths", action="store_true", help="print only the paths")
    ls.set_defaults(func=cmd_initramfs_ls)
    foreign_commands.register(ramfs_commands, common)

    run = commands.add_parser("boot", parents=[common, image], help="boot a kernel under QEMU")
    add_boot_options(run)
    add_foreign_options(run)
    run.add_argument(
        "--shell", action="store_true", help="after the init succeeds, attach to a shell"
    )
    run.set_defaults(func=cmd_boot)
    # Command groups in modules of their own: each register() adds its subcommands.
    for module in (
        build_commands,
        bisect_commands,
        cache_commands,
        matrix_commands,
        report_commands,
    ):
        module.register(commands, common)
    return parser


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


def cmd_initramfs_build(args: argparse.Namespace) -> int:
    root = cache_of(args)
    kernel = provision(one_kernel(catalogue_of(args), args.kernel), root)
    image = initramfs.build(kernel, initramfs_spec(args), root)
    copied_to = None
    if args.output is not None:
        try:
            copied_to = Path(shutil.copy(image.path, args.output))
        except OSError as error:
            raise ConfigError(f"cannot copy the image to {args.output}: {error.strerror}") from None
    print("\n".join(report.build_summary(image, copied_to)))
    return 0


def cmd_initramfs_ls(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it: {error.strerror}") from None
    try:
        entries = cpio.read_archive(data)
    except ValueError as error:
        raise ConfigError(f"{path}: not a readable initramfs: {error}") from None
    lines = [e.path for e in entries] if args.paths else report.ls_lines(entries)
    print("\n".join(lines))
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    if args.shell and not sys.stdin.isatty():
        raise ConfigError("--shell needs a terminal on stdin; run it from an interactive shell")
    root = cache_of(args)
    kernel = provision(one_kernel(catalogue_of(args), args.kernel), root)
    accel = accelerator(args.accel, root)
    deadlines = Deadlines.from_options(args.boot_timeout, args.timeout_multiplier)
    after = "shell" if args.shell else None
    request = boot_request(args, kernel, accel=accel, deadlines=deadlines, after=after)
    vm = boot.prepare_vm(
        request, cache_root=root, workdir=args.workdir or new_run_dir(root, kernel.name)
    )
    if args.shell:
        with vm:
            vm.start()
            vm.expect_pass()
            print("console attached; Ctrl-] to leave", file=sys.stderr, flush=True)
            attach(vm.console.child)
        return 0
    # The report is written as the boot goes (harness.cli.progress): head, phases, outcome.
    qemu = boot.qemu_version(vm.spec.qemu)
    head = boot.header_lines(kernel.name, kernel.release, qemu, accel, args.boot_path)
    print("\n".join(head), flush=True)
    with BootProgress(vm, sys.stdout, live=sys.stdout.isatty()) as progress:
        result = boot.run(vm, kernel=kernel, accel=accel)
        progress.finish(result.marks)
    print("\n".join(result.end_lines()))
    upkeep.prune_now(root)  # at most hourly: every boot adds a folder under runs/
    return result.outcome.cli_exit


if __name__ == "__main__":
    sys.exit(main())
