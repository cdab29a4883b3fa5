"""Compare what an engine generated with what the ssmify student computes on the same tokens.

The student reads each prompt followed by the engine's greedy tokens in one forward pass. Up to the
first token where they part, that is exactly the student's own greedy decoding, so:
- tokens: each engine token must be the student's argmax there. A token whose student logprob is within
  the tolerance of the argmax's is a tie, not a mismatch: the comparison stops there.
- logprobs: the engine's logprob of every prompt token (from the second) and of every generated token up
  to the stop must be the student's within the tolerance.
The student computes in float64 throughout (`Float64Throughout`), so the reference is the function
itself and not one float32 rounding of it: an untrained pure-SSM SmolLM2 (residual stream 1e4) in float32
is itself 5.8e-2 off its float64 logprobs at one position of a 700-token prompt, where llama.cpp is 2.5e-2
off. The tolerance is per engine compute dtype, relative to the student's largest |logit| (at least 1), as
in `ssmify.export.verify`. Both engines compute in float32 here (vLLM dtype float32, a float32 GGUF),
whatever the export's storage dtype.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.export.float64 import Float64Throughout, as_float64

TOLERANCE = {"float32": 1e-3}  # max |logprob difference| / max(1, largest |logit| of the student)


@torch.no_grad()
def compare(engine: str, student: PreTrainedModel, prompts: list[list[int]], result: dict) -> dict:
    """A report of the engine's `result` against `student` (float32, eval; run in float64 here and put back);
    one-line SsmifyError on a mismatch."""
    per_prompt = []
    for index, (prompt, output) in enumerate(zip(prompts, result["outputs"])):
        ids = torch.tensor([prompt + output["tokens"]], device=student.device)
        with as_float64(student), Float64Throughout():
            logits = student(ids, use_cache=False).logits[0]
        limit = TOLERANCE["float32"] * max(1.0, logits.abs().max().item())
        logprobs = torch.log_softmax(logits, dim=-1)
        per_prompt.append(_one_prompt(engine, index, prompt, output, logprobs, limit))
    for index, entry in enumerate(per_prompt):
        where, limit = f"{engine}: prompt {index} ({entry['length']} tokens)", entry["limit"]
        if entry["mismatch"] is not None:
            position, engine_token, student_token = entry["mismatch"]
            raise SsmifyError(
                f"{where}: the greedy tokens differ first at generated position {position} (absolute "
                f"{entry['length'] + position}): {engine} {engine_token}, ssmify {student_token}"
            )
        for part in ("prompt", "generated"):
            diff, position = entry[f"{part}_logprob_diff"]
            if not diff <= limit:
                raise SsmifyError(
                    f"{where}: the logprob of the {part} token at position {position} differs by {diff:.2e} "
                    f"(limit {limit:.1e})"
                )
    return {
        "compute_dtype": "float32",
        "prompts": [
            {
                "length": e["length"],
                "logprob_limit": e["limit"],
                "tokens_matched": f"{e['matched']}/{len(e['tokens'])}",
                "tie_at": e["tie_at"],
                "max_prompt_logprob_diff": e["prompt_logprob_diff"][0],
                "max_generated_logprob_diff": e["generated_logprob_diff"][0],
                "tokens": e["tokens"],
            }
            for e in per_prompt
        ],
    }


def _one_prompt(
    engine: str, index: int, prompt: list[int], output: dict, logprobs: torch.Tensor, limit: float
) -> dict:
    """Tokens matched, the first mismatch or tie, and the largest logprob differences with their positions."""
    n, tokens = len(prompt), output["tokens"]
    if len(output["prompt_logprobs"]) != n - 1 or len(output["logprobs"]) != len(tokens):
        raise SsmifyError(f"{engine}: prompt {index}: the engine returned logprobs of another length")
    ids = torch.tensor(prompt + tokens)
    student_prompt = logprobs[torch.arange(n - 1), ids[1:n]]
    matched, tie_at, mismatch = 0, None, None
    for j, token in enumerate(tokens):
        row = logprobs[n - 1 + j]
        best = int(row.argmax())
        if token != best:
            if row[best] - row[token] <= limit:
                tie_at = j
            else:
                mismatch = (j, token, best)
            break
        matched += 1
    student_generated = logprobs[torch.arange(n - 1, n - 1 + matched), ids[n : n + matched]]
    return {
        "length": n,
        "limit": limit,
        "tokens": tokens,
        "matched": matched,
        "tie_at": tie_at,
        "mismatch": mismatch,
        "prompt_logprob_diff": _max_diff(student_prompt, output["prompt_logprobs"], first=1),
        "generated_logprob_diff": _max_diff(student_generated, output["logprobs"][:matched], first=n),
    }


def _max_diff(student: torch.Tensor, engine: list[float], first: int) -> tuple[float, int | None]:
    """(max |difference|, the absolute token position where it is); (0.0, None) for nothing to compare."""
    if not engine:
        return 0.0, None
    diff = (student - torch.tensor(engine, dtype=torch.float64)).abs()
    worst = int(diff.argmax())
    return diff[worst].item(), first + worst
