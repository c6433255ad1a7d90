"""``bootharness bisect`` and ``bootharness bisect-step``: find the change that broke a boot.

``bisect`` bisects over kernels of ``kernels.toml`` (file order, oldest first) or an explicit
list; ``bisect-step`` is the step command for ``git bisect run`` in any repository (a kernel
tree, a repository of init templates). Both judge with an oracle: a boot with a template, or a
pytest node id. Verdicts are cached (:mod:`harness.bisect.verdicts`), so a second run boots nothing.

Exit codes of ``bisect``: 0 found, 1 a range (skipped kernels hide the exact one), 2 the ends
disagree (good end bad or bad end good), 4 an end could not be tested (INFRA_ERROR), 5 usage
or configuration error (including a CONFIG_ERROR from the oracle).

Exit codes of ``bisect-step`` (what ``git bisect run`` expects): 0 good, 1 bad, 125 skip (an
INFRA_ERROR or a failed build), 128 abort (usage or configuration error), 129 abort (a harness
bug; the traceback is printed).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from harness import lifeline, upkeep
from harness.bisect.oracles import BootOracle, InitrdOracle, PytestOracle
from harness.bisect.search import Observation, Step
from harness.bisect.search import bisect as run_bisect
from harness.bisect.verdicts import VerdictCache
from harness.cli import common, text
from harness.image import templates
from harness.kernel.catalogue import Catalogue, SourceTree
from harness.kernel.provision import Kernel, build_source, provision
from harness.kernel.source import BuildError
from harness.outcome import ConfigError, HarnessError
from harness.vm.accel import VALID_REQUESTS
from harness.vm.deadlines import Deadlines

log = logging.getLogger(__name__)

STEP_SKIP = 125
STEP_ABORT = 128
STEP_BUG = 129
ORACLE_KINDS = ("boot", "pytest")

STEP_USAGE = """\
usage: bootharness bisect-step [-k NAME] [--build CMD] [--verdicts DIR | --no-cache]
                               [--kernels FILE] [--cache DIR] [-v] -- ORACLE...

ORACLE is one of
  boot [OPTIONS]             boot like `bootharness boot` with the same options: -k NAME,
                             -t TEMPLATE, --template-dir DIR (relative to the checkout),
                             --run CMD, --var NAME=VALUE, -m MODULE, --cmdline, --accel, ...
                             or --initrd FILE (the image the tree builds) with --disk,
                             --root, --expect REGEX, --fail REGEX
  pytest NODEID [ARGS...]    run one pytest node id with --kernel NAME (from ARGS, default:
                             the default kernel) and the other ARGS

-k NAME names the kernel to judge (the oracle's -k / --kernel otherwise). A kernel built from
source (tree = ... in kernels.toml) is built first, at the commit checked out, through the
cache (a commit built before is not built again); a commit that does not build is a skip with
the compiler's first error. --build CMD runs a command of your own first instead (sh -c, in
the current folder). Then the oracle runs, and the step exits 0 good, 1 bad, 125 skip
(INFRA_ERROR or a failed build), 128 abort (usage or configuration error), 129 abort
(harness bug). Examples:
  git bisect run bootharness bisect-step -- boot --template-dir . --run 'cat /proc/version'
  git bisect run bootharness bisect-step -k my-tree -- boot --run 'test -b /dev/vda'
"""


def register(commands: Any, shared: argparse.ArgumentParser) -> None:
    """Add ``bisect`` and ``bisect-step`` to the ``bootharness`` command line."""
    parser = commands.add_parser(
        "bisect",
        parents=[shared],
        help="find the first bad kernel between a good and a bad one",
        description="Bisect over the kernels of kernels.toml (file order) between --good and "
        "--bad, or over --kernels-list. Exit: 0 found, 1 a range (skips), 2 ends disagree, "
        "4 an end untestable, 5 usage or configuration error.",
    )
    parser.add_argument("--good", metavar="NAME", help="a kernel known good (default: first)")
    parser.add_argument("--bad", metavar="NAME", help="a kernel known bad (default: last)")
    parser.add_argument(
        "--kernels-list",
        metavar="A,B,C",
        help="candidates in order, good side first (names or tags; default: every kernel of "
        "kernels.toml from --good to --bad)",
    )
    parser.add_argument(
        "--initrds",
        metavar="A.img,B.img,...",
        help="bisect initrd FILES instead of kernels (good first), booted with one kernel "
        "(-k) as `bootharness boot --initrd` boots them, or given to --pytest as --initrd",
    )
    parser.add_argument("-k", "--kernel", help="the kernel of --initrds (default: the default)")
    oracle = parser.add_argument_group("oracle (a boot with a template, or --pytest)")
    oracle.add_argument("-t", "--template", help="init template (default: init.sh.j2)")
    oracle.add_argument(
        "--run", action="append", default=[], dest="commands", metavar="CMD", help="repeatable"
    )
    oracle.add_argument(
        "--var", action="append", default=[], dest="variables", metavar="NAME=VALUE"
    )
    oracle.add_argument("-m", "--module", action="append", default=[], dest="modules")
    oracle.add_argument(
        "--template-dir", action="append", default=[], type=Path, dest="dirs", metavar="DIR"
    )
    oracle.add_argument("--cmdline", default="", metavar="EXTRA", help="extra kernel cmdline")
    oracle.add_argument("--pytest", metavar="NODEID", help="judge with this pytest node id")
    oracle.add_argument(
        "--pytest-arg", action="append", default=[], metavar="ARG", help="extra pytest argument"
    )
    _add_run_options(parser)
    common.add_foreign_options(parser, initrd=False)
    parser.set_defaults(func=cmd_bisect)

    # Everything after bisect-step is parsed by cmd_bisect_step, whose usage errors must exit
    # 128 (abort) rather than 5, which git bisect run would take for "bad". A prefix character
    # no argument uses makes argparse hand over every word, options included.
    step = commands.add_parser(
        "bisect-step",
        prefix_chars="+",
        add_help=False,
        help="one step of `git bisect run`: build, judge, exit 0/1/125/128",
    )
    step.add_argument("argv", nargs=argparse.REMAINDER)
    step.set_defaults(func=cmd_bisect_step)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--accel", choices=VALID_REQUESTS, default="auto")
    parser.add_argument("--timeout-multiplier", type=common.positive, default=1.0, metavar="X")
    parser.add_argument("--boot-timeout", type=common.positive, metavar="S")
    parser.add_argument(
        "--verdicts", type=Path, metavar="DIR", help="verdict cache (default: <cache>/verdicts)"
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor store verdicts")
    # Worth it when the steps share a kernel and the init up to its ready point (bisecting
    # commands or the part of a template after it); each new kernel needs its own snapshot.
    common.add_snapshot_option(parser)
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="folder for console logs (default: <cache>/runs)",
    )


def cmd_bisect(args: argparse.Namespace) -> int:
    if args.initrds:
        return _bisect_initrds(args)
    foreign_only = [args.kernel, args.disks, args.root, args.expect, args.fail, args.overlays]
    if any(foreign_only) or args.markers is not None or args.root_failures is not None:
        raise ConfigError(
            "bisect: -k/--disk/--root/--expect/--fail/--overlay/--markers go with --initrds "
            "(over kernels, the template's init judges the boot)"
        )
    catalogue = common.catalogue_of(args)
    root = common.cache_of(args)
    candidates = bisect_candidates(catalogue, args.good, args.bad, args.kernels_list)
    workdir = args.workdir or common.new_run_dir(root, "bisect")
    oracle = _kernel_oracle(args, catalogue, root, workdir)
    print(f"bisecting {len(candidates)} kernels: {', '.join(candidates)}", flush=True)
    result = run_bisect(candidates, oracle, on_step=_print_step)
    print("\n".join(text.bisect_table(result)), flush=True)
    print(result.render(), flush=True)
    return result.status.exit_code


def _bisect_initrds(args: argparse.Namespace) -> int:
    """Bisect over initrd files with one kernel; the candidates are the paths as given."""
    if args.good or args.bad or args.kernels_list:
        raise ConfigError(
            "bisect --initrds: the list is the range; drop --good/--bad/--kernels-list"
        )
    candidates = [word.strip() for word in args.initrds.split(",") if word.strip()]
    for candidate in candidates:
        if not Path(candidate).is_file():
            raise ConfigError(f"bisect --initrds: {candidate} is not a file")
    catalogue = common.catalogue_of(args)
    root = common.cache_of(args)
    kernel = provision(common.one_kernel(catalogue, args.kernel), root, progress=False)
    workdir = args.workdir or common.new_run_dir(root, "bisect")
    verdicts = None if args.no_cache else VerdictCache(args.verdicts or root / "verdicts")
    oracle: Callable[[str], Observation]
    if args.pytest:
        boot_only = [args.template, args.commands, args.variables, args.modules, args.dirs]
        boot_only += [args.disks, args.root, args.expect, args.fail, args.overlays]
        if any(boot_only) or args.cmdline:
            raise ConfigError(
                "bisect --initrds --pytest judges with a test (it gets each image as --initrd): "
                "drop the boot options"
            )
        oracle = PytestOracle(
            node_id=args.pytest,
            kernels=lambda name: provision(catalogue.get(name), root, progress=False),
            kernels_file=catalogue.path,
            cache_root=root,
            workdir=workdir,
            accel=None if args.accel == "auto" else args.accel,
            extra_args=tuple(args.pytest_arg),
            verdicts=verdicts,
            initrd_kernel=kernel.name,
        )
    else:
        args.template = args.template or templates.DEFAULT_TEMPLATE
        args.files, args.compression = [], "gzip"
        request = common.boot_request(
            args,
            kernel,
            accel=common.accelerator(args.accel, root),
            deadlines=Deadlines.from_options(args.boot_timeout, args.timeout_multiplier),
            initrd=Path(candidates[0]),
        )
        oracle = InitrdOracle(request, cache_root=root, workdir=workdir, verdicts=verdicts)
    print(f"bisecting {len(candidates)} initrds with {kernel.name}: {', '.join(candidates)}")
    result = run_bisect(candidates, oracle, on_step=_print_step)
    print(result.render(), flush=True)
    upkeep.prune_now(root)  # at most hourly
    return result.status.exit_code


def _print_step(step: Step) -> None:
    print(f"step: {step.render()}", flush=True)


def bisect_candidates(
    catalogue: Catalogue, good: str | None, bad: str | None, explicit: str | None
) -> list[str]:
    """The kernels to bisect, good end first.

    Raises:
        ConfigError: an unknown name, an end not among the candidates, or a bad end
            listed before the good one.
    """
    if explicit:
        names: list[str] = []
        for item in (word.strip() for word in explicit.split(",")):
            if not item:
                continue
            if item in catalogue.names:
                names.append(item)
            else:
                names += [entry.name for entry in catalogue.select([item])]
        names = list(dict.fromkeys(names))
    else:
        if not good or not bad:
            raise ConfigError(
                "bisect: give --good NAME and --bad NAME (kernels of "
                f"{catalogue.path}), or --kernels-list A,B,C"
            )
        names = list(catalogue.names)
    for end in (good, bad):
        if end is not None:
            catalogue.get(end)  # an unknown name: ConfigError listing close names
            if end not in names:
                raise ConfigError(f"bisect: --good/--bad {end!r} is not in --kernels-list")
    first = names.index(good) if good else 0
    last = names.index(bad) if bad else len(names) - 1
    if last <= first:
        raise ConfigError(
            f"bisect: the bad kernel {names[last]!r} comes before the good one "
            f"{names[first]!r} in {'--kernels-list' if explicit else catalogue.path}; "
            "kernels are bisected oldest (good) first"
        )
    return names[first : last + 1]


def _kernel_oracle(
    args: argparse.Namespace, catalogue: Catalogue, root: Path, workdir: Path
) -> Callable[[str], Observation]:
    verdicts = None if args.no_cache else VerdictCache(args.verdicts or root / "verdicts")

    def kernels(name: str) -> Kernel:
        return provision(catalogue.get(name), root, progress=False)

    if args.pytest:
        boot_only = [args.template, args.commands, args.variables, args.modules, args.dirs]
        if any(boot_only) or args.cmdline:
            raise ConfigError(
                "bisect: --pytest judges with a test; drop --template/--run/--var/-m/"
                "--template-dir/--cmdline, or drop --pytest to judge with a boot"
            )
        return PytestOracle(
            node_id=args.pytest,
            kernels=kernels,
            kernels_file=catalogue.path,
            cache_root=root,
            workdir=workdir,
            accel=None if args.accel == "auto" else args.accel,
            extra_args=tuple(args.pytest_arg),
            verdicts=verdicts,
        )
    args.template = args.template or templates.DEFAULT_TEMPLATE
    args.files, args.compression = [], "gzip"
    return BootOracle(
        kernels=kernels,
        spec=common.initramfs_spec(args),
        cache_root=root,
        workdir=workdir,
        accel=common.accelerator(args.accel, root),
        deadlines=Deadlines.from_options(args.boot_timeout, args.timeout_multiplier),
        cmdline=args.cmdline,
        verdicts=verdicts,
        snapshot=args.snapshot,
    )


class _StepUsageError(Exception):
    pass


class _StepParser(argparse.ArgumentParser):
    """Usage errors raise instead of exiting: bisect-step maps them to 128 (abort)."""

    def error(self, message: str) -> NoReturn:
        raise _StepUsageError(message)


def _step_parser() -> _StepParser:
    parser = _StepParser(prog="bootharness bisect-step", add_help=False, usage=STEP_USAGE)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("-k", "--kernel", metavar="NAME")
    parser.add_argument("--build", metavar="CMD")
    parser.add_argument("--verdicts", type=Path, metavar="DIR")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--kernels", metavar="FILE")
    parser.add_argument("--cache", metavar="DIR")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def cmd_bisect_step(args: argparse.Namespace) -> int:
    """Never lets an exception escape: git bisect run would read exit 1 as "bad"."""
    try:
        return _bisect_step(args)
    except _StepUsageError as error:
        print(
            f"bootharness bisect-step: error: {error} (see bootharness bisect-step --help)",
            file=sys.stderr,
        )
        return STEP_ABORT
    except HarnessError as error:
        code = error.outcome.bisect_code
        print(f"bootharness bisect-step: {error}", file=sys.stderr)
        print(f"bisect-step: {error.outcome.name} -> exit {code}", flush=True)
        return code
    except Exception:
        traceback.print_exc()
        print("bootharness bisect-step: harness bug; aborting the bisection", file=sys.stderr)
        return STEP_BUG


def _bisect_step(args: argparse.Namespace) -> int:
    words: list[str] = list(args.argv)
    if "--" in words:
        split = words.index("--")
        own, oracle = words[:split], words[split + 1 :]
    else:
        own, oracle = words, []
    options = _step_parser().parse_args(own)
    if options.help:
        print(STEP_USAGE)
        return 0
    if options.verbose:
        common.setup_logging(options.verbose)
    if not oracle or oracle[0] not in ORACLE_KINDS:
        raise _StepUsageError(
            f"after --, name an oracle ({' or '.join(ORACLE_KINDS)}); got {' '.join(oracle)!r}"
        )
    # Global options given before bisect-step stay in args; those after it win.
    args.kernels = options.kernels or args.kernels
    args.cache = options.cache or args.cache
    if options.build:
        print(f"bisect-step: building: {options.build}", flush=True)
        # Guarded: a killed bisect-step takes its build (make and the compilers) along.
        built = lifeline.run_guarded(["sh", "-c", options.build]).returncode
        if built != 0:
            print(f"bisect-step: the build exited {built} -> skip (exit {STEP_SKIP})", flush=True)
            return STEP_SKIP
    root = common.cache_of(args)
    verdicts = None if options.no_cache else VerdictCache(options.verdicts or root / "verdicts")
    catalogue = common.catalogue_of(args)
    if options.kernel and not {"-k", "--kernel"} & set(oracle[1:]):
        oracle = [oracle[0], "--kernel", options.kernel, *oracle[1:]]
    if oracle[0] == "boot":
        name, judge = _step_boot_oracle(oracle[1:], catalogue, root, verdicts)
    else:
        name, judge = _step_pytest_oracle(oracle[1:], catalogue, root, verdicts)
    # The judged name is a kernel of the catalogue, or an initrd file (boot --initrd).
    entry = catalogue.get(name) if name in catalogue.names else None
    if entry is not None and isinstance(entry.source, SourceTree):
        try:
            kernel = build_source(entry, root)
        except BuildError as error:
            print(f"bisect-step: {name} does not build: {error.first_error}", flush=True)
            print(f"bisect-step: build log: {error.log_path}", flush=True)
            print(f"bisect-step: skip (exit {STEP_SKIP})", flush=True)
            return STEP_SKIP
        print(f"bisect-step: kernel {name} {kernel.release} at {kernel.commit}", flush=True)
    started = time.monotonic()
    try:
        observation = judge(name)
    except HarnessError as error:
        observation = Observation(error.outcome, error.evidence.log_path, error.message)
    step = Step(name, observation, time.monotonic() - started, role="git bisect run")
    print(f"bisect-step: {step.render()}", flush=True)
    if observation.log_path is not None:
        print(f"bisect-step: console: {observation.log_path}", flush=True)
    code = observation.outcome.bisect_code
    print(f"bisect-step: {step.verdict.value} (exit {code})", flush=True)
    return code


def _step_boot_oracle(
    words: Sequence[str], catalogue: Catalogue, root: Path, verdicts: VerdictCache | None
) -> tuple[str, Callable[[str], Observation]]:
    # The same options as `bootharness boot` (common.image_options + add_boot_options).
    parser = _StepParser(prog="bisect-step -- boot", parents=[common.image_options()])
    common.add_boot_options(parser)
    common.add_foreign_options(parser)
    parser.add_argument("--shell", action="store_true")
    try:
        boot_args = parser.parse_args(list(words))
    except SystemExit as done:
        raise _StepUsageError(f"bad boot oracle options: {' '.join(words)}") from done
    if boot_args.shell:
        raise _StepUsageError("--shell makes no sense in a bisect step")
    entry = common.one_kernel(catalogue, boot_args.kernel)
    foreign_options = [boot_args.disks, boot_args.root, boot_args.expect, boot_args.fail]
    if boot_args.initrd is not None:
        # A tree that builds an initrd (a generator's own repository): judge the image.
        kernel = provision(entry, root, progress=False)
        request = common.boot_request(
            boot_args,
            kernel,
            accel=common.accelerator(boot_args.accel, root),
            deadlines=Deadlines.from_options(boot_args.boot_timeout, boot_args.timeout_multiplier),
        )
        workdir = boot_args.workdir or common.new_run_dir(root, "bisect")
        initrd_oracle = InitrdOracle(request, cache_root=root, workdir=workdir, verdicts=verdicts)
        return str(boot_args.initrd), initrd_oracle
    if any(foreign_options) or boot_args.overlays or boot_args.markers is not None:
        raise _StepUsageError(
            "--disk/--root/--expect/--fail/--overlay/--markers go with --initrd in a bisect step"
        )
    oracle = BootOracle(
        kernels=lambda name: provision(catalogue.get(name), root, progress=False),
        spec=common.initramfs_spec(boot_args),
        cache_root=root,
        workdir=boot_args.workdir or common.new_run_dir(root, "bisect"),
        accel=common.accelerator(boot_args.accel, root),
        deadlines=Deadlines.from_options(boot_args.boot_timeout, boot_args.timeout_multiplier),
        cmdline=boot_args.cmdline,
        verdicts=verdicts,
        boot=common.boot_spec(boot_args),
        kernel_warnings=common.warnings_policy(boot_args),
        sandbox=common.sandbox_of(boot_args),
        snapshot=boot_args.snapshot,
    )
    return entry.name, oracle


def _step_pytest_oracle(
    words: Sequence[str], catalogue: Catalogue, root: Path, verdicts: VerdictCache | None
) -> tuple[str, Callable[[str], Observation]]:
    if not words or words[0].startswith("-"):
        raise _StepUsageError("pytest oracle: give a node id first: pytest NODEID [ARGS...]")
    picker = _StepParser(add_help=False)
    picker.add_argument("--kernel")
    picked, extra = picker.parse_known_args(list(words[1:]))
    entry = common.one_kernel(catalogue, picked.kernel)
    oracle = PytestOracle(
        node_id=words[0],
        kernels=lambda name: provision(catalogue.get(name), root, progress=False),
        kernels_file=catalogue.path,
        cache_root=root,
        workdir=common.new_run_dir(root, "bisect"),
        extra_args=tuple(extra),
        verdicts=verdicts,
    )
    return entry.name, oracle
