"""`ssmify export STUDENT --to auto|TARGET --out DIR`: write a student as a native transformers checkpoint."""

from __future__ import annotations

import argparse

TARGET_NAMES = (
    "bamba",
    "granitemoehybrid",
    "falcon_h1",
)  # ssmify.export.targets.TARGETS, without its imports


def register(subparsers) -> None:
    """Add the `export` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="write a student as a native transformers checkpoint that loads without ssmify",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("student", metavar="STUDENT", help="student folder, from ssmify convert or distill")
    parser.add_argument(
        "--to",
        default="auto",
        metavar="TARGET",
        help=f"auto (default: the first that holds the student exactly) or one of {', '.join(TARGET_NAMES)}",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the export folder")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssmify.export.export import export

    export(args.student, args.to, args.out, overwrite=args.overwrite)
    return 0
