"""Forward+backward time and peak memory of the SSD scan against a sequential scan, the Gated DeltaNet
chunked delta rule and SDPA attention.

At SmolLM2-135M's sizes (9 heads of 64, d_state 64 as seeding sets it; GDN: 9 heads, 64 x 64 state),
batch 1, on CPU. Each
(method, length) runs in a fresh process, so its peak RSS is its own (the growth of ru_maxrss
during the measurement). Times are medians; the ratios
are measured side by side in one run.

    python scripts/bench/mixer.py            # L = 512 ... 8192
    python scripts/bench/mixer.py --quick    # tiny lengths: a smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

HEADS, HEAD_DIM, D_STATE = 9, 64, 64


def _inputs(method: str, length: int, torch):
    g = torch.Generator().manual_seed(0)
    if method == "sdpa":
        return [torch.randn(1, HEADS, length, HEAD_DIM, generator=g, requires_grad=True) for _ in range(3)]
    if method == "gated_deltanet":
        q, k, v = (torch.randn(1, length, HEADS, HEAD_DIM, generator=g, requires_grad=True) for _ in range(3))
        log_decay = (-torch.rand(1, length, HEADS, generator=g) * 0.1).requires_grad_()
        beta = torch.rand(1, length, HEADS, generator=g).requires_grad_()
        return [q, k, v, log_decay, beta]
    x = torch.randn(1, length, HEADS, HEAD_DIM, generator=g, requires_grad=True)
    log_a = (-torch.rand(1, length, HEADS, generator=g) * 0.1).requires_grad_()
    B = torch.randn(1, length, HEADS, D_STATE, generator=g).div(8).requires_grad_()
    C = torch.randn(1, length, HEADS, D_STATE, generator=g).div(8).requires_grad_()
    return [x, log_a, B, C]


def _run(method: str, length: int, repeats: int, threads: int, queue) -> None:
    import torch

    from ssmify.mixers.gated_deltanet import delta_chunked, l2norm
    from ssmify.mixers.ssd import ssd_chunked, ssd_sequential

    torch.set_num_threads(threads)
    inputs = _inputs(method, length, torch)
    fn = {
        "chunked": lambda x, a, B, C: ssd_chunked(x, a, B, C, chunk_size=64)[0],
        "sequential": lambda x, a, B, C: ssd_sequential(x, a, B, C)[0],
        "gated_deltanet": lambda q, k, v, g, beta: delta_chunked(
            l2norm(q) / HEAD_DIM**0.5, l2norm(k), v, g, beta, chunk_size=64
        )[0],
        "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }[method]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        fn(*inputs).square().sum().backward()
        times.append(time.perf_counter() - start)
        for t in inputs:
            t.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    queue.put({"seconds": statistics.median(times[1:]), "peak_mib": peak / 1024})


def measure(method: str, length: int, repeats: int, threads: int) -> dict:
    # Each measurement forks from a server process that imported torch and the scan once (and ran
    # nothing, so no thread pool is forked): a fresh process per point without paying the imports again.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ssmify.mixers.ssd", "ssmify.mixers.gated_deltanet"])
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, length, repeats, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny lengths, one repeat")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    lengths, repeats = ([64, 128], 1) if args.quick else (args.lengths, args.repeats)

    import torch

    print(
        f"SSD scan vs sequential scan vs Gated DeltaNet vs SDPA, forward+backward, batch 1, {HEADS}x{HEAD_DIM} heads, "
        f"d_state {D_STATE}, torch {torch.__version__}, {args.threads} threads"
    )
    header = (
        f"{'L':>6} | {'chunked s':>9} | {'sequential s':>12} | {'gdn s':>8} | {'sdpa s':>8} | "
        f"{'seq/chunked':>11} | {'gdn/chunked':>11} | {'sdpa/chunked':>12} | {'chunked MiB':>11} | "
        f"{'gdn MiB':>8} | {'sdpa MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for length in lengths:
        methods = ("chunked", "sequential", "gated_deltanet", "sdpa")
        r = {m: measure(m, length, repeats, args.threads) for m in methods}
        row = {"length": length, **{f"{m}_{k}": v[k] for m, v in r.items() for k in v}}
        row["sequential_over_chunked"] = r["sequential"]["seconds"] / r["chunked"]["seconds"]
        row["sdpa_over_chunked"] = r["sdpa"]["seconds"] / r["chunked"]["seconds"]
        row["gated_deltanet_over_chunked"] = r["gated_deltanet"]["seconds"] / r["chunked"]["seconds"]
        rows.append(row)
        print(
            f"{length:>6} | {r['chunked']['seconds']:>9.3f} | {r['sequential']['seconds']:>12.3f} | "
            f"{r['gated_deltanet']['seconds']:>8.3f} | {r['sdpa']['seconds']:>8.3f} | "
            f"{row['sequential_over_chunked']:>10.1f}x | {row['gated_deltanet_over_chunked']:>10.2f}x | "
            f"{row['sdpa_over_chunked']:>11.2f}x | {r['chunked']['peak_mib']:>11.0f} | "
            f"{r['gated_deltanet']['peak_mib']:>8.0f} | {r['sdpa']['peak_mib']:>8.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
