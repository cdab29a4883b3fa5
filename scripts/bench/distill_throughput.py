"""Distillation throughput: each stage's real loop against its bare forward/backward/optimizer steps.

For every stage of a recipe (default: recipes/smollm2-demo.yaml, SmolLM2-135M, 50% hybrid), run:

- loop: `ssmify.distill.run_recipe` trains that stage for --steps optimizer steps, exactly as
  `ssmify distill` would (accelerate, data order, validation before and after, checkpoints every
  checkpoint_every steps, saving the stage's student). Its tokens/s is training tokens / wall time
  of the whole stage (`train_stage`, from loading the student to writing its folder).
- raw: the same objective from the same starting student, on the same batches (read beforehand),
  timed alone in a tight loop: teacher targets, student forward + backward per micro batch,
  gradient clipping, AdamW step. No accelerate, no validation, no checkpoints.

overhead = 1 - loop tokens/s / raw tokens/s, over the whole stage. The loop's time is also split
into its parts (train steps, validation, checkpoints, loading and saving the student, the rest),
timed by wrapping the loop's own functions, so that a missed target says where the time went.
Validation is a measurement the recipe asks for (eval_tokens, eval_every), not loop overhead, so the
target (at most 15%) is checked on the overhead without it: 1 - raw seconds / (loop seconds -
validation seconds); the whole-stage overhead is printed beside it. Stage i runs its loop and
then its raw steps before stage i+1 starts, so load drifts hit both alike.

    python scripts/bench/distill_throughput.py                  # the demo recipe, 24 steps per stage
    python scripts/bench/distill_throughput.py --quick --teacher DIR --train T.txt --heldout H.txt
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main

TARGET_OVERHEAD = 0.15
# The loop's functions whose time is reported separately (module attribute -> part name).
LOOP_PARTS = {
    "train_step": "train steps (fwd+bwd+clip)",
    "evaluate": "validation",
    "save_checkpoint": "checkpoints",
    "load_student": "load student",
    "save_student": "save student",
}
OTHER = "other (optimizer steps, accelerate setup, lr, logging)"


@contextlib.contextmanager
def timed_functions(module, names: list[str], totals: dict[str, float]):
    """Replace module.<name> by a wrapper that adds its wall time to totals[name]; restore on exit."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start

        return timed

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def raw_steps(recipe, index: int, start_dir: Path, teacher, tokenizer) -> dict:
    """The stage's objective trained alone for the same steps on the same batches; times per part."""
    from ssmify.distill.data import load_data
    from ssmify.distill.loop import param_groups, plan_stage
    from ssmify.distill.objectives import build_objective
    from ssmify.distill.recipe import stage_seq_len
    from ssmify.distill.schedules import lr_factor
    from ssmify.distill.students import load_student

    stage = recipe.stages[index]
    plan = plan_stage(recipe, index, num_processes=1)
    data = load_data(recipe.data, tokenizer, stage_seq_len(recipe, stage), recipe.seed)
    batches = [
        data.train.take(step * plan.sequences_per_step, plan.sequences_per_step).view(
            plan.accumulation, stage.micro_batch_size, plan.seq_len
        )
        for step in range(plan.steps)
    ]
    torch.manual_seed(recipe.seed + index)
    objective = build_objective(stage, load_student(start_dir))
    objective.train()
    optimizer = torch.optim.AdamW(
        param_groups(objective, stage.weight_decay), lr=stage.lr, betas=stage.betas, eps=stage.eps
    )
    parts = defaultdict(float)
    for step, global_batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * lr_factor(stage.schedule, step, plan.steps)
        for micro in global_batch:
            start = time.perf_counter()
            targets = objective.teacher_targets(teacher, micro)
            middle = time.perf_counter()
            loss = objective(micro, targets)["loss"] / plan.accumulation
            loss.backward()
            end = time.perf_counter()
            parts["teacher targets"] += middle - start
            parts["student fwd+bwd"] += end - middle
        start = time.perf_counter()
        if stage.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), stage.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts["clip+optimizer"] += time.perf_counter() - start
    seconds = sum(parts.values())
    tokens = plan.steps * plan.tokens_per_step
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "parts": dict(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two steps per stage: a smoke test")
    parser.add_argument("--recipe", default="recipes/smollm2-demo.yaml")
    add_input_args(parser)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per stage")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="runs/bench/distill-throughput")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps = 2

    quiet_offline(args.threads)
    import ssmify.distill.loop as loop
    import ssmify.distill.run as run
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.recipe import load_recipe, stage_dir_name

    # Each stage runs as a recipe cut after it, resumed: the run warns that its stage list changed.
    logging.getLogger(run.__name__).setLevel(logging.ERROR)

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    base = load_recipe(args.recipe)
    overrides = [
        f"teacher={teacher_dir}",
        f"data.train=[{train}]",
        f"data.validation=[{heldout}]",
        f"output_dir={out}",
        "teacher_dtype=float32",
    ]
    if args.quick:  # the recipe's attention layers are SmolLM2's; a tiny teacher keeps half of its own
        overrides.append('student={"keep_attention": 0.5}')
    for i, stage in enumerate(base.stages):
        overrides.append(f"stages.{i}.tokens={args.steps * stage.global_batch_tokens}")
        if args.quick:
            overrides.append(f"stages.{i}.checkpoint_every=1")
    recipe = load_recipe(args.recipe, overrides)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.eval().requires_grad_(False)

    print(
        f"distill throughput: {args.recipe} ({teacher_dir.name}), {args.steps} steps per stage, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    rows = []
    for index, stage in enumerate(recipe.stages):
        partial = recipe.model_copy(update={"stages": recipe.stages[: index + 1]})
        totals: dict[str, float] = defaultdict(float)
        start = time.perf_counter()
        with timed_functions(loop, list(LOOP_PARTS), totals), timed_functions(run, ["train_stage"], totals):
            summary = run.run_recipe(partial, resume=True)[-1]
        outside = time.perf_counter() - start - totals["train_stage"]
        previous = run.CONVERT_DIR if index == 0 else stage_dir_name(index - 1, recipe.stages[index - 1])
        raw = raw_steps(recipe, index, out / previous, teacher, tokenizer)
        loop_parts = {LOOP_PARTS[name]: totals[name] for name in LOOP_PARTS}
        loop_parts[OTHER] = totals["train_stage"] - sum(loop_parts.values())
        steps_seconds = totals["train_step"] + loop_parts[OTHER]
        row = {
            "stage": summary["stage"],
            "tokens": summary["tokens"],
            "steps": summary["steps"],
            "seq_len": stage.seq_len or recipe.data.seq_len,
            "micro_batch_size": stage.micro_batch_size,
            "accumulation": summary["accumulation"],
            "loop_seconds": totals["train_stage"],
            "loop_tokens_per_s": summary["tokens"] / totals["train_stage"],
            "summary_tokens_per_s": summary["tokens_per_s"],
            "loop_parts": loop_parts,
            "outside_stage_seconds": outside,
            "raw_seconds": raw["seconds"],
            "raw_tokens_per_s": raw["tokens_per_s"],
            "raw_parts": raw["parts"],
        }
        row["overhead"] = 1 - row["loop_tokens_per_s"] / row["raw_tokens_per_s"]
        row["overhead_without_validation"] = 1 - raw["seconds"] / (totals["train_stage"] - totals["evaluate"])
        row["steps_overhead"] = 1 - raw["seconds"] / steps_seconds
        rows.append(row)
        print(
            f"  {row['stage']}: loop {row['loop_tokens_per_s']:.1f} tok/s, raw {row['raw_tokens_per_s']:.1f} "
            f"tok/s, overhead {row['overhead']:.1%} ({row['overhead_without_validation']:.1%} without validation)",
            flush=True,
        )

    print(f"\ntokens/s per stage, loop vs raw; load average at the end {os.getloadavg()[0]:.2f}")
    header = (
        f"{'stage':<10} | {'tokens':>6} | {'loop tok/s':>10} | {'raw tok/s':>9} | {'overhead':>8} | "
        f"{'without validation':>18} | {'steps-only overhead':>19}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['stage']:<10} | {r['tokens']:>6} | {r['loop_tokens_per_s']:>10.1f} | "
            f"{r['raw_tokens_per_s']:>9.1f} | {r['overhead']:>8.1%} | {r['overhead_without_validation']:>18.1%} | "
            f"{r['steps_overhead']:>19.1%}"
        )
    print("\nwhere the loop's stage seconds went (raw seconds for comparison)")
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["loop_parts"].items())
        raw_parts = ", ".join(f"{k} {v:.1f}" for k, v in r["raw_parts"].items())
        print(f"  {r['stage']}: loop {r['loop_seconds']:.1f} s = {parts}")
        print(f"  {' ' * len(r['stage'])}  raw {r['raw_seconds']:.1f} s = {raw_parts}")
    for r in rows:
        met = r["overhead_without_validation"] <= TARGET_OVERHEAD
        print(
            f"target (overhead <= {TARGET_OVERHEAD:.0%}, validation excluded) {r['stage']}: "
            f"{r['overhead_without_validation']:.1%}, {'met' if met else 'MISSED'} "
            f"(whole stage {r['overhead']:.1%})"
        )
    if args.json:
        result = {
            "recipe": args.recipe,
            "teacher": str(teacher_dir),
            "steps": args.steps,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "stages": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
