"""``bootharness cache verify|prune|du``: keep the cache true and bounded (harness.upkeep).

Exit codes: 0 done (``verify``: every checked entry intact), 1 ``verify`` found damaged entries
(discarded unless ``--keep``; their next use builds them again), 5 usage error.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness import upkeep
from harness.cachefs import free_space, size_text
from harness.cli import common
from harness.cli.text import table

_AREAS_HELP = "runs, snapshots, images (initramfs and other derived images), kernels"


def register(commands: Any, shared: argparse.ArgumentParser) -> None:
    """Add ``cache`` and its subcommands to the ``bootharness`` command line."""
    parser = commands.add_parser(
        "cache",
        help="verify, prune or size the cache",
        description="The cache holds " + _AREAS_HELP + "; every entry has a manifest checked "
        "on use. " + (__doc__ or "").split("\n", 2)[2].strip(),
    )
    actions = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    verify = actions.add_parser(
        "verify",
        parents=[shared],
        help="check every entry in full against its manifest; discard the damaged ones",
    )
    verify.add_argument(
        "--keep", action="store_true", help="only report damaged entries, do not discard them"
    )
    verify.set_defaults(func=cmd_verify)

    prune = actions.add_parser(
        "prune",
        parents=[shared],
        help="remove what the age and size policy does not keep, and leftovers",
        description="Remove cache entries unused for longer than their area's age or beyond "
        "its size cap (least recently used first), and leftovers of interrupted builds. "
        "Nothing used within the last hour, nothing being built. Defaults: "
        + ", ".join(_defaults())
        + ". A negative value means no limit.",
    )
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    for area in ("runs", "snapshots", "images", "kernels"):
        prune.add_argument(f"--{area}-age", type=float, metavar="DAYS", dest=f"{area}_age")
        prune.add_argument(f"--{area}-size", type=float, metavar="GIB", dest=f"{area}_size")
    prune.set_defaults(func=cmd_prune)

    du = actions.add_parser("du", parents=[shared], help="how much each area of the cache holds")
    du.set_defaults(func=cmd_du)


def cmd_verify(args: argparse.Namespace) -> int:
    root = common.cache_of(args)
    report = upkeep.verify(root, discard=not args.keep)
    for line in upkeep.describe(report):
        print(line)
    damaged = len(report.damaged)
    action = "" if args.keep or not damaged else " (discarded: their next use builds them again)"
    print(
        f"{report.intact} intact, {damaged} damaged{action}, "
        f"{len(report.unmanaged)} without a manifest (made by an older harness: checked "
        "and given one on their next use)"
    )
    return 1 if damaged else 0


def cmd_prune(args: argparse.Namespace) -> int:
    root = common.cache_of(args)
    names = [f"{area}_{kind}" for area in upkeep.AREAS[:4] for kind in ("age", "size")]
    policy = upkeep.policy_from({name: getattr(args, name) for name in names})
    report = upkeep.prune(root, policy, dry_run=args.dry_run)
    for line in upkeep.describe(report):
        print(("would have " if args.dry_run else "") + line)
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(report.removed)} entries, {verb} {size_text(report.freed)}")
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    root = common.cache_of(args)
    rows = [["AREA", "ENTRIES", "ON DISK"]]
    total = 0
    for area, (count, size) in upkeep.usage(root).items():
        rows.append([area, str(count), size_text(size)])
        total += size
    rows.append(["total", "", size_text(total)])
    print("\n".join(table(rows)))
    free, size = free_space(root)
    print(f"{root}: {size_text(free)} free of {size_text(size)}; {upkeep.stamp_info(root)}")
    return 0


def _defaults() -> list[str]:
    policy = upkeep.Policy()
    described = []
    for area in upkeep.AREAS[:4]:
        age, size = policy.limits(area)
        parts = [f"{age:g} days" if age is not None else "", size_text(size) if size else ""]
        described.append(f"{area} " + " / ".join(p for p in parts if p))
    return described
