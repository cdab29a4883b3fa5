"""Decode speed, peak memory and decoding-state size: teacher vs pure-SSM student vs 50% hybrid.

All three models are measured in one process, interleaved at each context length (batch 1, the same
random context of ordinary tokens for all three), with `ssmify.eval.speed.measure`, the evaluator
behind `ssmify eval --speed`:

- decode tokens/s: greedy `generate` with the model's own cache (KV cache for attention layers, conv +
  recurrent state for mixers), timed from the first to the last of --decode-tokens new tokens;
- prefill s: one `generate(max_new_tokens=1)` over the context;
- peak memory: the process's peak resident set size (VmHWM, reset through /proc/self/clear_refs)
  during prefill + decode, minus the resident size before, so weights are excluded and prefill
  activations are included;
- state bytes: exact bytes of every tensor in the cache after the prefill.

The students are converted with `init="random"` (untrained mixers decode exactly as fast as trained
ones). Contexts past the teacher's max_position_embeddings (8192 for SmolLM2) are still computed:
RoPE extends to any position, so the speed is real even though the teacher's quality there is not.

    python scripts/bench/decode.py                      # SmolLM2-135M, contexts 512 2048 8192 16384
    python scripts/bench/decode.py --quick --teacher DIR   # tiny contexts: a smoke test
    python scripts/bench/decode.py --lengths 8192 --static-teacher   # also the teacher with a StaticCache

--static-teacher adds the teacher decoding with transformers' StaticCache (preallocated to the
context plus the new tokens, so no per-token copy of the cache), the strongest plain-transformers
baseline on CPU; the pure SSM's speedup over it is printed too.

    python scripts/bench/decode.py --batches 1 16 --lengths 512 2048 4096 8192   # decode steps by batch

--plan NAME=HEADS adds a student converted with `--attention-heads HEADS` (LAYER:GROUP,..., LAYER:all for
a whole layer), measured beside the others, with its decode speedup and state over the teacher's;
NAME=HEADS@MIXER converts it with that mixer (default mamba2):

    python scripts/bench/decode.py --lengths 8192 --plan heads9=18:2,17:1,23:0 layers3=16:all,17:all,18:all
    python scripts/bench/decode.py --lengths 8192 --plan m=18:2,17:1 gdn=18:2,17:1@gated_deltanet

--batches measures the decode step itself at several batch sizes, the four models (teacher with its
default DynamicCache, teacher with a StaticCache, pure SSM, hybrid) interleaved at each context: one
prefill per model and context through `generate(max_new_tokens=1)` (the students' chunked prefill,
the static teacher's StaticCache sized for the new tokens), then, for each batch size, the cache
repeated to the batch (a step's cost depends on the cache's size, not its contents, so the batch-16
prompts need not be prefilled 16 times) and --decode-tokens greedy forward steps timed. Batch sizes
above 1 skip contexts past --max-batch-context (the teacher's KV cache is batch x its batch-1 size).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from pathlib import Path

import torch
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, run_main

LABELS = {
    "teacher": "teacher (KV cache)",
    "teacher_static": "teacher (static KV cache)",
    "ssm": "pure SSM (0% attention)",
    "hybrid": "hybrid (50% attention)",
}


def mib(value: int | None) -> str:
    return f"{value / 2**20:.2f}" if value is not None else "n/a"


def widened(cache, batch: int):
    """A copy of `cache` with every sequence repeated `batch` times (KV layers, static layers, mixer states)."""
    from transformers.cache_utils import StaticLayer

    cache = copy.deepcopy(cache)
    if batch == 1:
        return cache
    for layer in cache.layers:
        if isinstance(layer, StaticLayer):  # transformers has no batch_repeat_interleave for these
            layer.keys = layer.keys.repeat_interleave(batch, dim=0)
            layer.values = layer.values.repeat_interleave(batch, dim=0)
            layer.batch_size = batch
        else:
            layer.batch_repeat_interleave(batch)
    return cache


def decode_by_batch(model, context: torch.Tensor, batches: list[int], steps: int, static: bool) -> dict:
    """Prefill `context` (1, L) once, then per batch size: tokens/s of `steps` greedy forward steps."""
    from transformers import StaticCache

    length = context.shape[1]
    extra = {}
    if static:  # our own StaticCache, with room for the decode steps (generate's would end at the prompt)
        extra = {
            "cache": StaticCache(model.config, max_cache_len=length + steps + 2),
            "cache_implementation": None,
        }
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            input_ids=context,
            attention_mask=torch.ones_like(context),
            max_new_tokens=1,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )
        result: dict = {"prefill_s": time.perf_counter() - start}
        for batch in batches:
            cache = widened(out.cache, batch)
            token = out.sequences[:, -1:].repeat(batch, 1)
            start = time.perf_counter()
            for _ in range(steps):
                logits = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
                token = logits[:, -1:].argmax(-1)
            result[f"batch{batch}_tokens_per_s"] = batch * steps / (time.perf_counter() - start)
            del cache
    return result


def by_batch(models: dict, pool, generator, args) -> None:
    """The --batches run: decode tokens/s per batch size and context, four models interleaved."""
    started = time.perf_counter()
    print(
        f"decode steps by batch: batches {args.batches}, {args.decode_tokens} steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
        "at the start",
        flush=True,
    )
    warmup = pool[torch.randint(len(pool), (1, 16), generator=generator)]
    for name, model in models.items():
        decode_by_batch(model, warmup, args.batches, 2, name == "teacher_static")
    points = []
    for length in args.lengths:
        context = pool[torch.randint(len(pool), (1, length), generator=generator)]
        batches = [b for b in args.batches if b == 1 or length <= args.max_batch_context]
        point: dict = {"length": length}
        for name, model in models.items():
            point[name] = decode_by_batch(
                model, context, batches, args.decode_tokens, name == "teacher_static"
            )
            print(f"  L={length:>6} {name:<14} {json.dumps(point[name])}", flush=True)
        for batch in batches:
            key = f"batch{batch}_tokens_per_s"
            for name in ("ssm", "hybrid"):
                for base in ("teacher", "teacher_static"):
                    point[f"{name}_over_{base}_batch{batch}"] = point[name][key] / point[base][key]
        points.append(point)
    minutes = (time.perf_counter() - started) / 60
    print(
        f"\ndecode tokens/s (all sequences of the batch together); load average at the end "
        f"{os.getloadavg()[0]:.2f}, {minutes:.1f} min"
    )
    header = (
        f"{'batch':>5} | {'context':>7} | {'teacher':>8} | {'static':>8} | {'pure SSM':>8} | {'hybrid':>8} | "
        f"{'SSM/static':>10} | {'SSM/teacher':>11} | {'hybrid/static':>13}"
    )
    print(header)
    print("-" * len(header))
    for batch in args.batches:
        for p in points:
            key = f"batch{batch}_tokens_per_s"
            if key not in p["ssm"]:
                continue
            print(
                f"{batch:>5} | {p['length']:>7} | {p['teacher'][key]:>8.2f} | {p['teacher_static'][key]:>8.2f} | "
                f"{p['ssm'][key]:>8.2f} | {p['hybrid'][key]:>8.2f} | "
                f"{p[f'ssm_over_teacher_static_batch{batch}']:>9.2f}x | "
                f"{p[f'ssm_over_teacher_batch{batch}']:>10.2f}x | {p[f'hybrid_over_teacher_static_batch{batch}']:>12.2f}x"
            )
    print("\nprefill seconds (generate(max_new_tokens=1), batch 1)")
    for p in points:
        print(f"{p['length']:>7} | " + " | ".join(f"{n} {p[n]['prefill_s']:8.2f}" for n in models))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"batches": args.batches, "steps": args.decode_tokens, "points": points}, indent=2)
            + "\n"
        )


def profile_decode(model, context: torch.Tensor, steps: int, rows: int) -> str:
    """torch.profiler's ops by self CPU time over `steps` greedy decode steps after a prefill of `context`,
    with the wall time per step and the share of it that no op accounts for (Python and framework)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(input_ids=context, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            wall = time.perf_counter() - start
    events = prof.key_averages()
    ops = sum(e.self_cpu_time_total for e in events) / 1e6
    table = events.table(sort_by="self_cpu_time_total", row_limit=rows)
    return (
        f"{wall / steps * 1000:.1f} ms per step under the profiler; ops' self CPU time {ops / steps * 1000:.1f} ms "
        f"per step\n{table}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny contexts and few tokens: a smoke test")
    add_input_args(parser, text=False)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--static-teacher",
        action="store_true",
        help="also measure the teacher with transformers' StaticCache",
    )
    parser.add_argument(
        "--profile", type=int, metavar="LENGTH", help="after measuring, profile decoding at this context"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", help="decode steps at these batch sizes (see above)"
    )
    parser.add_argument("--max-batch-context", type=int, default=4096, help="longest context for batch > 1")
    parser.add_argument(
        "--plan",
        nargs="+",
        default=[],
        metavar="NAME=HEADS[@MIXER]",
        help="also a student with these KV groups kept (convert --attention-heads), e.g. h2=3:0,5:all, "
        "converted with MIXER (default mamba2), e.g. g2=3:0@gated_deltanet",
    )
    args = parser.parse_args()
    if any("=" not in item for item in args.plan):
        parser.error(f"--plan: give NAME=HEADS, e.g. h2=3:0,5:all (got {' '.join(args.plan)})")
    plans = {}  # name -> (heads, mixer)
    for item in args.plan:
        name, spec = item.split("=", 1)
        heads, _, mixer = spec.partition("@")
        plans[name] = (heads, mixer or "mamba2")
    if args.quick:
        args.lengths, args.decode_tokens = [32, 64], 4
        args.profile = args.profile and 64

    quiet_offline(args.threads)
    from ssmify.convert import convert
    from ssmify.convert.teacher import load_teacher
    from ssmify.eval.recall import ordinary_tokens
    from ssmify.eval.scan import max_positions
    from ssmify.eval.speed import MEMORY, measure

    teacher_dir = resolve_teacher(args)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    models = {
        "teacher": teacher.eval(),
        "ssm": convert(teacher, keep_attention=0.0, init="random", tokenizer=tokenizer).eval(),
        "hybrid": convert(teacher, keep_attention=0.5, init="random", tokenizer=tokenizer).eval(),
    }
    for name, (heads, mixer) in plans.items():
        models[name] = convert(
            teacher, attention_heads=heads, mixer=mixer, init="random", tokenizer=tokenizer
        ).eval()
    if args.static_teacher or args.batches:
        static = copy.copy(teacher)  # the same weights; only its generation config differs
        static.generation_config = copy.deepcopy(teacher.generation_config)
        static.generation_config.cache_implementation = "static"
        models["teacher_static"] = static
    limit = max_positions(teacher)
    generator = torch.Generator().manual_seed(0)
    pool = ordinary_tokens(tokenizer, teacher)
    if args.batches:
        by_batch(models, pool, generator, args)
        return
    warmup = pool[torch.randint(len(pool), (1, 16), generator=generator)]
    for model in models.values():
        measure(model, warmup, 2)

    started = time.perf_counter()
    print(
        f"decode benchmark: {teacher_dir.name}, batch 1, {args.decode_tokens} new tokens after the context, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    if limit is not None and max(args.lengths) > limit:
        print(
            f"note: contexts above max_position_embeddings={limit} run past the teacher's trained length "
            "(RoPE is computed there all the same; the speed is real, the quality is not)"
        )
    points = []
    for length in args.lengths:
        context = pool[torch.randint(len(pool), (1, length), generator=generator)]
        point: dict = {"length": length}
        for name, model in models.items():
            try:
                point[name] = measure(model, context, args.decode_tokens)
            except (torch.OutOfMemoryError, MemoryError) as err:
                point[name] = {"skipped": str(err).splitlines()[0] if str(err) else type(err).__name__}
            print(f"  L={length:>6} {name:<7} {json.dumps(point[name])}", flush=True)
        for name in ("ssm", "hybrid", *plans):
            ours, theirs = point[name], point["teacher"]
            if "skipped" not in ours and "skipped" not in theirs:
                point[f"{name}_decode_speedup"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
                point[f"{name}_prefill_speedup"] = theirs["prefill_s"] / ours["prefill_s"]
                point[f"{name}_state_ratio"] = ours["state_bytes"] / theirs["state_bytes"]
                if ours["peak_memory_bytes"] and theirs["peak_memory_bytes"]:
                    point[f"{name}_memory_ratio"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        static = point.get("teacher_static", {})
        if "decode_tokens_per_s" in static and "decode_tokens_per_s" in point["ssm"]:
            point["ssm_decode_speedup_vs_static"] = (
                point["ssm"]["decode_tokens_per_s"] / static["decode_tokens_per_s"]
            )
        points.append(point)
    seconds = time.perf_counter() - started

    def cell(point: dict, name: str, key: str, fmt: str) -> str:
        value = point[name].get(key)
        return format(value, fmt) if value is not None else "skipped"

    print(
        f"\ndecode tokens/s (batch 1) and speedup over the teacher; load average at the end "
        f"{os.getloadavg()[0]:.2f}, {seconds / 60:.1f} min"
    )
    header = (
        f"{'context':>7} | {'teacher':>8} | {'pure SSM':>8} | {'hybrid':>8} | {'SSM/teacher':>11} | "
        f"{'hybrid/teacher':>14}"
    )
    print(header)
    print("-" * len(header))
    for p in points:
        print(
            f"{p['length']:>7} | {cell(p, 'teacher', 'decode_tokens_per_s', '8.2f')} | "
            f"{cell(p, 'ssm', 'decode_tokens_per_s', '8.2f')} | {cell(p, 'hybrid', 'decode_tokens_per_s', '8.2f')} | "
            f"{p.get('ssm_decode_speedup', float('nan')):>10.2f}x | {p.get('hybrid_decode_speedup', float('nan')):>13.2f}x"
        )
    if plans:
        print("\nstudents of --plan: decode tokens/s, speedup and decoding state over the teacher's")
        for p in points:
            for name in plans:
                print(
                    f"{p['length']:>7} | {name:<12} | {cell(p, name, 'decode_tokens_per_s', '8.2f')} tok/s | "
                    f"{p.get(f'{name}_decode_speedup', float('nan')):.2f}x | state "
                    f"{mib(p[name].get('state_bytes'))} MiB, {p.get(f'{name}_state_ratio', float('nan')):.3f}x"
                )
    if args.static_teacher:
        print("\nteacher with a StaticCache: decode tokens/s, and the pure SSM's speedup over it")
        for p in points:
            print(
                f"{p['length']:>7} | {cell(p, 'teacher_static', 'decode_tokens_per_s', '8.2f')} | "
                f"SSM/static teacher {p.get('ssm_decode_speedup_vs_static', float('nan')):.2f}x"
            )
    print("\nprefill seconds (one forward over the context)")
    for p in points:
        print(f"{p['length']:>7} | " + " | ".join(f"{n} {cell(p, n, 'prefill_s', '8.2f')}" for n in models))
    print("\ndecoding state (exact cache bytes after the prefill), MiB; ratio to the teacher")
    for p in points:
        print(
            f"{p['length']:>7} | "
            + " | ".join(f"{n} {mib(p[n].get('state_bytes')):>7}" for n in models)
            + f" | SSM/teacher {p.get('ssm_state_ratio', float('nan')):.4f} | hybrid/teacher "
            f"{p.get('hybrid_state_ratio', float('nan')):.3f}"
        )
    print(f"\npeak memory above the loaded weights, MiB ({MEMORY['cpu']})")
    for p in points:
        print(
            f"{p['length']:>7} | "
            + " | ".join(f"{n} {mib(p[n].get('peak_memory_bytes')):>7}" for n in models)
        )
    ssm_states = {p["ssm"].get("state_bytes") for p in points}
    teacher_states = [p["teacher"].get("state_bytes") for p in points]
    constant = len(ssm_states) == 1 and None not in ssm_states
    grows = all(a is not None and b is not None and b > a for a, b in zip(teacher_states, teacher_states[1:]))
    print(
        f"\npure-SSM decoding state constant across contexts: {'yes' if constant else 'NO'}; "
        f"teacher's KV cache grows with the context: {'yes' if grows else 'NO'}"
    )
    at_8k = next((p for p in points if p["length"] == 8192), None)
    if at_8k is not None and "ssm_decode_speedup" in at_8k:
        met = at_8k["ssm_decode_speedup"] >= 2.0
        print(
            f"target (pure SSM >= 2x the teacher's decode tokens/s at 8k): "
            f"{at_8k['ssm_decode_speedup']:.2f}x, {'met' if met else 'MISSED'}"
        )
    if args.profile:
        context = pool[torch.randint(len(pool), (1, args.profile), generator=generator)]
        for name in ("teacher", "ssm"):
            print(f"\nprofile: {LABELS[name]}, {args.decode_tokens} decode steps after {args.profile} tokens")
            print(profile_decode(models[name], context, args.decode_tokens, rows=15))
    if args.json:
        result = {
            "teacher": str(teacher_dir),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "decode_tokens": args.decode_tokens,
            "max_position_embeddings": limit,
            "memory": MEMORY["cpu"],
            "seconds": seconds,
            "plans": {name: models[name].config.ssmify["mixer"] for name in plans},
            "points": points,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
