"""``bootharness initramfs extract|repack|overlay``: edit an initramfs someone else built.

The seed's workflow on an existing image (``zcat | cpio -id``, edit, ``find | cpio -o -H newc
| gzip``) loses the early microcode archive, hard links and device nodes, and gives other
bytes every time; these commands keep every segment apart and give the same image for the
same folder (:mod:`harness.image.foreign`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness import compression
from harness.cli.common import pairs
from harness.image import foreign
from harness.outcome import ConfigError


def register(ramfs_commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``extract``, ``repack`` and ``overlay`` under ``bootharness initramfs``."""
    extract = ramfs_commands.add_parser(
        "extract",
        parents=[common],
        help="unpack every segment of an image into DIR/early, DIR/main, ... (and a manifest)",
    )
    extract.add_argument("image", type=Path, help="an initramfs: cpio, compressed, concatenated")
    extract.add_argument("folder", type=Path, help="a new or empty folder")
    extract.set_defaults(func=cmd_extract)

    repack = ramfs_commands.add_parser(
        "repack",
        parents=[common],
        help="build an image from a folder made by extract (same segments and compression)",
    )
    repack.add_argument("folder", type=Path)
    repack.add_argument("-o", "--output", type=Path, required=True, metavar="IMAGE")
    repack.add_argument(
        "-c",
        "--compression",
        choices=compression.METHODS,
        help="recompress the compressed segments with this method (default: as extracted)",
    )
    repack.add_argument("--level", type=int, help="compression level (default: per method)")
    repack.add_argument(
        "--single", action="store_true", help="write one archive in one segment instead"
    )
    repack.set_defaults(func=cmd_repack)

    overlay = ramfs_commands.add_parser(
        "overlay",
        parents=[common],
        help="append an archive of files to an image, as the kernel merges archives",
    )
    overlay.add_argument("image", type=Path)
    overlay.add_argument("-o", "--output", type=Path, required=True, metavar="IMAGE")
    overlay.add_argument(
        "--overlay",
        action="append",
        default=[],
        dest="overlays",
        metavar="PATH=HOSTPATH",
        help="put HOSTPATH (file, folder, symlink) at PATH in the image (repeatable)",
    )
    overlay.add_argument(
        "-c", "--compression", choices=compression.METHODS, default="none", help="of the archive"
    )
    overlay.set_defaults(func=cmd_overlay)


def cmd_extract(args: argparse.Namespace) -> int:
    names = foreign.extract(args.image, args.folder)
    for name in names:
        print(f"{args.folder / name}")
    print(f"manifest: {args.folder / foreign.MANIFEST}")
    return 0


def cmd_repack(args: argparse.Namespace) -> int:
    output = foreign.repack(
        args.folder,
        args.output,
        compression_method=args.compression,
        single=args.single,
        level=args.level,
    )
    segments = foreign.read_segments(output.read_bytes())
    layout = ", ".join(f"{s.compression}@{s.offset} ({len(s.members)})" for s in segments)
    print(f"{output}: {output.stat().st_size} bytes; segments: {layout}")
    return 0


def cmd_overlay(args: argparse.Namespace) -> int:
    files = {name: Path(host) for name, host in pairs(args.overlays, "--overlay", "PATH=HOST")}
    if not files:
        raise ConfigError("initramfs overlay: give at least one --overlay PATH=HOSTPATH")
    output = foreign.overlay(args.image, files, args.output, method=args.compression)
    print(f"{output}: {output.stat().st_size} bytes")
    return 0
