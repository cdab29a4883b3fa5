"""Synthetic associative recall: can the model fetch the value bound to a key seen far back in the context?

A sample of L tokens is `[BOS] k1 v1 k2 v2 ... kn vn q1 a1 q2 a2 ... qm am`: n key-value pairs fill the
context, then m of the keys are asked again, each followed by its value (multi-query recall, as in
Zoology's MQAR). Keys are distinct; keys and values come from disjoint halves of the model's ordinary
vocabulary (no special or added tokens), so a value can never be mistaken for a key. A query is right
when the argmax of the next-token logits at the query key is its value. Chance is 1 / (value pool size).

Attention solves this by looking the key up; a fixed-size recurrent state must have compressed every
pair into memory, which is where SSMs are known to fall short as the context grows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.scan import logits, vocab_size

log = logging.getLogger(__name__)


@dataclass
class RecallSample:
    """One sequence, the positions of its query keys, and the values expected after them."""

    input_ids: torch.Tensor  # (L,)
    query_positions: torch.Tensor  # (m,)
    answers: torch.Tensor  # (m,)


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest context the model's config declares, if it declares one."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def ordinary_tokens(tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> torch.Tensor:
    """Ids that decode to ordinary text: inside both the tokenizer and the logits, not special, not added."""
    config = model.config
    if tokenizer is None:
        size = vocab_size(model)
        special = {getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    else:
        size = min(len(tokenizer), vocab_size(model))
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)


def split_pools(tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random halves of the ordinary tokens: (keys, values)."""
    shuffled = tokens[torch.randperm(len(tokens), generator=generator)]
    half = len(shuffled) // 2
    return shuffled[:half], shuffled[half:]


def pair_count(length: int, queries: int, bos: bool) -> int:
    """How many key-value pairs fit in `length` tokens next to BOS and the queries."""
    return (length - int(bos)) // 2 - queries


def make_sample(
    length: int,
    queries: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    bos_id: int | None,
    generator: torch.Generator,
) -> RecallSample:
    """A sequence of exactly `length` tokens; an odd leftover becomes one filler value token after BOS."""
    prefix = [] if bos_id is None else [bos_id]
    pairs = pair_count(length, queries, bos_id is not None)
    filler = length - len(prefix) - 2 * (pairs + queries)
    pair_keys = keys[torch.randperm(len(keys), generator=generator)[:pairs]]
    pair_values = values[torch.randint(len(values), (pairs,), generator=generator)]
    asked = torch.randperm(pairs, generator=generator)[:queries]
    filler_ids = values[torch.randint(len(values), (filler,), generator=generator)]
    context = torch.stack([pair_keys, pair_values], dim=1).flatten()
    questions = torch.stack([pair_keys[asked], pair_values[asked]], dim=1).flatten()
    input_ids = torch.cat([torch.tensor(prefix, dtype=torch.long), filler_ids, context, questions])
    first_query = len(prefix) + filler + 2 * pairs
    positions = first_query + 2 * torch.arange(queries)
    return RecallSample(input_ids, positions, pair_values[asked])


def accuracy(model: PreTrainedModel, samples: list[RecallSample], desc: str, progress: bool) -> float:
    """The share of queries whose next-token argmax is the right value."""
    correct = total = 0
    for sample in tqdm(samples, desc=desc, unit="seq", disable=not progress):
        predicted = logits(model, sample.input_ids[None])[0, sample.query_positions].argmax(-1).cpu()
        correct += int((predicted == sample.answers).sum())
        total += len(sample.answers)
    return correct / total


def recall(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """Accuracy against context length for the student (and the teacher, on the very same samples).

    Returns {"points": [{"length", "pairs", "queries", "accuracy", "teacher_accuracy"}], "skipped":
    [{"length", "reason"}], "samples", "queries_per_sample", "chance"}.
    """
    options = options or EvalOptions()
    tokenizer = data.tokenizer if data is not None else None
    generator = torch.Generator().manual_seed(options.seed)
    keys, values = split_pools(ordinary_tokens(tokenizer, model), generator)
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else model.config.bos_token_id
    limits = [n for n in (max_positions(model), teacher and max_positions(teacher)) if n]
    result = {
        "points": [],
        "skipped": [],
        "samples": options.recall_samples,
        "queries_per_sample": options.recall_queries,
        "chance": 1 / max(len(values), 1),
    }
    for length in options.recall_lengths:
        pairs = pair_count(length, options.recall_queries, bos_id is not None)
        reason = None
        if limits and length > min(limits):
            reason = f"beyond max_position_embeddings={min(limits)}"
        elif pairs < options.recall_queries:
            reason = f"too short for {options.recall_queries} queries"
        elif pairs > len(keys):
            reason = f"needs {pairs} distinct keys; the vocabulary offers {len(keys)}"
        if reason:
            log.info("recall: skipping length %d: %s", length, reason)
            result["skipped"].append({"length": length, "reason": reason})
            continue
        samples = [
            make_sample(length, options.recall_queries, keys, values, bos_id, generator)
            for _ in range(options.recall_samples)
        ]
        point = {
            "length": length,
            "pairs": pairs,
            "queries": options.recall_samples * options.recall_queries,
            "accuracy": accuracy(model, samples, f"recall {length} student", options.progress),
        }
        if teacher is not None:
            point["teacher_accuracy"] = accuracy(
                teacher, samples, f"recall {length} teacher", options.progress
            )
        log.info("recall at %d: %s", length, point)
        result["points"].append(point)
    return result
