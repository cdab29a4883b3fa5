"""Which layers should keep attention: those whose seeded mixer costs the teacher the most.

For every layer i, the teacher runs with only layer i's attention replaced by its seeded, calibrated
mixer, and each metric scores the damage against the unchanged teacher on the same inputs:

- `loss` (`--layer-choice sensitive`): the rise in mean next-token loss, nats per token, on the
  calibration text. On SmolLM2-135M-Instruct at half attention the seeded student's held-out
  perplexity is 41.5 with the 15 most sensitive layers kept, 199 with every other layer kept
  (teacher 15.4), because the first two layers and a few late ones matter most.
- `kl` (`--layer-choice kl`): mean KL(teacher || swapped) per token on the calibration text. This is
  GA-S2's signal (ICLR 2026), which beat even spacing and probe-based choice on RULER and SWDE; unlike
  the loss rise it also counts changes on tokens the teacher gets wrong.
- `retrieval` (`--layer-choice retrieval`): the drop in the teacher's in-context retrieval accuracy,
  on short induction and passkey samples (`ssmify.convert.lookup`, scored teacher-forced: the share of
  run tokens and passkey digits predicted exactly). A few samples make accuracy coarse, so equal drops
  are ranked by the rise in the answers' loss (`retrieval_nll`).
- `auto`: each of kl and retrieval divided by its largest value over the layers (negative values
  count as 0), then summed. KL keeps the layers that the text needs, retrieval the ones that look
  things up; neither alone covers both, and dividing by the maximum puts them on one scale.

Cost: one conversion of every layer (seeding and calibration), then per layer one forward pass over
the calibration windows (loss and kl together) and, for retrieval, over the lookup samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.atomic import write_text_atomic
from ssmify.convert.adapters import get_adapter
from ssmify.convert.build import calibration_windows, read_calibration_text, seeded_student
from ssmify.convert.lookup import (
    INDUCTION_RUN,
    filler_tokens,
    induction_sample,
    lookup_scores,
    passkey_as_lookup,
    passkey_overhead,
    passkey_sample,
    require_tokenizer,
    word_tokens,
)
from ssmify.convert.plan import LayerPlan
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

METRICS = ("loss", "kl", "retrieval")
CHOICE_METRICS = {
    "sensitive": ("loss",),
    "kl": ("kl",),
    "retrieval": ("retrieval",),
    "auto": ("kl", "retrieval"),
}
RETRIEVAL_LENGTH = 256  # tokens per lookup sample: short, since it runs once per layer
RETRIEVAL_SAMPLES = 4  # induction samples, and as many passkey samples


@torch.no_grad()
def layer_sensitivity(
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None = None,
    mixer: str = "mamba2",
    seed: int = 0,
    progress: bool = True,
) -> dict[int, float]:
    """{layer: rise in mean loss (nats per token) when that layer alone becomes its seeded mixer}."""
    return layer_scores(teacher, input_ids, ("loss",), tokenizer, mixer, seed, progress)["loss"]


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || logits) per position, in nats."""
    target = reference.log_softmax(-1)
    return (target.exp() * (target - logits.log_softmax(-1))).sum(-1).mean().item()


class RetrievalProbe:
    """Teacher-forced induction and passkey samples: accuracy and answer loss of any model on them."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, seed: int = 0):
        tokenizer = require_tokenizer(tokenizer, "retrieval (layer choice)")
        generator = torch.Generator().manual_seed(seed)
        filler = filler_tokens(tokenizer)
        words = word_tokens(tokenizer, vocab_size, INDUCTION_RUN)
        bos = tokenizer.bos_token_id
        self.samples = [
            induction_sample(RETRIEVAL_LENGTH, words, filler, bos, generator)
            for _ in range(RETRIEVAL_SAMPLES)
        ]
        if RETRIEVAL_LENGTH > passkey_overhead(tokenizer):
            self.samples += [
                passkey_as_lookup(passkey_sample(RETRIEVAL_LENGTH, tokenizer, filler, generator))
                for _ in range(RETRIEVAL_SAMPLES)
            ]

    def __call__(self, model: PreTrainedModel) -> tuple[float, float]:
        """(accuracy, mean answer loss in nats) over every scored token."""
        correct, total, nll = lookup_scores(model, self.samples)
        return correct / total, nll / total


@torch.no_grad()
def layer_scores(
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    metrics: tuple[str, ...] = ("loss",),
    tokenizer: PreTrainedTokenizerBase | None = None,
    mixer: str = "mamba2",
    seed: int = 0,
    progress: bool = True,
    layout: dict | None = None,
) -> dict[str, dict[int, float]]:
    """{metric: {layer: damage when that layer alone becomes its seeded mixer}} for `metrics` among
    loss, kl, retrieval (which adds retrieval_nll). `input_ids` (N, L) is the calibration text scored
    by loss and kl; `tokenizer` is the teacher's (retrieval needs it). `layout`: the `seeded_student`
    keywords that shape the student's mixer (chunk_size, mixer_options, width, gate), so that a layer is
    scored with the mixer it would get. The teacher is left as it was."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise SsmifyError(
            f"layer scores: unknown metric(s) {sorted(unknown)}; choose from {', '.join(METRICS)}"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise SsmifyError(
            f"sensitivity: input_ids must be (windows, length >= 2), got {tuple(input_ids.shape)}"
        )
    adapter = get_adapter(teacher.config.model_type)
    input_ids = input_ids.to(teacher.device)
    probe = (
        RetrievalProbe(tokenizer, teacher.get_output_embeddings().weight.shape[0], seed)
        if "retrieval" in metrics
        else None
    )
    log.info("layer scores (%s): seeding a mixer in every layer of the teacher", ", ".join(metrics))
    # The mixers are calibrated as convert calibrates them by default: on the built-in text's even windows.
    calibration = calibration_windows(teacher, tokenizer, read_calibration_text(None))[0::2]
    no_attention = LayerPlan.from_args(teacher.config.num_hidden_layers, None, 0.0)
    every_layer = seeded_student(
        teacher, no_attention, mixer, "seeded", calibration, seed=seed, **(layout or {})
    )
    teacher_blocks = adapter.decoder_layers(teacher)
    mixer_blocks = adapter.decoder_layers(every_layer)

    def measure(model: PreTrainedModel) -> dict:
        out: dict = {}
        if "loss" in metrics or "kl" in metrics:
            out["logits"] = [model(input_ids=w[None], use_cache=False).logits.float() for w in input_ids]
            out["loss"] = sum(
                torch.nn.functional.cross_entropy(lg[0, :-1], w[1:], reduction="sum").item()
                for lg, w in zip(out["logits"], input_ids)
            ) / (input_ids.numel() - len(input_ids))
        if probe is not None:
            out["retrieval"], out["retrieval_nll"] = probe(model)
        return out

    base = measure(teacher)
    names = [m for m in METRICS if m in metrics] + (["retrieval_nll"] if probe else [])
    scores: dict[str, dict[int, float]] = {name: {} for name in names}
    for i in tqdm(range(len(teacher_blocks)), desc="layer scores", unit="layer", disable=not progress):
        attention = getattr(teacher_blocks[i], adapter.attention_attr)
        setattr(teacher_blocks[i], adapter.attention_attr, getattr(mixer_blocks[i], adapter.attention_attr))
        try:
            swapped = measure(teacher)
        finally:
            setattr(teacher_blocks[i], adapter.attention_attr, attention)
        if "loss" in scores:
            scores["loss"][i] = swapped["loss"] - base["loss"]
        if "kl" in scores:
            kls = [_kl(ref, lg) for ref, lg in zip(base["logits"], swapped["logits"])]
            scores["kl"][i] = sum(kls) / len(kls)
        if probe is not None:
            scores["retrieval"][i] = base["retrieval"] - swapped["retrieval"]
            scores["retrieval_nll"][i] = swapped["retrieval_nll"] - base["retrieval_nll"]
    if not all(math.isfinite(v) for per_layer in scores.values() for v in per_layer.values()):
        raise SsmifyError("sensitivity: a seeded mixer gave a non-finite score; check the teacher's weights")
    for name, per_layer in scores.items():
        log.info("layer scores, %s: %s", name, ", ".join(f"{i}: {v:.3f}" for i, v in per_layer.items()))
    if probe is not None:
        log.info("teacher retrieval accuracy (teacher-forced, before any swap): %.3f", base["retrieval"])
    return scores


SCORES_FORMAT = 2
LAYOUT_DEFAULTS = {"chunk_size": 64, "mixer_options": {}, "width": "full", "gate": "z"}  # seeded_student's


def teacher_fingerprint(teacher_dir: str | os.PathLike) -> list | None:
    """Name, size and mtime of a teacher folder's weights and configs (or of a single file); None for
    a hub id, which is not cached."""
    path = Path(teacher_dir)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf"))
    else:
        return None
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cached_layer_scores(
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    metrics: tuple[str, ...],
    tokenizer: PreTrainedTokenizerBase | None,
    mixer: str,
    seed: int,
    teacher_dir: str | os.PathLike | None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    layout: dict | None = None,
) -> dict[str, dict[int, float]]:
    """`layer_scores`, computed once per teacher (its files), calibration tokens, mixer and its layout,
    metrics and seed, and cached as JSON under the ssmify cache folder. A teacher given only in memory is
    not cached."""
    from ssmify.assets import cache_root

    fingerprint = teacher_fingerprint(teacher_dir) if teacher_dir is not None else None
    if fingerprint is None:
        return layer_scores(teacher, input_ids, metrics, tokenizer, mixer, seed, progress, layout)
    changed = {k: v for k, v in (layout or {}).items() if (v or {}) != LAYOUT_DEFAULTS.get(k)}
    described = {
        "format": SCORES_FORMAT,
        "teacher": fingerprint,
        "tokens": hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest(),
        "shape": list(input_ids.shape),
        "mixer": mixer,
        "metrics": sorted(metrics),
        **({"layout": changed} if changed else {}),
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:20]
    path = cache_root(cache_dir) / "layer-scores" / f"{key}.json"
    if path.is_file():
        log.info("layer scores: using the cached %s", path)
        saved = json.loads(path.read_text())["scores"]
        return {name: {int(i): v for i, v in per_layer.items()} for name, per_layer in saved.items()}
    scores = layer_scores(teacher, input_ids, metrics, tokenizer, mixer, seed, progress, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({**described, "scores": scores}))
    return scores


def combined_scores(scores: dict[str, dict[int, float]]) -> dict[int, float]:
    """`auto`: kl and retrieval, each over its largest value (negatives as 0), summed per layer."""

    def scaled(per_layer: dict[int, float]) -> dict[int, float]:
        top = max(max(per_layer.values()), 0.0)
        return {i: max(v, 0.0) / top if top > 0 else 0.0 for i, v in per_layer.items()}

    kl, retrieval = scaled(scores["kl"]), scaled(scores["retrieval"])
    return {i: kl[i] + retrieval[i] for i in kl}


def choose_layers(scores: dict[str, dict[int, float]], choice: str, keep_attention: float) -> tuple[int, ...]:
    """The layers that `choice` (sensitive, kl, retrieval or auto) keeps at `keep_attention`."""
    if choice == "auto":
        return most_sensitive_layers(combined_scores(scores), keep_attention)
    if choice == "retrieval":
        return most_sensitive_layers(scores["retrieval"], keep_attention, tiebreak=scores["retrieval_nll"])
    return most_sensitive_layers(scores[CHOICE_METRICS[choice][0]], keep_attention)


def most_sensitive_layers(
    scores: dict[int, float], keep_attention: float, tiebreak: dict[int, float] | None = None
) -> tuple[int, ...]:
    """The round(keep_attention * layers) highest-scoring layers (ties: the higher `tiebreak`, then the
    lower index), sorted."""
    count = len(LayerPlan.keep_fraction(len(scores), keep_attention).attention_layers)
    tiebreak = tiebreak or {}
    ranked = sorted(scores, key=lambda i: (-scores[i], -tiebreak.get(i, 0.0), i))
    return tuple(sorted(ranked[:count]))
