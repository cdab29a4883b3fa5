"""Runs inside the vLLM venv (ssmify's `make engines`): times one model at the batch sizes and prompt lengths asked.

`python vllm_serve_runner.py REQUEST.json RESULT.json`. Request: {"model", "batches": [..], "lengths": [..],
"new_tokens", "repeats", "vocab_size"}. After one untimed warm-up generate, for each (batch, length): random
prompts of ordinary tokens, all added to the engine at once, then the engine stepped by hand with the clock
read after every step. Time to first token: until every prompt of the batch has its first token (the
prefill of the whole batch, in chunks). Decode tokens/s: batch * (new_tokens - 1) over the time from then
until the last request finishes, so it is timed in the same run and cannot go negative when the load
moves. Each figure is from the run with the shortest total of `repeats` runs. Also what vLLM reserved for
its KV/state cache (blocks x block size).
Settings: ssmify's engine check's (`start_engine` in ssmify/export/engines/vllm_runner.py).
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ssmify" / "export" / "engines"))
from vllm_runner import start_engine  # noqa: E402  (ssmify is not installed in the vLLM venv)


def timed(llm, prompts: list[dict], params) -> dict:
    """One batch through the engine, stepped by hand: seconds to the batch's first tokens, and from there
    to its last token (every request generates exactly `params.max_tokens`, `ignore_eos`)."""
    engine = llm.llm_engine
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params)
    started: set[str] = set()
    first = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        started.update(out.request_id for out in outputs if out.outputs and out.outputs[0].token_ids)
        if first is None and len(started) == len(prompts):
            first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError("vLLM finished the batch without a first token for every request")
    return {"ttft_s": first - start, "decode_s": end - first, "total_s": end - start}


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
            new = request["new_tokens"]
            params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
            timing = min(
                (timed(llm, prompts, params) for _ in range(request["repeats"])), key=lambda t: t["total_s"]
            )
            rows.append(
                {
                    "batch": batch,
                    "length": length,
                    **timing,
                    "decode_tok_s": batch * (new - 1) / timing["decode_s"],
                    "output_tok_s": batch * new / timing["total_s"],
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
