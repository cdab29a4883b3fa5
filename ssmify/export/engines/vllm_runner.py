"""Runs inside the vLLM venv (not ssmify's): greedy generation with per-token logprobs, JSON in, JSON out.

`python vllm_runner.py REQUEST.json RESULT.json`. The request: {"model": export folder, "prompts": [[token
ids]], "new_tokens": n, "max_model_len": n}. The result: {"versions", "block_size", "seconds",
"outputs": [{"tokens", "logprobs", "prompt_logprobs"}]}, where prompt_logprobs[i] is the logprob of prompt
token i + 1. Settings from DESIGN.md: float32, eager, no prefix caching (a batch holding a prompt longer
than a Mamba chunk crashed with it on), token ids in and out (tiny exports have no tokenizer). This file
imports nothing from ssmify, which is not installed in that venv.
"""

import json
import os
import sys
import time

SETTINGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "enable_prefix_caching": False,
    "skip_tokenizer_init": True,
    "seed": 0,
}


def start_engine(model: str, kvcache_gib: int, **sizes):
    """vLLM on `model` with ssmify's settings (this check's, and the serving benchmark's and profile's, which
    import this file by path): SETTINGS, `kvcache_gib` GiB of KV/state cache and no thread pinning, both
    unless the environment says otherwise, and `sizes` (max_model_len, max_num_seqs, ...)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM

    return LLM(model=model, **SETTINGS, **sizes)


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path).read())
    start = time.monotonic()
    llm = start_engine(
        request["model"], 1, max_model_len=request["max_model_len"], max_num_seqs=len(request["prompts"])
    )
    import torch
    import transformers
    import vllm
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=request["new_tokens"],
        ignore_eos=True,
        logprobs=1,
        prompt_logprobs=1,
        detokenize=False,
    )
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    outputs = []
    for result in llm.generate(prompts, params, use_tqdm=False):
        ids, done = result.prompt_token_ids, result.outputs[0]
        outputs.append(
            {
                "tokens": list(done.token_ids),
                "logprobs": [step[token].logprob for step, token in zip(done.logprobs, done.token_ids)],
                "prompt_logprobs": [
                    step[token].logprob for step, token in zip(result.prompt_logprobs[1:], ids[1:])
                ],
            }
        )
    config = llm.llm_engine.vllm_config
    result = {
        "versions": {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "architecture": config.model_config.architectures[0],
        "block_size": config.cache_config.block_size,
        "seconds": time.monotonic() - start,
        "outputs": outputs,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
