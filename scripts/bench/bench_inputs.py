"""What the benchmarks share: the teacher and text they run on, and their quiet, offline setup.

Every benchmark defaults to SmolLM2-135M-Instruct and the Wikipedia split of `ssmify.assets`, and takes
`--teacher`, `--train` and `--heldout` to run on others. The scripts import this file from their own
folder (`python scripts/bench/<name>.py` puts it first on `sys.path`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def add_input_args(parser: argparse.ArgumentParser, text: bool = True) -> None:
    """`--teacher`, and with `text` the `--train`/`--heldout` pair, all defaulting to ssmify.assets."""
    parser.add_argument("--teacher", help="teacher folder (default: SmolLM2-135M-Instruct via ssmify.assets)")
    if text:
        parser.add_argument("--train", help="training text (default: the Wikipedia train split)")
        parser.add_argument("--heldout", help="held-out text (default: the Wikipedia held-out split)")


def quiet_offline(threads: int | None = None) -> None:
    """No model hub, warnings only in the log, and `threads` torch threads when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)


def resolve_teacher(args: argparse.Namespace) -> Path:
    """`--teacher`, or the cached SmolLM2 folder (built from its PyPI wheel once)."""
    from ssmify import assets

    return Path(args.teacher) if args.teacher else assets.smollm2_teacher_dir()


def resolve_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Path, Path]:
    """`--train` and `--heldout` (both or neither), or the cached Wikipedia split."""
    from ssmify import assets

    if bool(args.train) != bool(args.heldout):
        parser.error(
            "--train and --heldout go together: give both text files, or neither for the Wikipedia split"
        )
    return (Path(args.train), Path(args.heldout)) if args.train else assets.wikipedia_text()


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's `main`, and end an input problem (an `SsmifyError`: a full disk at a checkpoint, a
    plan out of range) as the CLI does: one line on stderr and exit code 2, not a traceback."""
    from ssmify.errors import SsmifyError

    try:
        main()
    except SsmifyError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
