"""Synthetic associative recall: can the model fetch the value bound to a key seen far back in the context?

A sample of L tokens is `[BOS] k1 v1 , k2 v2 , ... kn vn , q1 a1 , ... qm am ,`: n key-value pairs fill
the context, then m of the keys are asked again, each followed by its value (multi-query recall, as in
Zoology's MQAR). Keys are distinct; keys and values come from disjoint halves of the model's ordinary
vocabulary (no special or added tokens), so a value can never be mistaken for a key. A query is right
when the argmax of the next-token logits at the query key is its value. Chance is 1 / (value pool size).

The separator (the tokenizer's "," when that is one token) marks where a pair ends. Without it a
pretrained LM cannot tell pairs apart: SmolLM2-135M scores 0% on 40 unseparated pairs and about 50%
with commas, so the task would measure nothing.

Attention solves this by looking the key up; a fixed-size recurrent state must have compressed every
pair into memory, which is where SSMs are known to fall short as the context grows.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.convert import lookup
from ssmify.convert.lookup import LookupSample, RecallFormat, kv_sample, lookup_scores, separator, split_pools
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import add_retention, length_limit
from ssmify.eval.scan import vocab_size

log = logging.getLogger(__name__)


def ordinary_tokens(tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> torch.Tensor:
    """Ids that decode to ordinary text: inside both the tokenizer and the logits, not special, not added."""
    config = model.config
    special = {getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return lookup.ordinary_tokens(tokenizer, vocab_size(model), special)


def accuracy(model: PreTrainedModel, samples: list[LookupSample], desc: str, progress: bool) -> float:
    """The share of queries whose next-token argmax is the right value."""
    correct = total = 0
    for sample in tqdm(samples, desc=desc, unit="seq", disable=not progress):
        right, scored, _ = lookup_scores(model, [sample])
        correct, total = correct + right, total + scored
    return correct / total


def recall(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Accuracy against context length for the student (and the teacher, on the very same samples).

    Returns {"points": [{"length", "pairs", "queries", "accuracy", "teacher_accuracy", "retention",
    "meaningful"}], "skipped":
    [{"length", "reason"}], "samples", "queries_per_sample", "chance", "separated"}.
    """
    options = options or EvalOptions()
    tokenizer = data.tokenizer if data is not None else None
    generator = torch.Generator().manual_seed(options.seed)
    bos_id = tokenizer.bos_token_id if tokenizer is not None else getattr(model.config, "bos_token_id", None)
    form = RecallFormat(bos_id, separator(tokenizer))
    tokens = ordinary_tokens(tokenizer, model)
    if form.separator_id is not None:
        tokens = tokens[tokens != form.separator_id]
    keys, values = split_pools(tokens, generator)
    limit = length_limit(model, teacher)
    result = {
        "points": [],
        "skipped": [],
        "samples": options.samples,
        "queries_per_sample": options.recall_queries,
        "chance": 1 / max(len(values), 1),
        "separated": form.separator_id is not None,
    }
    for length in options.lengths:
        pairs = form.pair_count(length, options.recall_queries)
        reason = None
        if limit is not None and length > limit:
            reason = f"beyond max_position_embeddings={limit}"
        elif pairs < options.recall_queries:
            reason = f"too short for {options.recall_queries} queries"
        elif pairs > len(keys):
            reason = f"needs {pairs} distinct keys; the vocabulary offers {len(keys)}"
        if reason:
            log.info("recall: skipping length %d: %s", length, reason)
            result["skipped"].append({"length": length, "reason": reason})
            continue
        samples = [
            kv_sample(length, options.recall_queries, keys, values, form, generator)
            for _ in range(options.samples)
        ]
        point = {
            "length": length,
            "pairs": pairs,
            "queries": options.samples * options.recall_queries,
            "accuracy": accuracy(model, samples, f"recall {length} student", options.progress),
        }
        if teacher is not None:
            point["teacher_accuracy"] = accuracy(
                teacher, samples, f"recall {length} teacher", options.progress
            )
        log.info("recall at %d: %s", length, add_retention(point))
        result["points"].append(point)
    return result
