"""Forward+backward time and peak memory of the SSD scan against a sequential scan, the Gated DeltaNet
chunked delta rule and SDPA attention.

At SmolLM2-135M's sizes (9 heads of 64, d_state 64 as seeding sets it; GDN: 9 heads, 64 x 64 state),
batch 1, on CPU. Each
(method, length) runs in a fresh process, so its peak RSS is its own (the growth of ru_maxrss
during the measurement). Times are medians; the ratios
are measured side by side in one run.

    python scripts/bench/mixer.py            # L = 512 ... 8192
    python scripts/bench/mixer.py --quick    # tiny lengths: a smoke test
    python scripts/bench/mixer.py --peers    # ssmify's Mamba-2 scan vs transformers' PyTorch Mamba-2 scan

--peers compares like with like: both take the raw x, dt, B, C of a Mamba-2 layer at SmolLM2's
mixer shape (9 heads x 64, n_groups 9, d_state 64, chunk 64) and do the same work (dt = softplus(dt +
dt_bias), the chunked scan, the D skip): ssmify's as `Mamba2.scan` does it (`ssd_chunked`), and
transformers' `mamba2_chunk_scan` (the PyTorch path `Mamba2Mixer` falls back to without mamba_ssm).
Forward alone (no_grad) and forward + backward (gradients to x, dt, B and C) are both timed.
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
    if method.startswith("mamba2_"):
        x = torch.randn(1, length, HEADS, HEAD_DIM, generator=g, requires_grad=True)
        dt = (torch.randn(1, length, HEADS, generator=g) - 2).requires_grad_()
        B, C = (torch.randn(1, length, HEADS, D_STATE, generator=g).div(8).requires_grad_() for _ in range(2))
        return [x, dt, B, C]
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


def _mamba2_scans(torch):
    """ssmify's and transformers' Mamba-2 scans on raw (x, dt, B, C), with the same A, D and dt_bias."""
    import torch.nn.functional as F
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from ssmify.mixers.ssd import ssd_chunked

    g = torch.Generator().manual_seed(1)
    A = -torch.exp(torch.rand(HEADS, generator=g) * 2)
    D, dt_bias = torch.ones(HEADS), torch.rand(HEADS, generator=g) - 1

    def ssmify_scan(x, dt, B, C):
        dt = F.softplus(dt + dt_bias)
        y, _ = ssd_chunked(x * dt[..., None], dt * A, B, C, chunk_size=64)
        return y + x * D[:, None]

    def transformers_scan(x, dt, B, C):
        return mamba2_chunk_scan(x, dt, A, B, C, 64, D=D, dt_bias=dt_bias, dt_softplus=True)

    return {"mamba2_ssmify": ssmify_scan, "mamba2_transformers": transformers_scan}


def _run(method: str, length: int, repeats: int, threads: int, queue) -> None:
    import torch

    from ssmify.mixers.gated_deltanet import delta_chunked, l2norm
    from ssmify.mixers.ssd import ssd_chunked, ssd_sequential

    torch.set_num_threads(threads)
    inputs = _inputs(method, length, torch)
    fn = {
        **_mamba2_scans(torch),
        "chunked": lambda x, a, B, C: ssd_chunked(x, a, B, C, chunk_size=64)[0],
        "sequential": lambda x, a, B, C: ssd_sequential(x, a, B, C)[0],
        "gated_deltanet": lambda q, k, v, g, beta: delta_chunked(
            l2norm(q) / HEAD_DIM**0.5, l2norm(k), v, g, beta, chunk_size=64
        )[0],
        "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }[method]
    forward = []
    if method.startswith("mamba2_"):
        with torch.no_grad():
            for _ in range(repeats + 1):
                start = time.perf_counter()
                fn(*inputs)
                forward.append(time.perf_counter() - start)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        fn(*inputs).square().sum().backward()
        times.append(time.perf_counter() - start)
        for t in inputs:
            t.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    result = {"seconds": statistics.median(times[1:]), "peak_mib": peak / 1024}
    if forward:
        result["forward_seconds"] = statistics.median(forward[1:])
    queue.put(result)


def measure(method: str, length: int, repeats: int, threads: int) -> dict:
    # Each measurement forks from a server process that imported torch and the scan once (and ran
    # nothing, so no thread pool is forked): a fresh process per point without paying the imports again.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "ssmify.mixers.ssd",
            "ssmify.mixers.gated_deltanet",
            "transformers.models.mamba2.modeling_mamba2",
        ]
    )
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
    parser.add_argument("--peers", action="store_true", help="ssmify's vs transformers' Mamba-2 scan")
    parser.add_argument("--rounds", type=int, default=3, help="--peers: alternating rounds per length")
    args = parser.parse_args()
    lengths, repeats = ([64, 128], 1) if args.quick else (args.lengths, args.repeats)

    import torch

    if args.peers:
        peers(lengths, repeats, 1 if args.quick else args.rounds, args.threads, args.json)
        return

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


def peers(lengths: list[int], repeats: int, rounds: int, threads: int, json_path: str | None) -> None:
    """The --peers table: the two Mamba-2 scans, measured alternately at each length."""
    import os

    print(
        f"ssmify vs transformers Mamba-2 scan (raw x, dt, B, C; softplus dt, chunked scan, D skip), batch 1, "
        f"{HEADS}x{HEAD_DIM} heads, n_groups {HEADS}, d_state {D_STATE}, chunk 64, {threads} threads, "
        f"median of {repeats} after a warm-up, median of {rounds} alternating rounds, load average {os.getloadavg()[0]:.2f} at the start"
    )
    header = (
        f"{'L':>6} | {'ssmify fwd s':>12} | {'hf fwd s':>9} | {'hf/ssmify fwd':>13} | {'ssmify f+b s':>12} | "
        f"{'hf f+b s':>9} | {'hf/ssmify f+b':>13} | {'ssmify MiB':>10} | {'hf MiB':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for length in lengths:
        # Alternate the two, one fresh process each, `rounds` times: a load spike on the shared machine
        # then hits one round of one side, and the median of the rounds leaves it out.
        runs: dict[str, list[dict]] = {"mamba2_ssmify": [], "mamba2_transformers": []}
        for _ in range(rounds):
            for method, results in runs.items():
                results.append(measure(method, length, repeats, threads))
        ours, theirs = (
            {key: statistics.median(r[key] for r in results) for key in results[0]}
            for results in runs.values()
        )
        row = {"length": length, "ssmify": ours, "transformers": theirs}
        row["forward_ratio"] = theirs["forward_seconds"] / ours["forward_seconds"]
        row["forward_backward_ratio"] = theirs["seconds"] / ours["seconds"]
        rows.append(row)
        print(
            f"{length:>6} | {ours['forward_seconds']:>12.3f} | {theirs['forward_seconds']:>9.3f} | "
            f"{row['forward_ratio']:>12.2f}x | {ours['seconds']:>12.3f} | {theirs['seconds']:>9.3f} | "
            f"{row['forward_backward_ratio']:>12.2f}x | {ours['peak_mib']:>10.0f} | {theirs['peak_mib']:>7.0f}",
            flush=True,
        )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
