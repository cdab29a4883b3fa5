"""Runs inside the llama.cpp venv (llama-cpp-python, not ssmify): greedy generation with per-token logprobs.

`python llamacpp_runner.py REQUEST.json RESULT.json`. The request: {"model": a GGUF file, "prompts": [[token
ids]], "new_tokens": n, "max_model_len": n, "threads": n}. The result has the layout of vllm_runner.py's:
{"versions", "seconds", "outputs": [{"tokens", "logprobs", "prompt_logprobs"}]}. Logprobs are the
log-softmax of llama.cpp's own logits (`logits_all`), over the whole vocabulary it holds. The KV cache is
float32, like the GGUF. This file imports
nothing from ssmify, which is not installed in that venv.
"""

import json
import sys
import time

import numpy as np


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def main(request_path: str, result_path: str) -> None:
    import llama_cpp
    from llama_cpp import Llama

    request = json.loads(open(request_path).read())
    start = time.monotonic()
    llm = Llama(
        model_path=request["model"],
        n_ctx=request["max_model_len"],
        n_threads=request["threads"],
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,  # the KV cache is float16 by default: about 1e-2 off in logprobs
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
        seed=0,
    )
    outputs = []
    for prompt in request["prompts"]:
        llm.reset()  # n_tokens = 0: the next eval clears the whole sequence, recurrent state included
        llm.eval(prompt)
        prompt_logprobs = log_softmax(np.asarray(llm.scores[: len(prompt)]))
        tokens, logprobs = [], []
        for _ in range(request["new_tokens"]):
            row = log_softmax(np.asarray(llm.scores[llm.n_tokens - 1]))
            token = int(row.argmax())
            tokens.append(token)
            logprobs.append(float(row[token]))
            llm.eval([token])
        outputs.append(
            {
                "tokens": tokens,
                "logprobs": logprobs,
                "prompt_logprobs": [float(prompt_logprobs[i, t]) for i, t in enumerate(prompt[1:])],
            }
        )
    result = {
        "versions": {"llama-cpp-python": llama_cpp.__version__},
        "architecture": llm.metadata.get("general.architecture"),
        "rope": llm.metadata.get(f"{llm.metadata.get('general.architecture')}.rope.scaling.finetuned"),
        "seconds": time.monotonic() - start,
        "outputs": outputs,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
