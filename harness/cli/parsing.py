"""The light half of the command line: the parser class, the global options, number checks,
logging. Imports only the standard library and :mod:`harness.outcome`, so ``bootharness
--help`` and the dispatch to a command's module cost no more than Python's own start."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn

from harness.outcome import Outcome

USAGE_EXIT = Outcome.CONFIG_ERROR.cli_exit


class Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; bootharness exits 5, the CONFIG_ERROR code."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE_EXIT, f"{self.prog}: error: {message}\n")


def add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
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


# The global options that take a value, as :func:`command_word` must skip them.
GLOBAL_VALUE_OPTIONS = ("--kernels", "--cache")


def command_word(argv: list[str]) -> str | None:
    """The command a command line asks for: its first word that is not a global option (or
    an option's value). None for none, or when help is asked before any command."""
    words = iter(argv)
    for word in words:
        if word in ("-h", "--help"):
            return None
        if word in GLOBAL_VALUE_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(level)
