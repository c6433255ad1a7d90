"""``bootharness build``: build kernels from source (or find them built) into the cache.

Registered through :data:`harness.cli.main.build_parser`; parsing, calls and printing only.
``boot``, the fixtures, the matrix and ``bisect-step`` build on demand the same way; this
command builds ahead of time and says where everything went.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness.cli import text
from harness.cli.common import cache_of, catalogue_of
from harness.kernel.catalogue import SourceTree
from harness.kernel.provision import build_source, source_plan
from harness.kernel.source import cached
from harness.outcome import ConfigError


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``build`` subcommand."""
    build = commands.add_parser(
        "build",
        parents=[common],
        help="build kernels from source into the cache (tree = ... or linux_source = ...)",
        description="Build the source kernels of kernels.toml (default: every one) out of "
        "tree into the cache, or find them there: the same tree state, config and compiler "
        "never build twice.",
    )
    build.add_argument(
        "-k",
        "--kernel",
        action="append",
        default=[],
        metavar="NAME|TAG",
        help="kernels to build (repeatable; default: every kernel built from source)",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="build even when the last build of the same inputs failed",
    )
    build.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace) -> int:
    catalogue = catalogue_of(args)
    root = cache_of(args)
    entries = catalogue.select(args.kernel) if args.kernel else list(catalogue.kernels)
    entries = [entry for entry in entries if isinstance(entry.source, SourceTree)]
    if not entries:
        raise ConfigError(
            f"{catalogue.path}: no kernel built from source"
            + (f" among {', '.join(args.kernel)}" if args.kernel else "")
            + '; add one with tree = "path/to/linux" or linux_source = "linux-source-6.1"'
        )
    rows = [["NAME", "RELEASE", "TREE", "CONFIG", "BUILD", "BZIMAGE", "LOG"]]
    for entry in entries:
        plan = source_plan(entry, root, progress=True)
        was_cached = cached(plan) is not None
        kernel = build_source(entry, root, force=args.force)
        built = cached(plan)
        assert built is not None
        how = "cached" if was_cached else f"built in {built.seconds:.0f} s"
        rows.append(
            [
                kernel.name,
                kernel.release,
                plan.state.label,
                kernel.config_digest,
                how,
                str(built.bzimage),
                str(built.log_path),
            ]
        )
    print("\n".join(text.table(rows)))
    return 0
