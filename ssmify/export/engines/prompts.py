"""The prompts an export is run on in an engine: token ids, so that no tokenizer can differ between them.

Three lengths: a short one; one that crosses a chunk of the mixer's scan (the engines' chunked prefill
must carry the state over); and a long one, 700 tokens where the context allows, longer than vLLM's
attention block on CPU (128 for the tiny tests), so that the attention cache spans blocks. Token ids are
drawn at random, seeded, skipping the special tokens.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ssmify.export.spec import mixer_config

LONG = 700
NEW_TOKENS = 16


def engine_prompts(config: PreTrainedConfig, new_tokens: int = NEW_TOKENS, seed: int = 0) -> list[list[int]]:
    """Three prompts of the student's vocabulary: 12 tokens, 2 chunks + 7, and up to LONG tokens."""
    chunk = mixer_config(config).chunk_size
    room = config.max_position_embeddings - new_tokens
    lengths = sorted({min(n, room) for n in (12, 2 * chunk + 7, max(LONG, 3 * chunk))})
    special = {config.bos_token_id, config.eos_token_id, config.pad_token_id}
    allowed = torch.tensor([i for i in range(config.vocab_size) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return [allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist() for n in lengths]
