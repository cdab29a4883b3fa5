"""The one entry point: `ssmify convert | distill | teacher-cache | eval | export | demo`.

Each subcommand's parser lives in `ssmify.commands.<name>`, a module that defines
`register(subparsers)`; that function adds the subparser and sets `func` to a callable taking the
parsed arguments. Those modules import nothing heavy, so `ssmify --help` and `ssmify CMD --help`
load no torch; a subcommand's heavy imports load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import typing

from ssmify.errors import SsmifyError, one_line
from ssmify.version import version

SUBCOMMANDS = ("convert", "distill", "teacher-cache", "eval", "export", "demo")
QUIET, NORMAL, VERBOSE = logging.WARNING, logging.INFO, logging.DEBUG


class Parser(argparse.ArgumentParser):
    """argparse's parser, with its error kept to one line when it quotes an argument holding line breaks.

    Subparsers are of the same class (argparse makes them with the parent's type)."""

    def error(self, message: str) -> typing.NoReturn:
        super().error(one_line(message))


def add_verbosity(parser: argparse.ArgumentParser, default: int | str) -> None:
    """-v/--verbose and -q/--quiet; on a subparser the default is SUPPRESS, so the top level's value stays."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const=VERBOSE,
        default=default,
        help="debug logging",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="log_level",
        action="store_const",
        const=QUIET,
        default=default,
        help="warnings and errors only",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ssmify", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ssmify {version()}")
    add_verbosity(parser, NORMAL)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"ssmify.commands.{name.replace('-', '_')}").register(sub)
    for subparser in sub.choices.values():
        add_verbosity(subparser, argparse.SUPPRESS)
    return parser


def process_rank() -> int:
    """This process's rank under a multi-process launch (accelerate, torchrun set RANK), else 0."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def setup_logging(level: int) -> None:
    """Log lines with time, level and logger; processes other than rank 0 log warnings and errors only."""
    rank = process_rank()
    where = f" [rank {rank}]" if rank else ""
    logging.basicConfig(
        level=level if rank == 0 else max(level, QUIET),
        format=f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def describe_os_error(err: OSError, longest: int = 120) -> str:
    """One line for an OS error about a path (name too long, no permission, read-only, disk full, ...):
    the path, shortened when it is longer than `longest` characters, and the OS's reason."""
    name = os.fsdecode(err.filename) if isinstance(err.filename, (str, bytes)) else str(err.filename)
    if len(name) > longest:
        name = f"{name[: longest // 2]}... ({len(name)} characters)"
    return one_line(f"{name}: {err.strerror or err}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        from ssmify.convert.student import register

        register()  # the Auto classes learn the "ssmify" model type, as `import ssmify` does elsewhere
        result = args.func(args)
    except SsmifyError as err:
        print(f"ssmify: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.filename is None:
            raise  # not about a path the user gave: a bug, with its traceback
        logging.getLogger(__name__).debug("the OS error in full", exc_info=True)
        print(f"ssmify: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssmify: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
