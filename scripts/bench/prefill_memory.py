"""Peak memory of a long prefill: teacher vs pure-SSM student, with and without chunked prefill.

Each (model, context) runs in a fresh Python process, so no allocator state or cached buffer of one
measurement leaks into the next. In it the model is loaded (the student converted from the teacher
with random mixers, then the teacher dropped), and `generate(max_new_tokens=1)` prefills one random
context of ordinary tokens, batch 1, fp32:

- peak MiB: the process's peak resident set size during the generate call (VmHWM, reset through
  /proc/self/clear_refs after handing freed heap back to the OS), minus the resident size before it.
  So weights are excluded; activations, the cache, the logits and the allocator's own overhead are in.
  RSS rather than tracemalloc (which does not see torch's allocator) or the torch profiler's memory
  view (which counts tensor bytes but not what the process actually holds): RSS is what the machine
  has to provide. It is `ssmify.eval.speed.PeakMemory`, the speed evaluation's own measure.

Models: the teacher as transformers runs it (whole-prompt prefill, DynamicCache); the pure SSM with
its default chunked prefill (`prefill_chunk_size`, 2048); the pure SSM prefilled in one go
(`prefill_chunk_size=None`), to show what the chunking buys.

    python scripts/bench/prefill_memory.py                     # SmolLM2-135M, contexts 8192 16384
    python scripts/bench/prefill_memory.py --quick --teacher DIR   # tiny contexts: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "teacher": "teacher (whole prompt)",
    "ssm": "pure SSM (chunked prefill)",
    "ssm_whole": "pure SSM (whole prompt)",
}


def child(model_name: str, length: int, teacher_dir: str, threads: int) -> dict:
    """One measurement, in this (fresh) process."""
    import gc

    import torch

    from ssmify.convert import convert
    from ssmify.convert.teacher import load_teacher
    from ssmify.eval.recall import ordinary_tokens
    from ssmify.eval.speed import PeakMemory

    torch.set_num_threads(threads)
    teacher, tokenizer = load_teacher(Path(teacher_dir), dtype="float32")
    pool = ordinary_tokens(tokenizer, teacher)
    context = pool[torch.randint(len(pool), (1, length), generator=torch.Generator().manual_seed(0))]
    model = teacher.eval()
    if model_name != "teacher":
        model = convert(teacher, keep_attention=0.0, init="random", tokenizer=tokenizer).eval()
        del teacher
    settings = {} if model_name != "ssm_whole" else {"prefill_chunk_size": None}
    gc.collect()
    with torch.no_grad(), PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        model.generate(
            input_ids=context,
            attention_mask=torch.ones_like(context),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            **settings,
        )
        seconds = time.perf_counter() - start
    return {"peak_bytes": memory.peak, "prefill_s": seconds}


def measure(model_name: str, length: int, teacher_dir: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", model_name, str(length), teacher_dir, str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, name, length, teacher_dir, threads = sys.argv
        print(json.dumps(child(name, int(length), teacher_dir, int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny contexts: a smoke test")
    parser.add_argument("--teacher", help="teacher folder (default: SmolLM2-135M-Instruct via ssmify.assets)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.lengths = [160]
    if args.teacher:
        teacher_dir = args.teacher
    else:
        from ssmify import assets

        teacher_dir = str(assets.smollm2_teacher_dir())
    print(
        f"prefill peak memory (peak RSS above the loaded weights, fresh process per point), batch 1, fp32, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    points = []
    for length in args.lengths:
        point: dict = {"length": length}
        for name in MODELS:
            point[name] = measure(name, length, teacher_dir, args.threads)
            print(f"  L={length:>6} {name:<10} {json.dumps(point[name])}", flush=True)
        for name in ("ssm", "ssm_whole"):
            point[f"{name}_over_teacher"] = point[name]["peak_bytes"] / point["teacher"]["peak_bytes"]
        points.append(point)
    print(
        f"\npeak MiB above the weights, and prefill seconds; load average at the end {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'context':>7} | {'teacher':>8} | {'SSM chunked':>11} | {'SSM whole':>9} | {'chunked/teacher':>15} | "
        f"{'whole/teacher':>13} | {'s teacher':>9} | {'s chunked':>9} | {'s whole':>7}"
    )
    print(header)
    print("-" * len(header))
    for p in points:
        mib = {n: p[n]["peak_bytes"] / 2**20 for n in MODELS}
        print(
            f"{p['length']:>7} | {mib['teacher']:>8.0f} | {mib['ssm']:>11.0f} | {mib['ssm_whole']:>9.0f} | "
            f"{p['ssm_over_teacher']:>14.2f}x | {p['ssm_whole_over_teacher']:>12.2f}x | "
            f"{p['teacher']['prefill_s']:>9.2f} | {p['ssm']['prefill_s']:>9.2f} | {p['ssm_whole']['prefill_s']:>7.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2) + "\n")


if __name__ == "__main__":
    main()
