"""The logits stage from a teacher cache against the same stage with the teacher online, side by side.

The demo recipe's logits stage (SmolLM2-135M-Instruct teacher, a 50% hybrid student), cut to
--tokens, runs twice from the same converted student on the same batches:

- online: `ssmify distill` as usual, the teacher's forward pass in every micro batch (full-vocabulary KL);
- cached: the stage with `teacher_cache` pointing to a cache of --top-k (default 64) made beforehand by
  `ssmify teacher-cache` (KL over the top-K plus a rest bucket).

It reports both stages' training tokens/s (the loop's train steps alone, and the whole stage with its
validation and checkpoints), the final full-vocabulary KL(teacher || student) of both students on
--heldout-blocks held-out blocks, the time the cache took to build, and the disk cost per million
training tokens of caches at each --disk-k (built for real; bytes of the actual shards).
Targets: cached >= 1.8x the online train-step tokens/s, held-out KL within 5%.

    python scripts/bench/teacher_cache.py                      # SmolLM2-135M, 32768 tokens
    python scripts/bench/teacher_cache.py --quick --teacher DIR --train T.txt --heldout H.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main

TARGET_SPEEDUP = 1.8
TARGET_KL = 0.05


@contextlib.contextmanager
def timed(module, name: str, totals: dict[str, float]):
    """Add the wall time of every call of module.<name> to totals[name] while inside."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run_stage(raw: dict) -> dict:
    """Run the one-stage recipe; its summary plus the seconds spent in train steps and validation."""
    import ssmify.distill.loop as loop
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe

    totals: dict[str, float] = defaultdict(float)
    with timed(loop, "train_step", totals), timed(loop, "evaluate", totals):
        summary = run_recipe(parse_recipe(raw))[-1]
    tokens = summary["tokens"]
    return {
        "tokens": tokens,
        "stage_seconds": summary["seconds"],
        "stage_tokens_per_s": summary["tokens_per_s"],
        "train_step_seconds": totals["train_step"],
        "train_tokens_per_s": tokens / totals["train_step"],
        "validation_seconds": totals["evaluate"],
    }


@torch.no_grad()
def held_out_kl(student_dir: Path, teacher, blocks: torch.Tensor, batch: int) -> float:
    """Mean per-token KL(teacher || student) over the full vocabulary, on `blocks`."""
    from transformers import AutoModelForCausalLM

    from ssmify.distill.objectives.logits import kd_loss
    from ssmify.distill.recipe import LossConfig

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        teacher_logits = teacher(input_ids=chunk, use_cache=False).logits
        student_logits = student(input_ids=chunk, use_cache=False).logits
        total += kd_loss(student_logits, teacher_logits, chunk, LossConfig())["kl"].item() * len(chunk)
    return total / len(blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run: a smoke test")
    parser.add_argument("--recipe", default="recipes/smollm2-demo.yaml")
    add_input_args(parser)
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens of the logits stage")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--disk-k", default="16,64,256", help="the K values whose disk cost is measured")
    parser.add_argument("--heldout-blocks", type=int, default=16, help="held-out blocks the final KL is on")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="runs/bench/teacher-cache")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.heldout_blocks, args.disk_k = 2048, 2, "16,64"  # the tiny vocabulary is 128

    quiet_offline(args.threads)
    from ssmify.convert.student import register
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.data import load_data
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.teacher_cache import build_teacher_cache

    register()
    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    raw = yaml.safe_load(Path(args.recipe).read_text())
    logits = next(stage for stage in raw["stages"] if stage["name"] == "logits")
    logits["tokens"] = args.tokens
    # Half the layers keep attention, spread evenly: the recipe's retrieval choice scores every layer first
    # (minutes per layer on a CPU), and which layers are mixers does not change what is compared here.
    raw["student"] = {"keep_attention": 0.5, "layer_choice": "even", "init": "seeded"}
    if args.quick:  # the recipe's batches are SmolLM2's; the tiny teacher's corpus is small
        logits.update(global_batch_tokens=128, micro_batch_size=2, seq_len=32, eval_tokens=64)
    raw.update(
        teacher=str(teacher_dir),
        data={**raw["data"], "train": [str(train)], "validation": [str(heldout)]},
        teacher_dtype="float32",
        stages=[logits],
        output_dir=str(out / "online"),
    )
    recipe = parse_recipe(raw)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.requires_grad_(False)
    print(
        f"teacher cache: {args.recipe} logits stage ({teacher_dir.name}), {args.tokens} tokens, "
        f"K={args.top_k}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )

    online = run_stage(raw)  # converts the student into online/0-convert first (not timed in the stage)
    student = out / "online" / "0-convert"

    disk = {}
    for k in sorted({args.top_k, *(int(k) for k in args.disk_k.split(","))}):
        folder = out / f"cache-k{k}"
        start = time.perf_counter()
        manifest = build_teacher_cache(recipe, 0, k, folder, teacher, tokenizer, "float32", "float16")
        seconds = time.perf_counter() - start
        train_tokens = manifest["sequences"] * (logits.get("seq_len") or recipe.data.seq_len)
        train_bytes = sum(entry["bytes"] for entry in manifest["shards"])
        disk[k] = {
            "build_seconds": seconds,
            "build_tokens_per_s": train_tokens / seconds,
            "train_bytes": train_bytes,
            "mb_per_million_tokens": train_bytes / train_tokens,  # bytes per token = MB per million tokens
        }
        print(f"  cache K={k}: {train_bytes / 1e6:.1f} MB, {seconds:.1f} s", flush=True)

    cached_raw = {
        **raw,
        "student": {"path": str(student)},
        "output_dir": str(out / "cached"),
        "stages": [{**logits, "teacher_cache": str(out / f"cache-k{args.top_k}")}],
    }
    cached = run_stage(cached_raw)

    seq_len = logits.get("seq_len") or recipe.data.seq_len
    blocks = load_data(recipe.data, tokenizer, seq_len, recipe.seed).validation.first(args.heldout_blocks)
    batch = logits.get("micro_batch_size", 1)
    online["heldout_kl"] = held_out_kl(out / "online" / "1-logits", teacher, blocks, batch)
    cached["heldout_kl"] = held_out_kl(out / "cached" / "1-logits", teacher, blocks, batch)
    start_kl = held_out_kl(student, teacher, blocks, batch)

    speedup = cached["train_tokens_per_s"] / online["train_tokens_per_s"]
    stage_speedup = cached["stage_tokens_per_s"] / online["stage_tokens_per_s"]
    kl_gap = cached["heldout_kl"] / online["heldout_kl"] - 1
    print(
        f"\nlogits stage, {args.tokens} tokens, same student and batches; load average at the end {os.getloadavg()[0]:.2f}"
    )
    print(
        f"| teacher | train-step tok/s | whole-stage tok/s | held-out KL ({len(blocks) * seq_len} tokens) |"
    )
    print("|---|---|---|---|")
    for name, result in (("online", online), (f"cache K={args.top_k}", cached)):
        print(
            f"| {name} | {result['train_tokens_per_s']:.0f} | {result['stage_tokens_per_s']:.0f} | "
            f"{result['heldout_kl']:.4f} |"
        )
    print(f"(held-out KL of the student before the stage: {start_kl:.4f})")
    print(f"speedup: train steps {speedup:.2f}x, whole stage {stage_speedup:.2f}x; held-out KL {kl_gap:+.1%}")
    print(
        f"target (train steps >= {TARGET_SPEEDUP}x): {'met' if speedup >= TARGET_SPEEDUP else 'missed'}; "
        f"target (KL within {TARGET_KL:.0%}): {'met' if abs(kl_gap) <= TARGET_KL else 'missed'}"
    )
    print("\n| K | MB per million tokens | cache build tok/s |")
    print("|---|---|---|")
    for k, row in disk.items():
        print(f"| {k} | {row['mb_per_million_tokens']:.0f} | {row['build_tokens_per_s']:.0f} |")
    if args.json:
        result = {
            "tokens": args.tokens,
            "top_k": args.top_k,
            "online": online,
            "cached": cached,
            "start_heldout_kl": start_kl,
            "speedup": speedup,
            "stage_speedup": stage_speedup,
            "kl_gap": kl_gap,
            "disk": disk,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    run_main(main)
