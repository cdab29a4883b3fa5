"""`ssmify demo [--out DIR] [--keep-attention F] ...`: the whole flow on SmolLM2-135M-Instruct (see ssmify.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    parser = subparsers.add_parser(
        "demo",
        help="SmolLM2-135M-Instruct -> distilled hybrid SSM on CPU, with a report (about 15 minutes)",
        description=(
            "Convert SmolLM2-135M-Instruct into a hybrid (or pure) Mamba-2 student, distill it on Wikipedia "
            "text within a time budget, evaluate teacher, seeded and distilled student on held-out text, "
            "and write DIR/report.md. Rerunning with the same DIR continues or reuses that run."
        ),
    )
    parser.add_argument(
        "--out", default="runs/demo", metavar="DIR", help="output folder (default: runs/demo)"
    )
    parser.add_argument(
        "--keep-attention",
        type=float,
        default=None,
        metavar="F",
        help="fraction of layers that keep attention (default: the recipe's, 0.5; 0 = pure SSM)",
    )
    parser.add_argument(
        "--layer-choice",
        choices=("even", "sensitive", "kl", "retrieval", "auto"),
        default=None,
        help="which layers keep attention (default: the recipe's student.layer_choice, else sensitive)",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=15.0,
        metavar="N",
        help="wall-clock budget of the whole demo, caching included (default: 15); training gets what is left",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="YAML",
        help="distillation recipe (default: recipes/smollm2-demo.yaml of this checkout)",
    )
    parser.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        metavar="N",
        help="held-out tokens scored, from the start of the held-out text (default: sized to the budget)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in DIR, deleting a previous demo run"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssmify.demo.pipeline import DemoSettings, run_demo

    settings = DemoSettings(
        out=Path(args.out),
        keep_attention=args.keep_attention,
        layer_choice=args.layer_choice,
        budget_minutes=args.budget_minutes,
        recipe=args.recipe,
        eval_tokens=args.eval_tokens,
        overwrite=args.overwrite,
    )
    result = run_demo(settings)
    print(result.table)
    print(f"\nreport: {result.report}\nstudent: {result.student}")
    return 0
