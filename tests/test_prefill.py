"""Chunked prefill in a student's generate: the same logits, tokens and states as one whole-prompt prefill."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import ssmify
from ssmify.convert.student import MixerCacheLayer

SETTINGS = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)


def _generate(student, ids, mask, chunk):
    with torch.no_grad():
        return student.generate(
            ids,
            attention_mask=mask,
            prefill_chunk_size=chunk,
            return_dict_in_generate=True,
            output_logits=True,
            **SETTINGS,
        )


def _prompt_batch(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 150), generator=generator)
    mask = torch.ones_like(ids)
    if padded:  # the second prompt is 97 tokens, left-padded: padding spans the first chunk and a half
        ids[1, :53], mask[1, :53] = 0, 0
    return ids, mask


@pytest.mark.parametrize("keep", [0.0, 0.5])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_gives_the_whole_prompt_prefills_logits_tokens_and_states(keep, padded):
    student = ssmify.convert(tiny_model("llama"), keep_attention=keep)
    ids, mask = _prompt_batch(padded)
    whole = _generate(student, ids, mask, None)
    chunked = _generate(student, ids, mask, 40)  # 40, 80, 120, 150: not a multiple of the scan's chunk
    assert torch.equal(chunked.sequences, whole.sequences)
    for ours, theirs in zip(chunked.logits, whole.logits):  # [0]: the last prompt token's logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    kinds = set()
    for ours, theirs in zip(chunked.cache.layers, whole.cache.layers):
        assert type(ours) is type(theirs)
        if isinstance(ours, MixerCacheLayer):
            kinds.add("mixer")
            assert ours.seen_tokens == theirs.seen_tokens == 150 + 5
            torch.testing.assert_close(ours.state.conv, theirs.state.conv, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.state.ssm, theirs.state.ssm, rtol=1e-4, atol=1e-5)
        else:
            kinds.add("attention")
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-5)
    assert kinds == ({"mixer"} if keep == 0.0 else {"mixer", "attention"})


def test_generate_prefills_in_chunks_by_default_and_computes_only_the_last_positions_logits():
    student = ssmify.convert(tiny_model("llama"), keep_attention=0.0)
    student.config.ssmify["prefill_chunk_size"] = 32
    layer_lengths, head_lengths = [], []
    first_layer = student.model.layers[0]
    hooks = [
        first_layer.register_forward_pre_hook(lambda m, args: layer_lengths.append(args[0].shape[1])),
        student.lm_head.register_forward_pre_hook(lambda m, args: head_lengths.append(args[0].shape[1])),
    ]
    ids = torch.randint(3, 120, (1, 100))
    with torch.no_grad():
        student.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    for hook in hooks:
        hook.remove()
    assert layer_lengths == [32, 32, 32, 4, 1, 1]
    assert head_lengths == [1] * 6
