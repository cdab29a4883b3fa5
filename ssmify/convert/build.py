"""Build a seeded student from a loaded teacher and a layer plan: the core of `convert`, which
`convert` (plan, report, save) and `sensitivity` (every layer a mixer, to score layers) both use."""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.convert.adapters import get_adapter
from ssmify.convert.head_plan import HeadPlan
from ssmify.convert.mixed_layer import copy_kept_attention, mixer_weights, seedable, teacher_heads
from ssmify.convert.plan import LayerPlan
from ssmify.convert.probes import teacher_attention
from ssmify.convert.seed import (
    calibrate_mixer,
    mixer_settings,
    seed_mean_gate,
    seed_mixer,
    teacher_head_outputs,
)
from ssmify.convert.student import build_student, mixer_layers
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

CALIBRATION_WINDOW = 256
CALIBRATION_WINDOWS = 8


def seeded_student(
    model: PreTrainedModel,
    plan: LayerPlan | HeadPlan,
    mixer: str,
    init: str,
    calibration: torch.Tensor,
    chunk_size: int = 64,
    seed: int = 0,
    mixer_options: dict | None = None,
    width: str = "full",
    gate: str = "z",
    gate_report: dict | None = None,
) -> PreTrainedModel:
    """The teacher with `plan.converted` attention layers swapped for mixers, seeded from attention and
    calibrated on `calibration` token windows (init "seeded") or left freshly initialised ("random").
    A head plan's mixed layers keep the teacher's attention for their kept KV groups (copied, whatever
    `init`), and their mixers are seeded from the other groups' heads.
    `mixer_options` override the mixer settings that seeding picks (checked by `convert`); `width` and
    `gate` are `seed.mixer_settings`'. With gate "mean", `gate_report` (if given) receives each layer's
    `seed_mean_gate` figures."""
    family = model.config.model_type
    adapter = get_adapter(family)
    blocks = adapter.decoder_layers(model)
    first = adapter.read_attention(getattr(blocks[0], adapter.attention_attr))
    block = {
        "base_model_type": family,
        "mixer": mixer,
        "mixer_config": {
            **mixer_settings(mixer, first, chunk_size, norm_eps(model.config), width, gate),
            **(mixer_options or {}),
        },
        "attention_layers": list(plan.attention_layers),
    }
    if isinstance(plan, HeadPlan):
        block.update(plan.block_fields())
    torch.manual_seed(seed)
    student = build_student(model.config, block)
    student.to(device=model.device, dtype=next(model.parameters()).dtype).eval()
    copy_teacher_weights(student, model, adapter.attention_attr, plan)
    student_blocks = adapter.decoder_layers(student)
    for i in getattr(plan, "mixed", {}):
        copy_kept_attention(
            getattr(student_blocks[i], adapter.attention_attr), getattr(blocks[i], adapter.attention_attr)
        )
    student.generation_config = model.generation_config

    mixers = mixer_layers(student)
    if init == "seeded" and plan.converted:
        attentions = {
            i: mixer_weights(
                getattr(student_blocks[i], adapter.attention_attr),
                adapter.read_attention(getattr(blocks[i], adapter.attention_attr)),
            )
            for i in plan.converted
        }
        for i in plan.converted:
            with seedable(mixers[i], attentions[i].hidden_size):
                seed_mixer(mixers[i], attentions[i])
        with torch.no_grad():
            probes = teacher_attention(model, calibration, plan.converted)
        for i, probe in probes.items():
            if gate == "mean":
                figures = seed_mean_gate(mixers[i], probe.inputs)
                if gate_report is not None:
                    gate_report[i] = figures
            heads = teacher_heads(mixers[i])
            probs = probe.probs if heads is None else probe.probs[:, heads]
            target = teacher_head_outputs(attentions[i], probe.inputs, probs)
            with seedable(mixers[i], attentions[i].hidden_size):
                calibrate_mixer(mixers[i], probe.inputs, target)
        log.info(
            "seeded %d mixers from attention and calibrated them on %d tokens",
            len(probes),
            calibration.numel(),
        )
    return student


def norm_eps(config: PretrainedConfig) -> float:
    """The teacher's own norm epsilon, so that the mixer's gated norm matches what export targets use."""
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        if isinstance(getattr(config, name, None), float):
            return getattr(config, name)
    return 1e-5


def copy_teacher_weights(
    student: nn.Module, teacher: nn.Module, attention_attr: str, plan: LayerPlan | HeadPlan
) -> None:
    """Load every teacher weight the student shares; check that what differs is exactly the swapped attention."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    converted = {str(i) for i in plan.converted}

    def in_converted_attention(key: str) -> bool:
        parts = key.split(".")
        return any(parts[j] in converted and parts[j + 1] == attention_attr for j in range(len(parts) - 1))

    wrong_missing = [k for k in missing if not in_converted_attention(k)]
    wrong_unexpected = [k for k in unexpected if not in_converted_attention(k)]
    if wrong_missing or wrong_unexpected:
        raise SsmifyError(
            f"teacher and student weights do not line up: missing {wrong_missing[:3]}, "
            f"unexpected {wrong_unexpected[:3]}"
        )


def read_calibration_text(path: str | os.PathLike | None) -> str:
    """The calibration text: the file at `path` (UTF-8), or the built-in one when `path` is None."""
    if path is None:
        return files("ssmify.convert").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    path = Path(path)
    if not path.is_file():
        raise SsmifyError(f"--calibration-text: {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SsmifyError(
            f"--calibration-text {path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None


def calibration_windows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, text: str
) -> torch.Tensor:
    """Token windows (n, CALIBRATION_WINDOW) of the calibration text; random tokens if there is no tokenizer."""
    if tokenizer is None:
        log.warning("no tokenizer: calibrating on random tokens")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2 * CALIBRATION_WINDOW,), generator=generator)
    else:
        ids = torch.tensor(tokenizer(text)["input_ids"])
    n = min(len(ids) // CALIBRATION_WINDOW, CALIBRATION_WINDOWS)
    if n == 0:
        raise SsmifyError(f"calibration text has {len(ids)} tokens; it needs at least {CALIBRATION_WINDOW}")
    return ids[: n * CALIBRATION_WINDOW].view(n, CALIBRATION_WINDOW).to(model.device)
