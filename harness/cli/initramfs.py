"""``bootharness initramfs build`` and ``bootharness initramfs ls``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from harness.cli import foreign as foreign_commands
from harness.cli import text as report
from harness.cli.common import (
    cache_of,
    catalogue_of,
    image_options,
    initramfs_spec,
    one_kernel,
)
from harness.image import cpio, initramfs
from harness.kernel.provision import provision
from harness.outcome import ConfigError


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``initramfs`` with its ``build`` and ``ls``."""
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
