"""`ssmify teacher-cache RECIPE --stage logits --top-k K [--out DIR] [--dtype float16|bfloat16|float32]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "teacher-cache",
        help="run the teacher once over a logits stage's data and store its top-K log-probabilities",
        description=(
            "Run the teacher over the exact batches (and validation blocks) a logits stage trains on and "
            "store, per token, the top-K log-probabilities, their ids and the log of the rest of the mass, "
            "in safetensors shards with a manifest. A killed run continues where it stopped. Point the "
            "stage at it with `teacher_cache: DIR` (or --set stages.N.teacher_cache=DIR) and it trains "
            "without running the teacher."
        ),
    )
    parser.add_argument("recipe", help="the recipe YAML file (see recipes/)")
    parser.add_argument(
        "--stage", default="logits", help="the stage: its name or its number from 1 (default logits)"
    )
    parser.add_argument("--top-k", type=int, required=True, help="log-probabilities kept per token, e.g. 64")
    parser.add_argument("--out", help="the cache folder (default: output_dir/teacher-cache-<n>-<name>-k<K>)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="storage type of the log-probabilities (default float16)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=1 << 20,
        help="about this many tokens per shard, in whole steps (default 1048576)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by its dotted path, as `ssmify distill --set` does (repeatable)",
    )
    parser.set_defaults(func=run)


def stage_index(recipe, text: str) -> int:
    """The index of the stage `text` names (a name, the first stage of that name, or a number from 1)."""
    names = [stage.name for stage in recipe.stages]
    if text.isdigit() and 1 <= int(text) <= len(names):
        index = int(text) - 1
    elif text in names:
        index = names.index(text)
    else:
        raise SsmifyError(
            f"--stage {text}: no such stage; the recipe's are {', '.join(names)} (or 1-{len(names)})"
        )
    if names[index] != "logits":
        raise SsmifyError(
            f"--stage {text}: a {names[index]} stage; only a logits stage reads a teacher cache"
        )
    return index


def run(args: argparse.Namespace) -> int:
    from ssmify.distill.recipe import load_recipe, stage_dir_name

    recipe = load_recipe(args.recipe, args.overrides)
    index = stage_index(recipe, args.stage)
    if args.top_k < 1:
        raise SsmifyError(f"--top-k {args.top_k}: give at least 1")
    if args.shard_tokens < 1:
        raise SsmifyError(f"--shard-tokens {args.shard_tokens}: give at least 1")
    name = f"teacher-cache-{stage_dir_name(index, recipe.stages[index])}-k{args.top_k}"
    out = Path(args.out) if args.out else Path(recipe.output_dir) / name
    if out.exists() and not out.is_dir():
        raise SsmifyError(f"--out {out}: exists and is not a folder")

    from ssmify.distill.teacher_cache import cache_stage

    manifest = cache_stage(recipe, index, args.top_k, out, args.dtype, args.shard_tokens)
    size = sum(entry["bytes"] for entry in [manifest["validation"], *manifest["shards"]])
    logger.info(
        "teacher cache %s: %d training sequences in %d shards, %.1f MB; use it with --set stages.%d.teacher_cache=%s",
        out,
        manifest["sequences"],
        len(manifest["shards"]),
        size / 1e6,
        index,
        out,
    )
    return 0
