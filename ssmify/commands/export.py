"""`ssmify export STUDENT --to auto|TARGET --out DIR`: write a student as a native transformers checkpoint."""

from __future__ import annotations

import argparse

TARGET_NAMES = (
    "granitemoehybrid",
    "bamba",
    "falcon_h1",
)  # ssmify.export.targets.TARGETS, without its imports
ENGINE_NAMES = ("vllm", "llama.cpp")  # ssmify.export.engine_rules.ENGINE_NAMES, likewise


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
        help=f"auto (default: the target the most engines run exactly), an engine ({', '.join(ENGINE_NAMES)}: "
        f"a target it runs exactly) or one of {', '.join(TARGET_NAMES)}",
    )
    parser.add_argument(
        "--verify-engine",
        metavar="ENGINE",
        help=f"also run the export in {', '.join(ENGINE_NAMES)} or all (comma-separated), in the venvs that "
        "`make engines` builds, and refuse it unless greedy tokens and logprobs match the student",
    )
    parser.add_argument(
        "--pad-state",
        type=int,
        metavar="N",
        help="zero-pad the mixers' d_state to N, which is exact (llama.cpp's CUDA scan runs only 96, 128, 256)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the export folder")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssmify.export.export import export

    export(
        args.student,
        args.to,
        args.out,
        overwrite=args.overwrite,
        verify_engine=args.verify_engine,
        pad_state=args.pad_state,
    )
    return 0
