"""Runs inside the llama.cpp venv (ssmify's `make engines`): times GGUFs side by side at batch 1.

`python llamacpp_serve_runner.py REQUEST.json RESULT.json`. Request: {"models": {name: GGUF file},
"lengths": [..], "new_tokens", "repeats", "vocab_size", "threads", "kv_type": "f32" or "f16"}. All models
are loaded in this one process and timed in turns (each repeat: each length, each model), so that the
load of a shared machine falls on them alike. After one untimed warm-up each, for each length: a random
prompt of ordinary tokens (the same for every model); time to first token = the prompt's evaluation plus
the first greedy sample; decode tokens/s = (new_tokens - 1) / the time of the remaining tokens, each one
evaluation and one greedy sample. Each timing is the fastest of `repeats` runs, each from an empty
context (the recurrent state and KV cache cleared). This file imports nothing from ssmify.

Weights are loaded without llama.cpp's extra buffer types (`use_extra_bufts = false`, llama-cli's
`--no-repack`): on this machine's CPU (AMX) llama.cpp repacks Q8_0 weights for AMX and then crashes
(SIGSEGV in the first evaluation, in this VM); the plain CPU kernels run.
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


def without_repacking() -> None:
    """Make every model load with use_extra_bufts = false (Llama() has no argument for it)."""
    import llama_cpp.llama_cpp as low  # the module Llama() takes its default model parameters from

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


def main(request_path: str, result_path: str) -> None:
    import llama_cpp

    without_repacking()
    from llama_cpp import Llama

    request = json.loads(open(request_path).read())
    kv_type = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}[request["kv_type"]]
    models = {
        name: Llama(
            model_path=path,
            n_ctx=max(request["lengths"]) + request["new_tokens"],
            n_threads=request["threads"],
            n_threads_batch=request["threads"],
            type_k=kv_type,
            type_v=kv_type,
            verbose=False,
            seed=0,
        )
        for name, path in request["models"].items()
    }
    for llm in models.values():
        one_run(llm, [10] * 16, 2)  # first-call costs, untimed
    rng = random.Random(0)
    prompts = {n: [rng.randrange(10, request["vocab_size"]) for _ in range(n)] for n in request["lengths"]}
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(request["repeats"]):
        for length, prompt in prompts.items():
            for name, llm in models.items():
                runs.setdefault((name, length), []).append(one_run(llm, prompt, request["new_tokens"]))
                print(name, length, runs[name, length][-1], flush=True)
    result = {"llama-cpp-python": llama_cpp.__version__, "kv_type": request["kv_type"], "models": {}}
    for name, llm in models.items():
        rows = []
        for length in request["lengths"]:
            ttft = min(r[0] for r in runs[name, length])
            decode = min(r[1] for r in runs[name, length])
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
        # the context's state after the longest prompt's last run: KV cache, recurrent states, logits
        result["models"][name] = {"state_bytes": llama_cpp.llama_state_get_size(llm.ctx), "rows": rows}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
