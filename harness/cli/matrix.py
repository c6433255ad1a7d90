"""``bootharness matrix`` (the CI job matrix) and ``bootharness replay`` (boot a failure again).

Registered through :data:`harness.cli.main.build_parser`; parsing, calls and printing only.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from harness.cache import cache_root
from harness.cli import fanout
from harness.cli.common import add_snapshot_option, attach, new_run_dir
from harness.kernel.catalogue import find_catalogue, load_catalogue
from harness.outcome import ConfigError, HarnessError
from harness.report import bundle, replay
from harness.snapshot.errors import SnapshotWarning
from harness.storage import controllers


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``matrix`` and ``replay`` subcommands."""
    jobs = commands.add_parser(
        "matrix", parents=[common], help="print the CI job matrix (one job per kernel)"
    )
    jobs.add_argument(
        "-k",
        "--kernel",
        action="append",
        default=[],
        metavar="NAME|TAG",
        help="kernels by name, tag or tag:TAG (repeatable; default: the default kernel)",
    )
    jobs.add_argument(
        "--controller",
        action="append",
        default=[],
        metavar="NAME|all",
        help="also split by disk controller (repeatable or comma-separated; all: every one)",
    )
    jobs.add_argument("--format", choices=fanout.FORMATS, default="github")
    jobs.add_argument(
        "--gitlab-extends",
        default=fanout.GITLAB_TEMPLATE,
        metavar="JOB",
        help="the job template each GitLab job extends",
    )
    jobs.add_argument(
        "--gitlab-include", metavar="FILE", help="a repository file the child pipeline includes"
    )
    jobs.set_defaults(func=cmd_matrix)

    again = commands.add_parser(
        "replay", parents=[common], help="boot a failed test's reproduction bundle again"
    )
    again.add_argument("bundle", type=Path, help="the bundle folder a failed test left")
    again.add_argument(
        "--shell", action="store_true", help="afterwards, attach to the console (rescue shell)"
    )
    again.add_argument(
        "--accel", choices=("kvm", "tcg"), help="accelerator (default: the recorded one)"
    )
    again.add_argument("--workdir", type=Path, metavar="DIR", help="folder for the replay's files")
    add_snapshot_option(again)
    again.set_defaults(func=cmd_replay)


def cmd_matrix(args: argparse.Namespace) -> int:
    catalogue = load_catalogue(find_catalogue(args.kernels))
    names = [w for value in args.controller for w in value.split(",") if w]
    controller_names = [c.name for c in controllers.select(names)] if names else []
    jobs = fanout.entries(catalogue, args.kernel, controller_names)
    print(
        fanout.render(
            jobs,
            args.format,
            gitlab_extends=args.gitlab_extends,
            gitlab_include=args.gitlab_include,
        )
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.shell and not sys.stdin.isatty():
        raise ConfigError("--shell needs a terminal on stdin; run it from an interactive shell")
    found = bundle.load(args.bundle)
    root = cache_root(args.cache)
    kernel_name = found.data["kernel"]["name"] or "kernel"
    workdir = args.workdir or new_run_dir(root, f"replay-{kernel_name}")
    prepared = replay.prepare(
        found,
        workdir,
        cache_root=root,
        kernels_file=args.kernels,
        accel=args.accel,
        snapshot=args.snapshot,
    )
    print(f"replaying {found.path}")
    print(f"test:     {found.data['test']}")
    for note in prepared.notes:
        print(f"note:     {note}")
    if args.shell:
        return _shell(prepared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SnapshotWarning)  # the report's start: line says it
        result = replay.run(prepared)
    print(result.render())
    same = "reproduced" if result.outcome.name == found.outcome else "NOT reproduced"
    print(f"recorded: {found.outcome}; replayed: {result.outcome.name} ({same})")
    return result.outcome.cli_exit


def _shell(prepared: replay.Replay) -> int:
    vm = prepared.vm
    with vm:
        try:
            vm.start()
            vm.expect_pass()
            print("the init succeeded", file=sys.stderr)
        except HarnessError as error:
            print(f"{error.outcome.name}: {error.message}", file=sys.stderr)
        if vm.machine.poll() is not None:
            print("QEMU has exited: nothing to attach to", file=sys.stderr)
            return 0
        print("console attached; Ctrl-] to leave", file=sys.stderr, flush=True)
        attach(vm.console.child)
    return 0
