"""LoRA benchmark: the logits stage with full fine-tuning vs LoRA r=8 and r=32, same start, same tokens.

The start, shared by every config: SmolLM2-135M converted to a 50% hybrid with the student options of
recipes/lolcats-style-smollm2.yaml, then that recipe's hidden stage (the mixers aligned to the teacher's
blocks) on --hidden-tokens. From it, one logits stage per config on --tokens, each run by
`python -m ssmify distill` in a process of its own (the real loop, as a user runs it):

    full       trainable: all (every parameter), lr --full-lr
    lora-r8    the recipe's LoRA targets and modules_to_save (mixer_extras), r=8, alpha=16, lr --lora-lr
    lora-r32   the same with r=32, alpha=64

Per config:
- perplexity ratio: held-out perplexity / the teacher's on the same tokens (the first --eval-tokens of the
  held-out text, windows of --eval-seq-len);
- retrieval retention: student / teacher accuracy on the same induction and passkey samples at --lengths
  (`ssmify.eval.retrieval` through scripts/bench/retrieval.py's helpers; overall over the points the
  teacher passes);
- peak training memory: ru_maxrss of the distill process (os.wait4). It also holds the teacher, the data
  and the student, and the allocator reuses freed activation memory for gradients and AdamW state, so on
  CPU the one-step activations (logits over a 49k vocabulary) can hide what training state adds. Hence
  also `state_mib`, the training state itself: fp32 gradient + AdamW's two moments, 12 bytes per
  trainable parameter;
- tokens/s: the stage summary's training tokens / stage wall time (two validations and the save included);
- trainable parameters: the stage summary's count.

Results go to OUT/results.json and to --report (.json and .txt); a table is printed.

    python scripts/bench/lora.py          # SmolLM2-135M; about 10 min on 2 CPU cores
    python scripts/bench/lora.py --quick --teacher DIR --train T.txt --heldout H.txt --out DIR   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main
from init_ablation import HeldOut
from retrieval import retention, retrieval_scores

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "lolcats-style-smollm2.yaml"
CONFIGS = ("full", "lora-r8", "lora-r32")
STATE_BYTES = 12  # per trainable fp32 parameter: its gradient and AdamW's exp_avg and exp_avg_sq


def config_trainable(name: str, lora: dict) -> str | dict:
    """The logits stage's `trainable` for a config: "all", or the recipe's LoRA settings at rank r, alpha 2r."""
    if name == "full":
        return "all"
    rank = int(name.removeprefix("lora-r"))
    return {"lora": {**lora, "r": rank, "alpha": 2 * rank}}


def run_distill(recipe_path: Path, log_path: Path) -> int:
    """`python -m ssmify distill recipe_path` in a child process; its peak RSS in MiB (ru_maxrss, from wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "ssmify", "distill", str(recipe_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(
            f"distill of {recipe_path} failed ({child.returncode}); the end of {log_path}:\n{tail}"
        )
    return round(usage.ru_maxrss / 1024)  # Linux reports KiB


def table(results: dict) -> str:
    """The results as a fixed-width text table, with the command and the settings above it."""
    lengths = results["lengths"]
    lines = [
        f"# {results['command']}",
        f"# {results['finished']}, torch {results['torch']}, {results['threads']} threads, {results['cores']} cores",
        f"teacher {Path(results['teacher']).name}: held-out perplexity {results['teacher_perplexity']:.2f} "
        f"({results['eval_tokens']} tokens); start: 50% hybrid after hidden alignment on {results['hidden_tokens']} "
        f"tokens, perplexity x{results['start']['perplexity_ratio']:.3f}, retention {fmt(results['start']['retention'])}",
        f"logits stage: {results['tokens']} tokens per config, batches of {results['batch_tokens']} tokens; "
        f"retention at {', '.join(str(n) for n in lengths)} tokens, {results['samples']} samples per task and length",
    ]
    header = (
        f"{'config':<9} | {'trainable':>11} | {'ppl x':>6} | {'retention':>9} | "
        f"{'peak RSS MiB':>12} | {'state MiB':>9} | {'tok/s':>7} | {'lr':>7}"
    )
    lines += [header, "-" * len(header)]
    for name, run in results["runs"].items():
        lines.append(
            f"{name:<9} | {run['trainable_parameters']:>11,} | {run['perplexity_ratio']:>6.3f} | "
            f"{fmt(run['retention']):>9} | {run['peak_rss_mib']:>12,} | {run['state_mib']:>9,.1f} | "
            f"{run['tokens_per_s']:>7.1f} | {run['lr']:>7.1e}"
        )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budgets and slices")
    add_input_args(parser)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--tokens", type=int, default=8192, help="logits-stage training tokens per config")
    parser.add_argument("--hidden-tokens", type=int, default=8192, help="the shared hidden stage's tokens")
    parser.add_argument(
        "--batch-tokens", type=int, default=512, help="global batch of the logits stage, tokens"
    )
    parser.add_argument(
        "--full-lr", type=float, default=3.0e-4, help="full fine-tuning (the demo's logits lr)"
    )
    parser.add_argument("--lora-lr", type=float, default=1.0e-3, help="LoRA configs (the recipe's logits lr)")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048], help="retrieval context lengths"
    )
    parser.add_argument("--samples", type=int, default=4, help="retrieval samples per task and length")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--out", default="runs/bench/lora")
    parser.add_argument(
        "--report", help="writes REPORT.json and REPORT.txt (default: docs/bench/lora; quick: OUT/lora)"
    )
    args = parser.parse_args()
    recipe = yaml.safe_load(RECIPE.read_text())
    hidden, logits = copy.deepcopy(recipe["stages"])
    seq_len = recipe["data"]["seq_len"]
    student = dict(recipe["student"])
    if args.quick:
        args.tokens, args.hidden_tokens, args.batch_tokens, seq_len = 128, 64, 64, 32
        args.lengths, args.samples, args.eval_tokens, args.eval_seq_len = [128], 2, 256, 64
        hidden.update(global_batch_tokens=32)
        logits.update(micro_batch_size=2)
        student["layer_choice"] = (
            "even"  # the retrieval choice scores every layer first: too slow for a smoke test
        )
    report = (
        Path(args.report)
        if args.report
        else (Path(args.out) / "lora" if args.quick else REPO / "docs/bench/lora")
    )

    quiet_offline()
    from ssmify.convert import convert
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe
    from ssmify.distill.students import load_student
    from ssmify.eval.data import load_data
    from ssmify.eval.options import EvalOptions

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.eval().requires_grad_(False)
    windows = load_data([str(heldout)], tokenizer, args.eval_seq_len, max_tokens=args.eval_tokens).windows
    scored = HeldOut(teacher, windows, batch_size=4)
    options = EvalOptions(lengths=tuple(args.lengths), samples=args.samples, progress=False)
    teacher_retrieval = retrieval_scores(teacher, tokenizer, options)

    def score(folder: Path) -> dict:
        model = load_student(folder).eval()
        held = scored.score(model)
        kept = retention(retrieval_scores(model, tokenizer, options), teacher_retrieval)
        return {
            "perplexity": held["perplexity"],
            "perplexity_ratio": held["perplexity"] / held["teacher_perplexity"],
            "kl": held["kl"],
            "top1": held["top1"],
            "retention": kept["overall"],
            "retention_by_length": kept["by_length"],
        }

    base = {
        "teacher": str(teacher_dir),
        "data": {
            "train": [str(train)],
            "validation": [str(heldout)],
            "seq_len": seq_len,
            "synthetic": recipe["data"].get("synthetic"),
        },
        "seed": recipe.get("seed", 0),
        "teacher_dtype": "float32",
    }
    start_dir = out / "start"
    began = time.perf_counter()
    if not (start_dir / "convert" / "config.json").is_file():
        convert(  # from the folder, so that the layer scores are cached (as scripts/bench/retrieval.py does)
            str(teacher_dir),
            out=start_dir / "convert",
            tokenizer=tokenizer,
            seed=base["seed"],
            overwrite=True,
            **student,
        )
    start_recipe = {
        **base,
        "student": {"path": str(start_dir / "convert")},
        "output_dir": str(start_dir),
        "stages": [
            {**hidden, "tokens": args.hidden_tokens, "eval_tokens": seq_len, "checkpoint_every": None}
        ],
    }
    run_recipe(
        parse_recipe(start_recipe, source="start recipe"), resume=(start_dir / "recipe.yaml").is_file()
    )
    start = start_dir / "1-hidden"
    results = {
        "command": "python scripts/bench/lora.py " + " ".join(sys.argv[1:]),
        "teacher": str(teacher_dir),
        "recipe": str(RECIPE.relative_to(REPO)),
        "hidden_tokens": args.hidden_tokens,
        "tokens": args.tokens,
        "batch_tokens": args.batch_tokens,
        "lengths": args.lengths,
        "samples": args.samples,
        "eval_tokens": scored.tokens,
        "teacher_perplexity": math.exp(scored.teacher_nll / scored.tokens),
        "teacher_retrieval": teacher_retrieval,
        "start": score(start),
        "runs": {},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }
    print(f"start student ready and scored in {time.perf_counter() - began:.0f} s", flush=True)

    for name in args.configs:
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        lr = args.full_lr if name == "full" else args.lora_lr
        stage = {
            **logits,
            "tokens": args.tokens,
            "global_batch_tokens": args.batch_tokens,
            "lr": lr,
            "trainable": config_trainable(name, logits["trainable"]["lora"]),
            "eval_tokens": seq_len,
            "checkpoint_every": None,
        }
        config = {**base, "student": {"path": str(start)}, "output_dir": str(run_dir), "stages": [stage]}
        parse_recipe(config, source=f"{name} recipe")
        recipe_path = run_dir.parent / f"{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(config, sort_keys=False))
        began = time.perf_counter()
        peak = run_distill(recipe_path, run_dir.parent / f"{name}.log")
        summary = json.loads((run_dir / "1-logits" / "summary.json").read_text())
        results["runs"][name] = {
            "lr": lr,
            "trainable_parameters": summary["trainable_parameters"],
            "training_tokens": summary["tokens"],
            "tokens_per_s": summary["tokens_per_s"],
            "peak_rss_mib": peak,
            "state_mib": round(summary["trainable_parameters"] * STATE_BYTES / 2**20, 1),
            "process_seconds": round(time.perf_counter() - began, 1),
            **score(run_dir / "1-logits"),
        }
        print(f"[{name}] {json.dumps(results['runs'][name])}", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    text = table(results)
    print("\n" + text)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    report.with_suffix(".txt").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {report.with_suffix('.json')}, {report.with_suffix('.txt')}")


if __name__ == "__main__":
    run_main(main)
