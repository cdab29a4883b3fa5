"""In-context retrieval that the teacher passes: induction and passkey, and retention against the teacher.

Perplexity hides lost retrieval: a student can match its teacher's perplexity and still fail to look
up what it was told earlier in the context ("When Perplexity Lies", 2026: 0.2 points behind by
log-likelihood, 20.8 behind when generating). These tasks measure that lookup directly, on the
samples of `ssmify.convert.lookup`, the same samples for student and teacher at each length:

- `induction`: a planted run of random words, repeated at the end; accuracy is the share of the
  second copy's tokens predicted exactly (greedy argmax, each given the true tokens before it).
- `passkey`: a 5-digit passkey hidden in filler, asked at the end; a sample is right when the greedy
  *generated* continuation's first number is the passkey (exact match, not log-likelihood).
- `recall` (`ssmify.eval.recall`): multi-query key-value recall.

Retention is student accuracy / teacher accuracy. It means something only where the teacher passes,
so a point whose teacher accuracy is below `MEANINGFUL` (0.5) is reported and flagged, and left out of
the overall retention: the summed student accuracy over the summed teacher accuracy of the
meaningful points (per length, and over all lengths).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ssmify.convert.lookup import (
    INDUCTION_RUN,
    LookupSample,
    PasskeySample,
    filler_tokens,
    induction_sample,
    lookup_scores,
    passkey_overhead,
    passkey_sample,
    require_tokenizer,
    word_tokens,
)
from ssmify.errors import SsmifyError
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.scan import max_positions, vocab_size

log = logging.getLogger(__name__)

MEANINGFUL = 0.5  # teacher accuracy below which retention is not reported as meaningful
RETRIEVAL_TASKS = ("induction", "passkey", "recall")


def length_limit(model: PreTrainedModel, teacher: PreTrainedModel | None) -> int | None:
    """The longest context both models declare, if they declare one."""
    declared = [max_positions(m) for m in (model, teacher) if m is not None]
    return min((n for n in declared if n is not None), default=None)


def add_retention(point: dict) -> dict:
    """Add retention (student / teacher accuracy) and whether it is meaningful to a point with a teacher."""
    if "teacher_accuracy" not in point:
        return point
    teacher = point["teacher_accuracy"]
    point["retention"] = point["accuracy"] / teacher if teacher > 0 else None
    point["meaningful"] = teacher >= MEANINGFUL
    return point


def against_teacher(results: dict, teacher: dict) -> dict:
    """Retrieval results scored without a teacher, given the teacher's accuracy and the retention at each
    point, from the teacher's own results on the same samples: {task: {"points": [...]}}."""
    merged = {}
    for task in RETRIEVAL_TASKS:
        if task in results and task in teacher:
            reference = {p["length"]: p["accuracy"] for p in teacher[task]["points"]}
            points = [{**p, "teacher_accuracy": reference[p["length"]]} for p in results[task]["points"]]
            merged[task] = {"points": [add_retention(p) for p in points]}
    return merged


def summarize(results: dict) -> dict | None:
    """Overall retention over the retrieval tasks in `results`: per length and over every length.

    Each is the summed student accuracy over the summed teacher accuracy of the points where the
    teacher passes (>= MEANINGFUL); None where no such point exists. Returns None without a teacher.
    """
    points = [
        (task, p)
        for task in RETRIEVAL_TASKS
        if task in results
        for p in results[task]["points"]
        if "retention" in p
    ]
    if not points:
        return None

    def ratio(chosen: list[dict]) -> float | None:
        teacher = sum(p["teacher_accuracy"] for p in chosen)
        return sum(p["accuracy"] for p in chosen) / teacher if chosen and teacher > 0 else None

    meaningful = [p for _, p in points if p["meaningful"]]
    lengths = sorted({p["length"] for _, p in points})
    return {
        "overall": ratio(meaningful),
        "by_length": {str(n): ratio([p for p in meaningful if p["length"] == n]) for n in lengths},
        "tasks": sorted({task for task, _ in points}),
        "not_meaningful": [
            {"task": task, "length": p["length"], "teacher_accuracy": p["teacher_accuracy"]}
            for task, p in points
            if not p["meaningful"]
        ],
    }


def _over_lengths(
    name: str,
    model: PreTrainedModel,
    teacher: PreTrainedModel | None,
    options: EvalOptions,
    make: Callable[[int, torch.Generator], object],
    score: Callable[[PreTrainedModel, list], tuple[int, int]],
    shortest: int,
) -> dict:
    """Run one task at every length: the same seeded samples for both models, honest skips."""
    generator = torch.Generator().manual_seed(options.seed)
    limit = length_limit(model, teacher)
    result: dict = {"points": [], "skipped": [], "samples": options.samples}
    for length in options.lengths:
        reason = None
        if limit is not None and length > limit:
            reason = f"beyond max_position_embeddings={limit}"
        elif length < shortest:
            reason = f"shorter than the {shortest} tokens a sample needs"
        if reason:
            log.info("%s: skipping length %d: %s", name, length, reason)
            result["skipped"].append({"length": length, "reason": reason})
            continue
        samples = [make(length, generator) for _ in range(options.samples)]
        point: dict = {"length": length}
        for prefix, scored in (("", model), ("teacher_", teacher)):
            if scored is not None:
                who = "teacher" if prefix else "student"
                bar = tqdm(samples, desc=f"{name} {length} {who}", unit="seq", disable=not options.progress)
                right, point["scored"] = score(scored, list(bar))
                point[prefix + "accuracy"] = right / point["scored"]
        log.info("%s at %d: %s", name, length, add_retention(point))
        result["points"].append(point)
    return result


def _filler(data: EvalData, options: EvalOptions) -> list[int]:
    tokenizer = data.tokenizer
    if options.filler == "builtin":
        return filler_tokens(tokenizer)
    if options.filler != "data":
        raise SsmifyError(f"--filler {options.filler!r}: choose builtin or data")
    if data.windows is None:
        raise SsmifyError("--filler data takes the haystack from --data: pass --data FILE")
    return data.windows.flatten().tolist()


def induction(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Induction accuracy against context length, student and teacher on the same samples.

    Returns {"points": [{"length", "accuracy", "teacher_accuracy", "retention", "meaningful", "scored"}],
    "skipped", "samples", "run"}; "scored" counts the predicted tokens at that length.
    """
    options = options or EvalOptions()
    tokenizer = require_tokenizer(data.tokenizer if data is not None else None, "induction")
    words = word_tokens(tokenizer, vocab_size(model), INDUCTION_RUN)
    filler = _filler(data, options)
    bos = tokenizer.bos_token_id

    def make(length: int, generator: torch.Generator) -> LookupSample:
        return induction_sample(length, words, filler, bos, generator)

    def score(scored: PreTrainedModel, samples: list[LookupSample]) -> tuple[int, int]:
        right, total, _ = lookup_scores(scored, samples)
        return right, total

    shortest = 2 * INDUCTION_RUN + int(bos is not None)
    return {
        **_over_lengths("induction", model, teacher, options, make, score, shortest),
        "run": INDUCTION_RUN,
    }


@torch.no_grad()
def generate_passkey(model: PreTrainedModel, sample: PasskeySample) -> torch.Tensor:
    """The greedy continuation of the prompt, two tokens longer than the passkey's."""
    prompt = sample.prompt_ids[None].to(model.device)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=len(sample.answer_ids) + 2,
        do_sample=False,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    return out[0, prompt.shape[1] :]


def passkey_answered(passkey: str, text: str) -> bool:
    """Whether the generated answer's first number is the passkey: `4211111` does not answer 42111.

    A substring test counts an answer that runs on past the key as right: a student that loops on a
    repeated digit writes `4211111`, which contains 42111.
    """
    first = re.search(r"\d+", text)
    return first is not None and first.group() == passkey


def passkey(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Passkey accuracy against context length, by greedy generation, student and teacher on the same samples.

    Returns {"points": [{"length", "accuracy", "teacher_accuracy", "retention", "meaningful", "scored"}],
    "skipped", "samples"}.
    """
    options = options or EvalOptions()
    tokenizer = require_tokenizer(data.tokenizer if data is not None else None, "passkey")
    filler = _filler(data, options)

    def make(length: int, generator: torch.Generator) -> PasskeySample:
        return passkey_sample(length, tokenizer, filler, generator)

    def score(scored: PreTrainedModel, samples: list[PasskeySample]) -> tuple[int, int]:
        texts = [tokenizer.decode(generate_passkey(scored, s), skip_special_tokens=True) for s in samples]
        return sum(passkey_answered(s.passkey, text) for s, text in zip(samples, texts)), len(samples)

    return _over_lengths("passkey", model, teacher, options, make, score, passkey_overhead(tokenizer) + 1)
