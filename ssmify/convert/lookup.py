"""Synthetic in-context lookup sequences: induction runs, key-value lists and passkeys.

These are the sequences that only in-context retrieval solves. Three users build them here, so that
they agree on one definition: the retrieval evaluators (`ssmify.eval.retrieval`, `ssmify.eval.recall`),
the `retrieval` layer choice of convert (`ssmify.convert.layer_choice`), and the synthetic data that a
recipe can mix into distillation (`ssmify.distill.synthetic`). Every builder takes a
`torch.Generator`, so a seed fixes the samples.

- **induction**: a run of `run` random common word tokens is planted at a random depth in filler
  text, and the same run ends the sequence. Scored: the run's second copy, each token after its first
  predicted from the tokens before it. Why planted, and not one long random run repeated: on
  SmolLM2-135M a whole-context random run repeated scores 65% at 256 tokens and 10% at 2,048 (the
  teacher itself), while a planted 24-token run scores 91-100% at 256, 1,024 and 2,048.
- **passkey**: "The pass key is 48213. Remember it. 48213 is the pass key." at a random depth in
  filler, then "What is the pass key? The pass key is". Scored by greedy generation: the generated
  text must contain the 5 digits.
- **kv** (multi-query associative recall, Zoology's MQAR): key-value pairs of random tokens, then some
  keys again, each followed by its value. Scored: the value after each asked key.

The built-in filler is the classic passkey haystack ("The grass is green. ..."). Natural text works
too (`filler_tokens(tokenizer, text)`), but it is harder: SmolLM2-135M finds the passkey in 100% of
built-in-filler prompts at 256 and 1,024 tokens, and in 83% and 50% with Wikipedia filler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.errors import SsmifyError

FILLER_TEXT = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_FACT = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
INDUCTION_RUN = 24  # tokens in a planted run
COMMON_IDS = 8000  # word tokens are drawn from the first ids, the most frequent merges of a BPE vocabulary
_WORD = re.compile(r" [a-z]{2,}")


@dataclass
class LookupSample:
    """One sequence; the token at `positions[i] + 1` is `answers[i]`, and is what gets scored."""

    input_ids: torch.Tensor  # (L,)
    positions: torch.Tensor  # (m,) positions whose next-token prediction is scored
    answers: torch.Tensor  # (m,)


@dataclass
class PasskeySample:
    """A prompt that ends where the passkey should be generated, and the passkey."""

    prompt_ids: torch.Tensor  # (L,)
    passkey: str
    answer_ids: torch.Tensor  # the passkey's tokens as the prompt continues (" 48213")


def require_tokenizer(tokenizer: PreTrainedTokenizerBase | None, task: str) -> PreTrainedTokenizerBase:
    """The lookup tasks other than kv write text: they need the model's tokenizer."""
    if tokenizer is None:
        raise SsmifyError(
            f"task {task} builds its prompts from text, and the model has no tokenizer; save the "
            "teacher's tokenizer files beside it"
        )
    return tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def ordinary_tokens(
    tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, special: set[int | None] = frozenset()
) -> torch.Tensor:
    """Ids that decode to ordinary text: inside both the tokenizer and the logits, not special, not added.

    Without a tokenizer, every id below `vocab_size` but those in `special`."""
    if tokenizer is not None:
        vocab_size = min(len(tokenizer), vocab_size)
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)


def word_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int, needed: int) -> torch.Tensor:
    """Common lowercase word tokens (" house"), at least `needed` of them; ordinary tokens if the vocabulary
    has too few (a character-level tokenizer, say)."""
    ordinary = ordinary_tokens(tokenizer, vocab_size)
    common = ordinary[ordinary < COMMON_IDS]
    words = torch.tensor(
        [i for i in common.tolist() if _WORD.fullmatch(tokenizer.decode([i]))], dtype=torch.long
    )
    return words if len(words) >= needed else ordinary


def filler_tokens(tokenizer: PreTrainedTokenizerBase, text: str | None = None) -> list[int]:
    """The haystack's tokens: `text` (natural filler) or the built-in passkey filler."""
    ids = encode(tokenizer, text if text is not None else FILLER_TEXT)
    if len(ids) < 2:
        raise SsmifyError("the filler text holds fewer than 2 tokens; give a longer text")
    return ids


def _filler(filler: list[int], count: int, generator: torch.Generator) -> list[int]:
    """`count` filler tokens from a random offset, the filler repeated as often as needed."""
    start = int(torch.randint(len(filler), (1,), generator=generator))
    repeats = (start + count) // len(filler) + 1
    return (filler * repeats)[start : start + count]


def _prefix(bos_id: int | None) -> list[int]:
    return [] if bos_id is None else [bos_id]


def induction_sample(
    length: int,
    words: torch.Tensor,
    filler: list[int],
    bos_id: int | None,
    generator: torch.Generator,
    run: int = INDUCTION_RUN,
) -> LookupSample:
    """`length` tokens: filler with a run of distinct random words planted in its first half, and the run
    again at the end. Scored: run tokens 2..run of the second copy."""
    room = length - len(_prefix(bos_id)) - 2 * run
    if room < 0 or run < 2:
        raise SsmifyError(f"induction: {length} tokens cannot hold two runs of {run}")
    if len(words) < run:
        raise SsmifyError(
            f"induction: a run of {run} distinct tokens needs {run} words; the vocabulary has {len(words)}"
        )
    planted = words[torch.randperm(len(words), generator=generator)[:run]].tolist()
    depth = int(torch.randint(room // 2 + 1, (1,), generator=generator))
    body = _filler(filler, room, generator)
    ids = _prefix(bos_id) + body[:depth] + planted + body[depth:] + planted
    start = length - run
    positions = torch.arange(start, length - 1)
    return LookupSample(
        torch.tensor(ids, dtype=torch.long), positions, torch.tensor(planted[1:], dtype=torch.long)
    )


def passkey_sample(
    length: int,
    tokenizer: PreTrainedTokenizerBase,
    filler: list[int],
    generator: torch.Generator,
) -> PasskeySample:
    """A `length`-token prompt with a 5-digit passkey at a random depth of the filler, asked at the end."""
    passkey = str(int(torch.randint(10000, 100000, (1,), generator=generator)))
    fact = encode(tokenizer, PASSKEY_FACT.format(key=passkey))
    question = encode(tokenizer, PASSKEY_QUESTION)
    prefix = _prefix(tokenizer.bos_token_id)
    room = length - len(prefix) - len(fact) - len(question)
    if room < 0:
        raise SsmifyError(f"passkey: {length} tokens cannot hold the fact and the question ({length - room})")
    depth = int(torch.randint(room + 1, (1,), generator=generator))
    body = _filler(filler, room, generator)
    ids = prefix + body[:depth] + fact + body[depth:] + question
    answer = encode(tokenizer, PASSKEY_QUESTION + " " + passkey)[len(question) :]
    return PasskeySample(torch.tensor(ids, dtype=torch.long), passkey, torch.tensor(answer, dtype=torch.long))


def passkey_overhead(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokens a passkey prompt needs besides its filler: BOS, the fact and the question."""
    fact = encode(tokenizer, PASSKEY_FACT.format(key="99999"))
    return len(_prefix(tokenizer.bos_token_id)) + len(fact) + len(encode(tokenizer, PASSKEY_QUESTION))


def passkey_as_lookup(sample: PasskeySample) -> LookupSample:
    """The prompt with its answer appended, scored teacher-forced on the answer tokens (no generation)."""
    ids = torch.cat([sample.prompt_ids, sample.answer_ids])
    start = len(sample.prompt_ids) - 1
    return LookupSample(ids, torch.arange(start, len(ids) - 1), sample.answer_ids)


# --- multi-query associative recall (kv) --------------------------------------------------------


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
    ids = encode(tokenizer, ",")
    return ids[0] if len(ids) == 1 else None


def kv_sample(
    length: int,
    queries: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    form: RecallFormat,
    generator: torch.Generator,
) -> LookupSample:
    """`[BOS] filler k1 v1 , ... kn vn , q1 a1 , ... qm am ,` of exactly `length` tokens; what the pairs
    leave over becomes filler value tokens after BOS. Scored: the value after each asked key."""
    prefix = _prefix(form.bos_id)
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
    return LookupSample(input_ids, positions, pair_values[asked])


@torch.no_grad()
def lookup_scores(model: torch.nn.Module, samples: list[LookupSample]) -> tuple[int, int, float]:
    """(correct, scored, summed NLL in nats) of the scored next-token predictions, teacher-forced."""
    correct, total, nll = 0, 0, 0.0
    for sample in samples:
        ids = sample.input_ids[None].to(model.device)
        logits = model(input_ids=ids, use_cache=False).logits[0, sample.positions.to(model.device)].float()
        answers = sample.answers.to(logits.device)
        correct += int((logits.argmax(-1) == answers).sum())
        total += len(answers)
        nll += torch.nn.functional.cross_entropy(logits, answers, reduction="sum").item()
    return correct, total, nll
