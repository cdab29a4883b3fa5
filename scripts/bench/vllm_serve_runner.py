"""Runs inside the vLLM venv (ssmify's `make engines`): times one model at the batch sizes and prompt lengths asked.

`python vllm_serve_runner.py REQUEST.json RESULT.json`. Request: {"model", "batches": [..], "lengths": [..],
"new_tokens", "repeats", "vocab_size"}. After one untimed warm-up generate, for each (batch, length): random
prompts of ordinary tokens, then `generate` with max_tokens=1 (time to first token: the prefill of the
whole batch) and with max_tokens=new_tokens, each the fastest of `repeats` runs; decode tokens/s = batch *
(new_tokens - 1) / (the difference). Also what vLLM reserved for its KV/state cache (blocks x block size).
Settings: ssmify's engine check's (`start_engine` in ssmify/export/engines/vllm_runner.py).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ssmify" / "export" / "engines"))
from vllm_runner import start_engine  # noqa: E402  (ssmify is not installed in the vLLM venv)


def timed(llm, prompts: list[dict], params) -> float:
    """Seconds for one `generate` of the whole batch."""
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main(request_path: str, result_path: str) -> None:
    import os
    import random

    # The engine in this process: a multiprocess engine gives up on a step that runs past its RPC timeout,
    # which a batch-16 4k prefill on a loaded 2-core machine does.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    import vllm
    from vllm import SamplingParams

    request = json.loads(open(request_path).read())
    start = time.monotonic()
    llm = start_engine(
        request["model"],
        4,
        max_model_len=max(request["lengths"]) + request["new_tokens"],
        max_num_seqs=max(request["batches"]),
        max_num_batched_tokens=max(request["lengths"]),  # prefill in chunks: no step runs for minutes
    )
    startup = time.monotonic() - start
    warmup = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": [10] * 16}], warmup, use_tqdm=False)  # first-call costs, untimed
    rng = random.Random(0)
    rows = []
    for length in request["lengths"]:
        for batch in request["batches"]:
            prompts = [
                {"prompt_token_ids": [rng.randrange(10, request["vocab_size"]) for _ in range(length)]}
                for _ in range(batch)
            ]
            timing = {}
            for new in (1, request["new_tokens"]):
                params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
                timing[new] = min(timed(llm, prompts, params) for _ in range(request["repeats"]))
            decode = timing[request["new_tokens"]] - timing[1]
            rows.append(
                {
                    "batch": batch,
                    "length": length,
                    "ttft_s": timing[1],
                    "total_s": timing[request["new_tokens"]],
                    "decode_tok_s": batch * (request["new_tokens"] - 1) / decode,
                    "output_tok_s": batch * request["new_tokens"] / timing[request["new_tokens"]],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    cache = llm.llm_engine.vllm_config.cache_config
    result = {
        "vllm": vllm.__version__,
        "startup_s": startup,
        "block_size": cache.block_size,
        "num_blocks": cache.num_gpu_blocks,
        "rows": rows,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
