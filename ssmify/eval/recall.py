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
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions
from ssmify.eval.scan import logits, max_positions, vocab_size

log = logging.getLogger(__name__)


@dataclass
class RecallSample:
    """One sequence, the positions of its query keys, and the values expected after them."""

    input_ids: torch.Tensor  # (L,)
    query_positions: torch.Tensor  # (m,)
    answers: torch.Tensor  # (m,)


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


@dataclass(frozen=True)
class RecallFormat:
    """The tokens around the pairs: an optional BOS first, an optional separator after every pair."""

    bos_id: int | None = None
    separator_id: int | None = None

    @property
    def pair_width(self) -> int:
        return 2 if self.separator_id is None else 3

    def pair_count(self, length: int, queries: int) -> int:
        """How many key-value pairs fit in `length` tokens next to BOS and the queries."""
        return (length - int(self.bos_id is not None)) // self.pair_width - queries


def separator(tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The id of ",", if the tokenizer has it as a single token."""
    if tokenizer is None:
        return None
    ids = tokenizer(",", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def make_sample(
    length: int,
    queries: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    form: RecallFormat,
    generator: torch.Generator,
) -> RecallSample:
    """A sequence of exactly `length` tokens; what is left over becomes filler value tokens after BOS."""
    prefix = [] if form.bos_id is None else [form.bos_id]
    pairs = form.pair_count(length, queries)
    filler = length - len(prefix) - form.pair_width * (pairs + queries)
    pair_keys = keys[torch.randperm(len(keys), generator=generator)[:pairs]]
    pair_values = values[torch.randint(len(values), (pairs,), generator=generator)]
    asked = torch.randperm(pairs, generator=generator)[:queries]
    filler_ids = values[torch.randint(len(values), (filler,), generator=generator)]

    def interleave(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        columns = [k, v] if form.separator_id is None else [k, v, torch.full_like(k, form.separator_id)]
        return torch.stack(columns, dim=1).flatten()

    context, questions = interleave(pair_keys, pair_values), interleave(pair_keys[asked], pair_values[asked])
    input_ids = torch.cat([torch.tensor(prefix, dtype=torch.long), filler_ids, context, questions])
    first_query = len(prefix) + filler + form.pair_width * pairs
    positions = first_query + form.pair_width * torch.arange(queries)
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
    declared = [max_positions(m) for m in (model, teacher) if m is not None]
    limit = min((n for n in declared if n is not None), default=None)
    result = {
        "points": [],
        "skipped": [],
        "samples": options.recall_samples,
        "queries_per_sample": options.recall_queries,
        "chance": 1 / max(len(values), 1),
        "separated": form.separator_id is not None,
    }
    for length in options.recall_lengths:
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
            make_sample(length, options.recall_queries, keys, values, form, generator)
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
