"""The ``bootharness`` command: list and fetch kernels, build and inspect initramfs images, boot.

Parsing, calls into the library, printing; nothing else lives here. The exit code is the
outcome's (DESIGN.md): a usage error, like a bad ``kernels.toml``, exits 5; a
:class:`~harness.outcome.HarnessError` exits with its outcome's code; any other exception is
a harness bug and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import shutil
import sys
import termios
import time
import tty
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pexpect

from harness import boot, compression, cpio, initramfs, report, templates
from harness.accel import VALID_REQUESTS, KvmFallbackWarning, choose_accelerator
from harness.cache import cache_root
from harness.config import Catalogue, KernelEntry, find_catalogue, load_catalogue
from harness.kernels import is_provisioned, provision
from harness.outcome import ConfigError, HarnessError, Outcome

log = logging.getLogger(__name__)

USAGE_EXIT = Outcome.CONFIG_ERROR.cli_exit
ESCAPE = b"\x1d"  # Ctrl-], as telnet and virsh console use


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; bootharness exits 5, the CONFIG_ERROR code."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error
        return done.code if isinstance(done.code, int) else USAGE_EXIT
    _setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except HarnessError as error:
        print(f"bootharness: {error}", file=sys.stderr)
        return error.outcome.cli_exit
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``bootharness``, with every subcommand."""
    parser = _Parser(prog="bootharness", description=__doc__.split("\n", 1)[0])
    _add_global_options(parser, suppress=False)
    # The same options after the subcommand too; SUPPRESS keeps the subparser from
    # overwriting a value given before it with its default.
    common = _Parser(add_help=False)
    _add_global_options(common, suppress=True)
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

    image = _image_options()
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

    run = commands.add_parser("boot", parents=[common, image], help="boot a kernel under QEMU")
    run.add_argument("--accel", choices=VALID_REQUESTS, default="auto")
    run.add_argument("--timeout-multiplier", type=_positive, default=1.0, metavar="X")
    run.add_argument(
        "--boot-timeout",
        type=_positive,
        metavar="S",
        help="seconds for each of the kernel and init phases (default: 60 each)",
    )
    run.add_argument("--cmdline", default="", metavar="EXTRA", help="extra kernel command line")
    run.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="folder for the run's files (default: under <cache>/runs)",
    )
    run.add_argument(
        "--shell", action="store_true", help="after the init succeeds, attach to a shell"
    )
    run.set_defaults(func=cmd_boot)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands, common)
    return parser


# Modules that add subcommands of their own: each has
# ``register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None``
# and sets ``func`` on its parsers like the commands above.
COMMAND_MODULES: tuple[str, ...] = (
    "harness.cli_bisect",
    "harness.cli_matrix",
    "harness.cli_report",
)


def _add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--kernels", metavar="FILE", default=default(None), help="kernels.toml to use"
    )
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=default(None),
        help="cache folder (default: $BOOTHARNESS_CACHE or ~/.cache/bootharness)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=default(0), help="log more (-vv: debug)"
    )


def _image_options() -> _Parser:
    image = _Parser(add_help=False)
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


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(level)


def cmd_kernels(args: argparse.Namespace) -> int:
    catalogue = _catalogue(args)
    root = _cache(args)
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
    catalogue = _catalogue(args)
    root = _cache(args)
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
    root = _cache(args)
    kernel = provision(_one_kernel(_catalogue(args), args.kernel), root)
    image = initramfs.build(kernel, _spec(args), root)
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
    root = _cache(args)
    kernel = provision(_one_kernel(_catalogue(args), args.kernel), root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmFallbackWarning)  # reported below, once
        choice = choose_accelerator(args.accel, cache_dir=root / "accel")
    if choice.requested == "auto" and choice.name == "tcg":
        print(f"bootharness: using {choice.name}: {choice.reason}", file=sys.stderr)
    deadlines = boot.Deadlines.from_options(args.boot_timeout, args.timeout_multiplier)
    spec = _spec(args, after="shell" if args.shell else None)
    vm = boot.prepare_vm(
        kernel,
        spec,
        cache_root=root,
        workdir=args.workdir or new_run_dir(root, kernel.name),
        accel=choice.name,
        deadlines=deadlines,
        cmdline=args.cmdline,
    )
    if args.shell:
        with vm:
            vm.start()
            vm.expect_pass()
            print("console attached; Ctrl-] to leave", file=sys.stderr, flush=True)
            attach(vm.console.child)
        return 0
    result = boot.run(vm, kernel=kernel, accel=choice.name)
    print(result.render())
    return result.outcome.cli_exit


def _catalogue(args: argparse.Namespace) -> Catalogue:
    return load_catalogue(find_catalogue(args.kernels))


def _cache(args: argparse.Namespace) -> Path:
    return cache_root(args.cache)


def _one_kernel(catalogue: Catalogue, selector: str | None) -> KernelEntry:
    entries = catalogue.select([selector] if selector else [])
    if len(entries) > 1:
        names = ", ".join(entry.name for entry in entries)
        raise ConfigError(
            f"{catalogue.path}: {selector!r} selects {len(entries)} kernels ({names}); "
            "name one kernel with -k NAME"
        )
    return entries[0]


def _spec(args: argparse.Namespace, after: str | None = None) -> initramfs.InitramfsSpec:
    variables: dict[str, Any] = dict(_pairs(args.variables, "--var", "NAME=VALUE"))
    if args.commands:
        variables["commands"] = list(args.commands)
    if after is not None:
        variables["after"] = after
    files = {name: Path(host) for name, host in _pairs(args.files, "--file", "ARCHIVE_PATH=HOST")}
    return initramfs.InitramfsSpec(
        template=args.template,
        variables=variables,
        modules=tuple(args.modules),
        files=files,
        compression=args.compression,
        template_dirs=tuple(args.dirs),
    )


def _pairs(values: Sequence[str], option: str, form: str) -> list[tuple[str, str]]:
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
                _write_all(console_fd, keep)
                if not data or keep != data:
                    return
    finally:
        termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


if __name__ == "__main__":
    sys.exit(main())
