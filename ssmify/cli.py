"""The one entry point: `ssmify convert | distill | eval | export | demo`.

Each subcommand lives beside the code it drives, in a module that defines
`register(subparsers)`; that function adds the subparser and sets `func` to a
callable taking the parsed arguments. Modules import lazily, so `ssmify --help`
stays fast and a subcommand's heavy imports load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ssmify.errors import SsmifyError

SUBCOMMANDS = {
    "convert": "ssmify.convert.cli",
    "distill": "ssmify.distill.cli",
    "eval": "ssmify.eval.cli",
    "export": "ssmify.export.cli",
    "demo": "ssmify.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssmify", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # that capability has not landed yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        result = args.func(args)
    except SsmifyError as err:
        print(f"ssmify: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssmify: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
