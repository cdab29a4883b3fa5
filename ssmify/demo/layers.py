"""Which teacher layers keep attention in the demo's student.

A fraction strictly between 0 and 1 keeps the layers whose seeded mixer costs the teacher the most
loss (`ssmify.convert.sensitivity`), measured once per teacher, mixer and text on the start of the
training text and cached under the ssmify cache folder. Explicit layers (the settings or the
recipe) are taken as given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.assets import cache_root, read_documents
from ssmify.atomic import write_text_atomic
from ssmify.convert.plan import LayerPlan
from ssmify.convert.sensitivity import layer_sensitivity, most_sensitive_layers
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

SENSITIVITY_FORMAT = 1


def choose_attention_layers(
    num_layers: int,
    keep_attention: float,
    explicit: tuple[list[int], str] | None,
    sensitivity: Callable[[], dict[int, float]],
) -> tuple[list[int], str]:
    """(layers that keep attention, how they were chosen).

    explicit: (layers, where they come from), taken as they are; otherwise `keep_attention` of the
    layers, the most sensitive ones, with `sensitivity()` called only when a choice is needed.
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
    layers = list(most_sensitive_layers(sensitivity(), keep_attention))
    return layers, f"the {kept} layers whose seeded mixer raises the teacher's loss most"


def cached_sensitivity(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    teacher_dir: Path,
    text: Path,
    tokens: int,
    mixer: str,
    cache_dir: str | os.PathLike | None = None,
) -> dict[int, float]:
    """Layer sensitivity on the first `tokens` tokens of `text`, computed once and cached."""
    key = _cache_key(teacher_dir, text, tokens, mixer)
    path = cache_root(cache_dir) / "sensitivity" / f"{key}.json"
    if path.is_file():
        log.info("layer sensitivity: using the cached %s", path)
        return {int(layer): score for layer, score in json.loads(path.read_text())["scores"].items()}
    log.info(
        "layer sensitivity: once per teacher, each layer's seeded mixer in the teacher alone (cached after)"
    )
    scores = layer_sensitivity(teacher, first_tokens(tokenizer, text, tokens)[None], tokenizer, mixer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        path, json.dumps({"teacher": str(teacher_dir), "text": str(text), "tokens": tokens, "scores": scores})
    )
    return scores


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


def _cache_key(teacher_dir: Path, text: Path, tokens: int, mixer: str) -> str:
    teacher_dir, text = Path(teacher_dir).resolve(), Path(text).resolve()
    files = sorted(p for p in teacher_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    described = {
        "format": SENSITIVITY_FORMAT,
        "teacher": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "text": [str(text), text.stat().st_size, text.stat().st_mtime_ns],
        "tokens": tokens,
        "mixer": mixer,
    }
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:20]
