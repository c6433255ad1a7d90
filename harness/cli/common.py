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
import dataclasses
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

from harness import cachefs, compression
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
from harness.kernel.provision import Kernel
from harness.outcome import ConfigError
from harness.snapshot.store import MECHANISMS
from harness.storage import attach as storage_attach
from harness.storage import bootpaths, controllers
from harness.storage.bootpaths import BootSpec
from harness.storage.controllers import Disk
from harness.vm.accel import VALID_REQUESTS, KvmFallbackWarning, choose_accelerator
from harness.vm.boot import BootRequest
from harness.vm.deadlines import Deadlines
from harness.vm.kernel_warnings import DEFAULT_MODE as DEFAULT_WARNING_MODE
from harness.vm.kernel_warnings import MODES as WARNING_MODES
from harness.vm.kernel_warnings import WarningPolicy, policy
from harness.vm.patterns import ConsoleVerdict
from harness.vm.sandbox import DEDICATED_USER, FALLBACK_USER, SANDBOX_CHOICES, Sandbox
from harness.vm.sandbox import from_options as sandbox_from_options

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


def boot_spec(args: argparse.Namespace) -> BootSpec:
    """The boot path the options ask for (``--boot-path``, ``--boot-controller``)."""
    return BootSpec(bootpaths.get(args.boot_path), controller=args.boot_controller)


def initramfs_spec(args: argparse.Namespace, after: str | None = None) -> initramfs.InitramfsSpec:
    variables: dict[str, Any] = dict(pairs(args.variables, "--var", "NAME=VALUE"))
    if args.commands:
        variables["commands"] = list(args.commands)
    if after is not None:
        variables["after"] = after
    files = {name: Path(host) for name, host in pairs(args.files, "--file", "ARCHIVE_PATH=HOST")}
    modules = tuple(args.modules)
    if getattr(args, "boot_path", None) and not bootpaths.get(args.boot_path).direct:
        # The guest sees the disk it booted from (as the boot fixture does).
        modules = tuple(dict.fromkeys((*controllers.get(args.boot_controller).modules, *modules)))
    return initramfs.InitramfsSpec(
        template=args.template,
        variables=variables,
        modules=modules,
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
    """A new folder ``<root>/runs/<timestamp>-<label>`` for one run's files (never reused).

    Raises:
        CacheFull, CacheReadOnly, CacheDenied: the cache's file system refused the folder.
    """
    base = root / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}"
    with cachefs.writing(base, "making a folder for the run's files"):
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
        "--boot-path",
        choices=list(bootpaths.BOOT_PATHS),
        default=bootpaths.DEFAULT_BOOT_PATH,
        help="how the machine reaches the kernel (default: pvh)",
    )
    parser.add_argument(
        "--boot-controller",
        choices=list(controllers.CONTROLLERS),
        default=bootpaths.DEFAULT_BOOT_CONTROLLER,
        help="the controller of the boot disk, on paths through one (default: ahci)",
    )
    parser.add_argument(
        "--kernel-warnings",
        choices=WARNING_MODES,
        default=DEFAULT_WARNING_MODE,
        help="what kernel warnings (WARN, lockdep, sleeping in atomic context, RCU stalls, "
        "hung tasks) do: fail the boot, report them (default), or ignore them",
    )
    parser.add_argument(
        "--kernel-warnings-allowlist",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="known warnings ([[warning]] tables with regex and reason): never fail a boot",
    )
    parser.add_argument(
        "--qemu-sandbox",
        choices=SANDBOX_CHOICES,
        default="on",
        help="QEMU's seccomp sandbox (default on; off: QEMU also keeps our user)",
    )
    parser.add_argument(
        "--qemu-user",
        metavar="USER",
        help="whom QEMU runs as once set up (name or UID:GID; none: stay); default, as root: "
        f"{DEDICATED_USER} if that user exists, else {FALLBACK_USER}",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="folder for the run's files (default: under <cache>/runs)",
    )
    add_snapshot_option(parser)


def warnings_policy(args: argparse.Namespace) -> WarningPolicy:
    """The kernel warnings policy of a boot's options (see :func:`add_boot_options`).

    Raises:
        ConfigError: an allowlist file is unreadable or invalid.
    """
    return policy(args.kernel_warnings, args.kernel_warnings_allowlist)


def accelerator(requested: str, root: Path) -> str:
    """The accelerator for a boot from the command line (probed once, cached); a fallback
    from KVM to TCG is said on one line of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KvmFallbackWarning)  # said below, once
        choice = choose_accelerator(requested, cache_dir=root / "accel")
    if choice.requested == "auto" and choice.name == "tcg":
        print(f"bootharness: using tcg: {choice.reason}", file=sys.stderr)
    return choice.name


DEFAULT_DISK_CONTROLLER = "virtio-blk"


def add_foreign_options(parser: argparse.ArgumentParser, *, initrd: bool = True) -> None:
    """Options of a boot of any image and any init: a prebuilt initrd, disks, the root, the
    console patterns that judge an init without markers, and an overlay."""
    group = parser.add_argument_group("any initrd, any init (console verdicts)")
    if initrd:
        group.add_argument(
            "--initrd",
            type=Path,
            metavar="FILE",
            help="boot this prebuilt image as it is (no template; any compression the kernel "
            "unpacks, early+main concatenations too)",
        )
    group.add_argument(
        "--disk",
        action="append",
        default=[],
        dest="disks",
        metavar="IMAGE[:CONTROLLER]",
        help="attach a disk (copy-on-write overlay; repeatable; controller default "
        f"{DEFAULT_DISK_CONTROLLER}: {', '.join(controllers.CONTROLLERS)})",
    )
    group.add_argument(
        "--root",
        metavar="SPEC",
        help="the root: root= of the kernel (with --initrd) or the "
        "template's root variable (/dev/sda, LABEL=x, UUID=...)",
    )
    group.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="REGEX",
        help="a console line that means success (repeatable, matched in order)",
    )
    group.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="REGEX",
        help="a console line that means TEST_FAIL (repeatable; besides the shipped table of "
        "root failures)",
    )
    group.add_argument(
        "--no-root-failures",
        action="store_const",
        const=False,
        default=None,
        dest="root_failures",
        help="do not judge by the shipped table of initramfs-tools/dracut/kernel root failures",
    )
    group.add_argument(
        "--markers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the init prints bootharness markers (default: yes for templates unless "
        "they declare markers=off, no for --initrd)",
    )
    group.add_argument(
        "--overlay",
        action="append",
        default=[],
        dest="overlays",
        metavar="PATH=HOSTPATH",
        help="append an archive holding HOSTPATH at PATH to the image (repeatable)",
    )


def parse_disk(text: str) -> Disk:
    """``IMAGE[:CONTROLLER]`` -> a :class:`Disk` (the suffix counts only when it names a
    controller, so image paths with colons still work).

    Raises:
        ConfigError: the image does not exist.
    """
    image, sep, name = text.rpartition(":")
    if not sep or name not in controllers.CONTROLLERS:
        image, name = text, DEFAULT_DISK_CONTROLLER
    path = Path(image).expanduser()
    if not path.is_file():
        raise ConfigError(f"--disk {text}: no disk image {path}")
    return Disk(path, name)


def boot_request(
    args: argparse.Namespace,
    kernel: Kernel,
    *,
    accel: str,
    deadlines: Deadlines,
    after: str | None = None,
    initrd: Path | None = None,
) -> BootRequest:
    """The :class:`BootRequest` of a ``bootharness boot``-like command line.

    Raises:
        ConfigError: template options with ``--initrd``, a missing image or disk, a bad
            regex, or an init without markers and no ``--expect``.
    """
    initrd = initrd if initrd is not None else getattr(args, "initrd", None)
    spec = initramfs_spec(args, after=after)
    cmdline = args.cmdline
    if initrd is not None:
        if not Path(initrd).is_file():
            raise ConfigError(f"--initrd {initrd}: no such file")
        template_options = [args.modules, args.files, args.variables, args.commands, args.dirs]
        if any(template_options) or args.template != templates.DEFAULT_TEMPLATE:
            raise ConfigError(
                "--initrd boots a prebuilt image as it is: -t/-m/--file/--var/--run/"
                "--template-dir do not apply (use --overlay PATH=HOSTPATH to add files)"
            )
        if args.root:
            cmdline = f"root={args.root} {cmdline}".strip()
    elif args.root:
        spec = dataclasses.replace(spec, variables={**spec.variables, "root": args.root})
    storage = None
    if args.disks:
        disk_list = [parse_disk(text) for text in args.disks]
        # (Kernel options are not checked here: harness.kernel.capabilities belongs to the
        # pytest side; a kernel without the controller's driver fails the boot with a reason.)
        storage = storage_attach.plan(disk_list, variables=None if initrd else spec.variables)
        if initrd is None:
            modules = tuple(dict.fromkeys((*storage.modules, *spec.modules)))
            spec = dataclasses.replace(spec, modules=modules)
    overlay = {name: Path(host) for name, host in pairs(args.overlays, "--overlay", "PATH=HOST")}
    request = BootRequest(
        kernel,
        spec,
        accel=accel,
        deadlines=deadlines,
        cmdline=cmdline,
        storage=storage,
        initrd=Path(initrd) if initrd is not None else None,
        overlay=overlay,
        verdict=ConsoleVerdict(tuple(args.expect), tuple(args.fail), args.root_failures),
        markers=args.markers,
        boot=boot_spec(args) if getattr(args, "boot_path", None) else BootSpec(),
        kernel_warnings=(
            warnings_policy(args) if hasattr(args, "kernel_warnings") else WarningPolicy()
        ),
        machine_options={"sandbox": sandbox_of(args)} if hasattr(args, "qemu_sandbox") else {},
    )
    if not request.prints_markers and not args.expect:
        raise ConfigError(
            "this init prints no bootharness markers (a prebuilt --initrd, --no-markers, or a "
            "template declaring markers=off): say what success looks like with --expect REGEX"
        )
    return request


def sandbox_of(args: argparse.Namespace) -> Sandbox:
    """The QEMU sandbox ``--qemu-sandbox`` and ``--qemu-user`` ask for."""
    return sandbox_from_options(args.qemu_sandbox, args.qemu_user)
