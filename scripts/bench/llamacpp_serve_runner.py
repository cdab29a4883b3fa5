"""Runs inside the llama.cpp venv (ssmify's `make engines`): times one GGUF at batch 1 and the prompt lengths asked.

`python llamacpp_serve_runner.py REQUEST.json RESULT.json`. Request: {"model": a GGUF file, "lengths": [..],
"new_tokens", "repeats", "vocab_size", "threads", "kv_type": "f32" or "f16"}. After one untimed warm-up,
for each length: a random prompt of ordinary tokens; time to first token = the prompt's evaluation plus
the first greedy sample; decode tokens/s = (new_tokens - 1) / the time of the remaining tokens, each
one evaluation and one greedy sample. Each timing is the fastest of `repeats` runs, each from an empty
context (the recurrent state and KV cache cleared). This file imports nothing from ssmify.
"""

import json
import random
import sys
import time


def one_run(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the other new_tokens - 1) from an empty context."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = llm.sample(top_k=1, temp=0.0)
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = llm.sample(top_k=1, temp=0.0)
    return first - start, time.perf_counter() - first


def main(request_path: str, result_path: str) -> None:
    import llama_cpp
    from llama_cpp import Llama

    request = json.loads(open(request_path).read())
    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[request["kv_type"]]
    start = time.monotonic()
    llm = Llama(
        model_path=request["model"],
        n_ctx=max(request["lengths"]) + request["new_tokens"],
        n_threads=request["threads"],
        n_threads_batch=request["threads"],
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
        seed=0,
    )
    startup = time.monotonic() - start
    one_run(llm, [10] * 16, 2)  # first-call costs, untimed
    rng = random.Random(0)
    rows = []
    for length in request["lengths"]:
        prompt = [rng.randrange(10, request["vocab_size"]) for _ in range(length)]
        runs = [one_run(llm, prompt, request["new_tokens"]) for _ in range(request["repeats"])]
        ttft, decode = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append(
            {
                "batch": 1,
                "length": length,
                "ttft_s": ttft,
                "total_s": ttft + decode,
                "decode_tok_s": (request["new_tokens"] - 1) / decode,
                "output_tok_s": request["new_tokens"] / (ttft + decode),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "llama-cpp-python": llama_cpp.__version__,
        "startup_s": startup,
        "kv_type": request["kv_type"],
        "state_bytes": llama_cpp.llama_state_get_size(llm.ctx),
        "rows": rows,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
