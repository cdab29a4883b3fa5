"""`ssmify distill RECIPE.yaml [--set key=value ...] [--resume [--force]]`, also under `accelerate launch -m ssmify`."""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill a converted student from its teacher, stage by stage, as a YAML recipe says",
        description=(
            "Run the stages of a distillation recipe (matrix, hidden, logits). Each stage writes "
            "output_dir/<n>-<name>/ with the student as a Hugging Face folder and summary.json. "
            "For several processes or GPUs: accelerate launch [--config_file recipes/accelerate/ddp.yaml] "
            "-m ssmify distill RECIPE.yaml"
        ),
    )
    parser.add_argument("recipe", help="the recipe YAML file (see recipes/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value by its dotted path, e.g. --set stages.0.tokens=100000 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir: skip finished stages, resume the current one from a checkpoint",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even though the recipe differs from the one the run started with",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssmify.distill.recipe import load_recipe
    from ssmify.distill.run import run_recipe
    from ssmify.distill.state import distributed_state

    recipe = load_recipe(args.recipe, args.overrides)
    summaries = run_recipe(recipe, resume=args.resume, force=args.force)
    if distributed_state().is_main_process:
        for summary in summaries:
            shown = {k: v for k, v in summary.items() if k not in ("losses", "val_losses")}
            logger.info("%s", json.dumps(shown))
    return 0
