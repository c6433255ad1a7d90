"""The ``bootharness`` command: list and fetch kernels, build and inspect initramfs images, boot.

Parsing, calls into the library, printing; nothing else lives here. The exit code is the
outcome's (docs/architecture.md): a usage error, like a bad ``kernels.toml``, exits 5; a
:class:`~harness.outcome.HarnessError` exits with its outcome's code; any other exception is
a harness bug and propagates with its traceback.

Each command lives in a module of its own (:data:`COMMANDS`) with a ``register(commands,
common)`` that adds its parser and handler. This module imports none of them: it finds the
command word, imports that one module by name and parses with its parser, so a command
loads only what it uses (``bootharness boot`` no report modules, ``--help`` nothing but
argparse) and a start costs no more than that.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Sequence

from harness.cli.parsing import USAGE_EXIT, Parser, add_global_options, command_word, setup_logging
from harness.outcome import HarnessError

# command -> (the module that registers it, its one-line help for ``bootharness --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "kernels": ("harness.cli.kernels", "list the known kernels"),
    "fetch": ("harness.cli.kernels", "download and unpack kernels"),
    "initramfs": ("harness.cli.initramfs", "build or inspect initramfs images"),
    "boot": ("harness.cli.boot", "boot a kernel under QEMU"),
    "accel": ("harness.cli.accel", "say which accelerator boots use here (KVM or TCG) and why"),
    "build": (
        "harness.cli.build",
        "build kernels from source into the cache (tree = ... or linux_source = ...)",
    ),
    "cache": ("harness.cli.cache", "verify, prune or size the cache"),
    "bisect": ("harness.cli.bisect", "find the first bad kernel between a good and a bad one"),
    "bisect-step": (
        "harness.cli.bisect",
        "one step of `git bisect run`: build, judge, exit 0/1/125/128",
    ),
    "matrix": ("harness.cli.matrix", "print the CI job matrix (one job per kernel)"),
    "replay": ("harness.cli.matrix", "boot a failed test's reproduction bundle again"),
    "report": ("harness.cli.report", "reports of nightly runs"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    word = command_word(words)
    parser = build_parser(word) if word is not None else build_parser(overview=True)
    try:
        args = parser.parse_args(words)
    except SystemExit as done:  # --help, or a usage error
        return done.code if isinstance(done.code, int) else USAGE_EXIT
    setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except HarnessError as error:
        print(f"bootharness: {error}", file=sys.stderr)
        return error.outcome.cli_exit
    return code


def build_parser(command: str | None = None, *, overview: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``bootharness``: with every command's module imported and
    registered (the default), only ``command``'s (every other command named with its help
    only: what :func:`main` parses with), or none (``overview``: ``--help`` and usage errors
    before a command)."""
    parser = Parser(prog="bootharness", description=__doc__.split("\n", 1)[0])
    add_global_options(parser, suppress=False)
    # The same options after the subcommand too; SUPPRESS keeps the subparser from
    # overwriting a value given before it with its default.
    common = Parser(add_help=False)
    add_global_options(common, suppress=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    if overview:
        wanted: list[str] = []
    elif command is None:
        wanted = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    else:
        wanted = [COMMANDS[command][0]] if command in COMMANDS else []
    for module in wanted:
        importlib.import_module(module).register(commands, common)
    for name, (_, summary) in COMMANDS.items():
        if name not in commands.choices:
            commands.add_parser(name, help=summary)
    return parser


def run() -> int:
    """The installed ``bootharness`` script: :func:`main` in a process that ends with it.

    At exit the interpreter's last garbage collection walks every object the imports made,
    ~20-40 ms of each command, for objects that live until the exit anyway: they are moved
    out of its sight first (``gc.freeze``). Not in :func:`main`, which tests call in-process.
    """
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(run())
