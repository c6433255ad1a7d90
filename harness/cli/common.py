"""What the ``bootharness`` commands share: the image and boot options, the catalogue and
cache of a command line, the initramfs spec it asks for, run folders, and the terminal
(the parser class, global options and number checks live in :mod:`harness.cli.parsing`;
they are named here too, for the command modules).

Every command module imports these from here (never from another command module), so the
CLI's imports run one way: parsing <- common <- commands <- main (which reaches the one
command it runs by name).
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import termios
import time
import tty
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pexpect

from harness import compression
from harness.cache import cache_root
from harness.cli.parsing import USAGE_EXIT as USAGE_EXIT
from harness.cli.parsing import Parser as Parser
from harness.cli.parsing import add_global_options as add_global_options
from harness.cli.parsing import positive as positive
from harness.cli.parsing import setup_logging as setup_logging
from harness.image import initramfs, templates
from harness.kernel.catalogue import (
    SHIPPED_CATALOGUE,
    Catalogue,
    KernelEntry,
    find_catalogue,
    load_catalogue,
)
from harness.outcome import ConfigError
from harness.snapshot.store import MECHANISMS
from harness.vm.accel import VALID_REQUESTS, KvmFallbackWarning, choose_accelerator

ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console use


def image_options() -> Parser:
    image = Parser(add_help=False)
    image.add_argument("-k", "--kernel", help="kernel name or tag (default: the default kernel)")
    image.add_argument("-t", "--template", default=templates.DEFAULT_TEMPLATE)
    image.add_argument(
        "-m", "--module", action="append", default=[], dest="modules", metavar="MODULE"
    )
    image.add_argument(
        "--file", action="append", default=[], dest="files", metavar="ARCHIVE_PATH=HOST_PATH"
    )
    image.add_argument("--var", action="append", default=[], dest="variables", metavar="NAME=VALUE")
    image.add_argument(
        "--run",
        action="append",
        default=[],
        dest="commands",
        metavar="CMD",
        help="a shell command for the init to run (repeatable; sets the commands variable)",
    )
    image.add_argument(
        "--template-dir", action="append", default=[], type=Path, dest="dirs", metavar="DIR"
    )
    image.add_argument("-c", "--compression", choices=compression.METHODS, default="gzip")
    return image


def catalogue_of(args: argparse.Namespace) -> Catalogue:
    """The catalogue the command line names, or the one found; says so when it is the
    catalogue shipped with the package (no kernels.toml here or above)."""
    path = find_catalogue(args.kernels)
    if path == SHIPPED_CATALOGUE:
        print(f"bootharness: no kernels.toml here or above; using {path}", file=sys.stderr)
    return load_catalogue(path)


def cache_of(args: argparse.Namespace) -> Path:
    return cache_root(args.cache)


def one_kernel(catalogue: Catalogue, selector: str | None) -> KernelEntry:
    entries = catalogue.select([selector] if selector else [])
    if len(entries) > 1:
        names = ", ".join(entry.name for entry in entries)
        raise ConfigError(
            f"{catalogue.path}: {selector!r} selects {len(entries)} kernels ({names}); "
            "name one kernel with -k NAME"
        )
    return entries[0]


def initramfs_spec(args: argparse.Namespace, after: str | None = None) -> initramfs.InitramfsSpec:
    variables: dict[str, Any] = dict(pairs(args.variables, "--var", "NAME=VALUE"))
    if args.commands:
        variables["commands"] = list(args.commands)
    if after is not None:
        variables["after"] = after
    files = {name: Path(host) for name, host in pairs(args.files, "--file", "ARCHIVE_PATH=HOST")}
    return initramfs.InitramfsSpec(
        template=args.template,
        variables=variables,
        modules=tuple(args.modules),
        files=files,
        compression=args.compression,
        template_dirs=tuple(args.dirs),
    )


def pairs(values: Sequence[str], option: str, form: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise ConfigError(f"{option} {value!r}: expected {form}")
        pairs.append((name, rest))
    return pairs


def new_run_dir(root: Path, label: str) -> Path:
    """A new folder ``<root>/runs/<timestamp>-<label>`` for one run's files (never reused)."""
    base = root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # two runs in the same second
            n += 1
            candidate = base.with_name(f"{base.name}.{n}")


def attach(child: Any) -> None:
    """Connect the terminal to a pexpect ``fdspawn`` console until Ctrl-] or end of file.

    ``fdspawn`` has no ``interact()``, so this is its small equivalent: the terminal in raw
    mode, bytes copied both ways. Reads go through pexpect so the console log keeps them.
    """
    fd_in, fd_out, console_fd = sys.stdin.fileno(), sys.stdout.fileno(), child.child_fd
    console_input = child.sink_fd
    pending = child.buffer  # text read past the last match (the shell's first prompt)
    child.buffer = ""
    if pending:
        os.write(fd_out, pending.encode())
    saved = termios.tcgetattr(fd_in)
    tty.setraw(fd_in)
    try:
        while True:
            readable, _, _ = select.select([fd_in, console_fd], [], [])
            if console_fd in readable:
                try:
                    text = child.read_nonblocking(65536, timeout=0)
                except pexpect.EOF:
                    return
                os.write(fd_out, text.encode())
            if fd_in in readable:
                data = os.read(fd_in, 1024)
                keep = data.split(ESCAPE, 1)[0]
                write_all(console_input, keep)
                if not data or keep != data:
                    return
    finally:
        termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def add_snapshot_option(parser: argparse.ArgumentParser) -> None:
    """``--snapshot [MECHANISM]``: start from a booted snapshot (see harness.snapshot)."""
    parser.add_argument(
        "--snapshot",
        nargs="?",
        const="auto",
        choices=("auto", *MECHANISMS),
        metavar="MECHANISM",
        help="start from a booted snapshot (made first if the cache has none; auto, "
        "shared-ram or stream; default auto); boots cold when none can be made or used",
    )


def add_boot_options(parser: argparse.ArgumentParser) -> None:
    """The options of one boot, shared by ``bootharness boot`` and ``bisect-step -- boot``."""
    parser.add_argument("--accel", choices=VALID_REQUESTS, default="auto")
    parser.add_argument("--timeout-multiplier", type=positive, default=1.0, metavar="X")
    parser.add_argument(
        "--boot-timeout",
        type=positive,
        metavar="S",
        help="seconds for each of the kernel and init phases (default: 60 each)",
    )
    parser.add_argument("--cmdline", default="", metavar="EXTRA", help="extra kernel command line")
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="folder for the run's files (default: under <cache>/runs)",
    )
    add_snapshot_option(parser)


def accelerator(requested: str, root: Path) -> str:
    """The accelerator for a boot from the command line (probed once, cached); a fallback
    from KVM to TCG is said on one line of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmFallbackWarning)  # said below, once
        choice = choose_accelerator(requested, cache_dir=root / "accel")
    if choice.requested == "auto" and choice.name == "tcg":
        print(f"bootharness: using tcg: {choice.reason}", file=sys.stderr)
    return choice.name
