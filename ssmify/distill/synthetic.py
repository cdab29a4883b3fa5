"""Synthetic lookup sequences mixed into the training blocks (recipe key `data.synthetic`).

A converted student tends to lose in-context retrieval before it loses perplexity, and natural text
rarely asks for an exact lookup. So a recipe can replace a `fraction` of the training sequences with
the lookup samples of `ssmify.convert.lookup` (the ones the retrieval evaluators score): induction
runs, key-value recall (kv) and passkeys, each exactly the block's seq_len long. Every stage fits the
student to the teacher on them like on any other sequence; nothing else in the loop changes.

Determinism: whether global sequence g is synthetic, which kind it is and every random draw of its
sample come from a hash of (seed, g) alone, and its filler is natural block g itself, which is already
a function of (seed, g). So take(start, count) returns the same rows however a run is cut into steps,
and a resumed run sees exactly the batches an uninterrupted one would.

Filler: induction and passkey hide their item in the natural block being replaced, not in the built-in
passkey haystack. The teacher's predictions on natural text stay useful distillation targets, and the
haystack is a 20-token cycle that would teach copying the filler rather than finding the planted item.
kv needs no filler: its pairs fill the sequence, a quarter of the slots asking keys again (more
scored lookups per sequence than the evaluator's 8, since here every token trains).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import torch

from ssmify.convert.lookup import (
    INDUCTION_RUN,
    RecallFormat,
    induction_sample,
    kv_sample,
    ordinary_tokens,
    passkey_as_lookup,
    passkey_overhead,
    passkey_sample,
    separator,
    split_pools,
    word_tokens,
)
from ssmify.distill.recipe import SyntheticConfig
from ssmify.errors import SsmifyError

if TYPE_CHECKING:
    from ssmify.distill.data import Blocks  # data.py imports this module at run time

log = logging.getLogger(__name__)

KEY_TOKENS = 6  # the most tokens a 5-digit passkey can take (a space, then one per digit)


class SyntheticBlocks:
    """Training blocks of which a seeded `fraction` are replaced by synthetic lookup sequences."""

    def __init__(self, natural: Blocks, config: SyntheticConfig, tokenizer: Any, seed: int) -> None:
        self.natural = natural
        self.seq_len = natural.seq_len
        self.config = config
        self.tokenizer = tokenizer
        self.seed = seed
        self.bos = tokenizer.bos_token_id
        self.words = word_tokens(tokenizer, len(tokenizer), INDUCTION_RUN)
        self.form = RecallFormat(self.bos, separator(tokenizer))
        tokens = ordinary_tokens(tokenizer, len(tokenizer))
        self.kv_tokens = (
            tokens if self.form.separator_id is None else tokens[tokens != self.form.separator_id]
        )
        slots = self.form.pair_count(self.seq_len, 0)
        self.queries = max(slots // 4, 1)
        unfit = {kind: reason for kind in config.kinds if (reason := self._unfit(kind))}
        self.kinds = [kind for kind in config.kinds if kind not in unfit]
        if not self.kinds:
            raise SsmifyError(f"data.synthetic.kinds: none fits this stage: {'; '.join(unfit.values())}")
        for reason in unfit.values():
            log.info("data.synthetic: left out of this stage (the others are mixed in): %s", reason)

    def _unfit(self, kind: str) -> str | None:
        """Why seq_len cannot hold a sample of `kind`, or None; known before training, not at the first draw.

        A stage with short sequences (the matrix stage, say) leaves such kinds out and mixes in the rest."""
        if kind == "induction":
            shortest = 2 * INDUCTION_RUN + int(self.bos is not None)
        elif kind == "passkey":
            # an upper bound: room for a key that tokenizes longer than 99999, twice in the fact, once asked
            shortest = passkey_overhead(self.tokenizer) + 3 * KEY_TOKENS
        else:
            pairs = self.form.pair_count(self.seq_len, self.queries)
            if pairs > len(self.kv_tokens) // 2:
                return (
                    f"kv at seq_len {self.seq_len} needs {pairs} distinct keys; the vocabulary gives "
                    f"{len(self.kv_tokens) // 2}"
                )
            shortest = 2 * self.form.pair_width + int(self.bos is not None)
        if self.seq_len < shortest:
            return f"{kind} needs seq_len >= {shortest}; this stage's is {self.seq_len}"
        return None

    def draw(self, index: int) -> tuple[str | None, int]:
        """(kind or None for natural text, sample seed) of global sequence `index`: a hash of (seed, index)."""
        digest = hashlib.blake2b(f"synthetic:{self.seed}:{index}".encode(), digest_size=16).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        sample_seed = int.from_bytes(digest[8:], "little") >> 1  # torch seeds are below 2**63
        if u >= self.config.fraction:
            return None, sample_seed
        return self.kinds[int(u / self.config.fraction * len(self.kinds))], sample_seed

    def sample(self, kind: str, block: torch.Tensor, sample_seed: int) -> torch.Tensor:
        """A synthetic sequence of seq_len tokens; `block` (the natural one it replaces) is its filler."""
        filler = block.tolist()

        def generator() -> torch.Generator:
            return torch.Generator().manual_seed(sample_seed)

        if kind == "induction":
            return induction_sample(self.seq_len, self.words, filler, self.bos, generator()).input_ids
        if kind == "kv":
            draws = generator()
            keys, values = split_pools(self.kv_tokens, draws)
            return kv_sample(self.seq_len, self.queries, keys, values, self.form, draws).input_ids
        # The answer's length depends on the key, drawn first: a probe finds it, and the same seed
        # then draws the same key for a prompt short enough that prompt + answer is seq_len.
        probe = passkey_sample(self.seq_len, self.tokenizer, filler, generator())
        prompt = passkey_sample(self.seq_len - len(probe.answer_ids), self.tokenizer, filler, generator())
        return passkey_as_lookup(prompt).input_ids

    def take(self, start: int, count: int) -> torch.Tensor:
        rows = self.natural.take(start, count)
        for i in range(count):
            kind, sample_seed = self.draw(start + i)
            if kind is not None:
                rows[i] = self.sample(kind, rows[i], sample_seed)
        return rows

    def first(self, count: int) -> torch.Tensor:
        """The natural blocks: validation stays natural text."""
        return self.natural.first(count)

    def state_dict(self) -> dict | None:
        return self.natural.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.natural.load_state_dict(state)
