"""Which teacher layers keep attention in the demo's student.

A fraction strictly between 0 and 1 keeps the layers that the layer choice picks: spread evenly, or
those whose seeded mixer costs the teacher the most by loss, KL or retrieval accuracy
(`ssmify.convert.sensitivity`), scored once per teacher, mixer and text on the start of the training
text and cached under the ssmify cache folder. Explicit layers (the settings or the
recipe) are taken as given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.assets import read_documents
from ssmify.convert.plan import LayerPlan
from ssmify.convert.sensitivity import CHOICE_METRICS, cached_layer_scores, choose_layers
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

CHOICE_HOW = {
    "sensitive": "loss",
    "kl": "KL to the teacher",
    "retrieval": "induction and passkey accuracy",
    "auto": "KL and retrieval",
}


def choose_attention_layers(
    num_layers: int,
    keep_attention: float,
    explicit: tuple[list[int], str] | None,
    choice: str,
    scores: Callable[[], dict[str, dict[int, float]]],
) -> tuple[list[int], str]:
    """(layers that keep attention, how they were chosen).

    explicit: (layers, where they come from), taken as they are; otherwise `keep_attention` of the
    layers, chosen by `choice` (even, or a scored choice of ssmify.convert.sensitivity), with
    `scores()` called only when a scored choice is needed.
    """
    if explicit is not None:
        listed, source = explicit
        layers = list(LayerPlan(num_layers, tuple(listed)).attention_layers)
        if len(layers) == num_layers:
            raise SsmifyError(f"{source}: attention layers {layers} are every layer, so nothing is converted")
        return layers, source
    plan = LayerPlan.keep_fraction(num_layers, keep_attention)
    kept = len(plan.attention_layers)
    if kept == num_layers:
        raise SsmifyError(
            f"--keep-attention {keep_attention:g} keeps attention in all {num_layers} layers, so nothing is "
            "converted; choose a smaller fraction"
        )
    if kept == 0:
        return [], "a pure SSM"
    if choice == "even":
        return list(plan.attention_layers), f"{kept} layers spread evenly"
    layers = list(choose_layers(scores(), choice, keep_attention))
    return layers, f"the {kept} layers whose seeded mixer costs the teacher most ({CHOICE_HOW[choice]})"


def cached_scores(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher_dir: Path,
    text: Path,
    tokens: int,
    mixer: str,
    choice: str,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[int, float]]:
    """The layer scores `choice` needs, on the first `tokens` tokens of `text`, computed once and cached."""
    log.info(
        "layer scores (%s): once per teacher and text, each layer's seeded mixer in the teacher alone", choice
    )
    ids = first_tokens(tokenizer, text, tokens)[None]
    metrics = CHOICE_METRICS[choice]
    return cached_layer_scores(teacher, ids, metrics, tokenizer, mixer, 0, teacher_dir, cache_dir=cache_dir)


def first_tokens(tokenizer: PreTrainedTokenizerBase, text: Path, count: int) -> torch.Tensor:
    """The first `count` tokens of a blank-line separated text file, EOS between documents (cycled if short)."""
    ids: list[int] = []
    for document in read_documents(text):
        ids += tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        if len(ids) >= count:
            break
    if not ids:
        raise SsmifyError(f"{text}: holds no text")
    while len(ids) < count:
        ids += ids
    return torch.tensor(ids[:count])
