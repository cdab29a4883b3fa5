"""Activation checkpointing in a long logits stage: peak memory and training tokens/s, without and with.

The student: SmolLM2-135M converted to the head-level hybrid of recipes/smollm2-heads9.yaml (attention in 9
of 90 KV groups, every other head a Gated DeltaNet mixer head; `--student DIR` to use another). From it, per
sequence length and setting, one logits stage of `--steps` optimizer steps of one sequence (the recipe's
2k stage on text alone: forward KL, trainable mixers+attention), run by `python -m ssmify distill` in a process of its
own, the same recipe but for `activation_checkpointing`:

- peak RSS MiB: ru_maxrss of the distill process (os.wait4). It holds the teacher, the student, AdamW's
  state and the data as well as the activations, which is what the machine has to provide;
- train tok/s: the stage summary's `train_tokens_per_s`, the optimizer steps alone (no validation or save).

The ratios (with / without) are measured side by side in one run; the absolute figures are noise on a
shared machine.

    python scripts/bench/activation_checkpointing.py                    # SmolLM2-135M, 2,048 tokens, 4 steps
    python scripts/bench/activation_checkpointing.py --quick --teacher DIR --train T.txt --heldout H.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main
from lora import run_distill

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-heads9.yaml"
SETTINGS = {"off": False, "on": True}


def table(results: dict) -> str:
    """One row per length: both settings' peak RSS and tok/s, and the ratios with / without."""
    header = (
        f"{'seq_len':>7} | {'peak RSS MiB off':>16} | {'on':>6} | {'on/off':>6} | "
        f"{'train tok/s off':>15} | {'on':>6} | {'on/off':>6}"
    )
    lines = [header, "-" * len(header)]
    for length, runs in results["lengths"].items():
        off, on = runs["off"], runs["on"]
        lines.append(
            f"{length:>7} | {off['peak_rss_mib']:>16,} | {on['peak_rss_mib']:>6,} | "
            f"{on['peak_rss_mib'] / off['peak_rss_mib']:>6.2f} | {off['train_tokens_per_s']:>15.1f} | "
            f"{on['train_tokens_per_s']:>6.1f} | {on['train_tokens_per_s'] / off['train_tokens_per_s']:>6.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: a tiny length and 2 steps")
    add_input_args(parser)
    parser.add_argument(
        "--student", help="a converted student folder (default: --attention-heads, converted)"
    )
    parser.add_argument(
        "--attention-heads", help="the KV groups kept (default: recipes/smollm2-heads9.yaml's)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048], help="training sequence lengths")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run, one sequence each")
    parser.add_argument("--out", default="runs/bench/activation_checkpointing")
    parser.add_argument(
        "--report", help="writes REPORT.json and REPORT.txt (default: docs/bench/activation_checkpointing)"
    )
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.steps = [64], 2
    recipe = yaml.safe_load(RECIPE.read_text())
    stage_2k = {k: v for k, v in recipe["stages"][-1].items() if k != "synthetic_fraction"}  # text only
    report = Path(args.report) if args.report else REPO / "docs/bench/activation_checkpointing"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    quiet_offline()
    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    student = Path(args.student) if args.student else out / "student"
    if not args.student and not (student / "config.json").is_file():
        from ssmify.convert import convert

        settings = recipe["student"]
        convert(
            str(teacher_dir),
            out=student,
            attention_heads=args.attention_heads or settings["attention_heads"],
            mixer=settings["mixer"],
            init=settings["init"],
            overwrite=True,
        )

    results: dict = {
        "command": "python scripts/bench/activation_checkpointing.py " + " ".join(sys.argv[1:]),
        "teacher": str(teacher_dir),
        "student": str(student),
        "steps": args.steps,
        "lengths": {},
        "torch": torch.__version__,
        "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or torch.get_num_threads(),
        "load_average_start": os.getloadavg()[0],
    }
    for length in args.lengths:
        runs = {}
        for name, checkpointing in SETTINGS.items():
            run_dir = out / f"{length}-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            stage = {
                **stage_2k,
                "seq_len": length,
                "tokens": args.steps * length,
                "global_batch_tokens": length,
                "micro_batch_size": 1,
                "eval_tokens": length,
                "checkpoint_every": None,
                "activation_checkpointing": checkpointing,
            }
            config = {
                "teacher": str(teacher_dir),
                "student": {"path": str(student)},
                "data": {"train": [str(train)], "validation": [str(heldout)], "seq_len": length},
                "output_dir": str(run_dir),
                "seed": 0,
                "teacher_dtype": "float32",
                "stages": [stage],
            }
            recipe_path = out / f"{length}-{name}.yaml"
            recipe_path.write_text(yaml.safe_dump(config, sort_keys=False))
            peak = run_distill(recipe_path, out / f"{length}-{name}.log")
            summary = json.loads((run_dir / "1-logits" / "summary.json").read_text())
            runs[name] = {
                "peak_rss_mib": peak,
                "train_tokens_per_s": summary["train_tokens_per_s"],
                "loss_first": summary["loss_first"],
            }
            print(f"[{length} {name}] {json.dumps(runs[name])}", flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        results["lengths"][length] = runs
    results["load_average_end"] = os.getloadavg()[0]
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    text = table(results)
    print("\n" + text)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    report.with_suffix(".txt").write_text(text + "\n")
    print(f"\nresults: {report.with_suffix('.json')}, {report.with_suffix('.txt')}")


if __name__ == "__main__":
    run_main(main)
