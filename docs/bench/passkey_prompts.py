"""Passkey prompts with the passkey's own token positions, shared by passkey_heads.py and passkey_depth.py.

The evaluator's builtin filler with generator seed 1 (so not the scored samples), teacher-forced with the
answer appended. `key` holds the positions of the passkey's tokens in the fact (" The pass key is NNNNN.
Remember it. NNNNN is the pass key.", both copies), not the words around them, which the question repeats.
"""

import torch

from ssmify.convert.lookup import PASSKEY_FACT, encode, filler_tokens, passkey_as_lookup, passkey_sample


def passkey_prompts(tokenizer, length: int, samples: int) -> list[tuple[torch.Tensor, ...]]:
    """(ids, scored positions, answers, key positions) for `samples` prompts of `length` tokens."""
    filler = filler_tokens(tokenizer)
    generator = torch.Generator().manual_seed(1)
    found = []
    for _ in range(samples):
        sample = passkey_sample(length, tokenizer, filler, generator)
        lookup = passkey_as_lookup(sample)
        ids = lookup.input_ids.tolist()
        fact = encode(tokenizer, PASSKEY_FACT.format(key=sample.passkey))
        start = next(i for i in range(len(ids)) if ids[i : i + len(fact)] == fact)
        answer = set(sample.answer_ids.tolist())
        key = torch.tensor([start + j for j, token in enumerate(fact) if token in answer])
        found.append((lookup.input_ids, lookup.positions, lookup.answers, key))
    return found
