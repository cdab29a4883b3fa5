"""`convert`: a Hugging Face causal LM in, a seeded SSM or hybrid student out."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from importlib import metadata
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.atomic import atomic_directory, is_nonempty_dir
from ssmify.convert.adapters import get_adapter
from ssmify.convert.plan import LayerPlan
from ssmify.convert.probes import teacher_attention
from ssmify.convert.seed import calibrate_mixer, mixer_settings, seed_mixer, teacher_head_outputs
from ssmify.convert.student import MODEL_TYPE, build_student, mixer_layers
from ssmify.convert.teacher import load_config, load_teacher, resolve_dtype
from ssmify.errors import SsmifyError
from ssmify.mixers import MIXERS

log = logging.getLogger(__name__)

INITS = ("seeded", "random")
LAYER_CHOICES = ("even", "sensitive", "kl", "retrieval", "auto")
# Calibration windows the layer scores (loss, kl) are measured on (--layer-choice other than even).
SENSITIVITY_WINDOWS = 2
CALIBRATION_WINDOW = 256
CALIBRATION_WINDOWS = 8


def convert(
    teacher: str | os.PathLike | PreTrainedModel,
    out: str | os.PathLike | None = None,
    mixer: str = "mamba2",
    attention_layers: list[int] | None = None,
    keep_attention: float | None = None,
    layer_choice: str = "even",
    init: str = "seeded",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    calibration_text: str | os.PathLike | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    chunk_size: int = 64,
    seed: int = 0,
) -> PreTrainedModel:
    """Turn `teacher` into a student whose non-kept attention layers are mixers; save it to `out` if given.

    teacher: a local HF folder, a hub id, a .gguf file, or a loaded model (then pass its `tokenizer`).
    attention_layers / keep_attention: which layers keep attention (indices, or a fraction); neither means
    a pure SSM. layer_choice: which layers a fraction keeps: "even" spreads them evenly; the others keep
    the layers whose seeded mixer alone costs the teacher most (ssmify.convert.sensitivity): "sensitive"
    by loss, "kl" by KL(teacher || student) on the calibration text, "retrieval" by the drop in
    induction and passkey accuracy, "auto" by kl and retrieval together. Those cost one forward pass per
    layer, and are cached per teacher folder and calibration text. init: "seeded" (from the teacher's
    Q/K/V/O, then calibrated) or "random".
    The student's perplexity before any training, next to the teacher's, is logged and saved in
    `out/convert_report.json`.
    """
    if mixer not in MIXERS:
        raise SsmifyError(f"--mixer: {mixer!r} is not a mixer; choose one of {', '.join(MIXERS)}")
    if init not in INITS:
        raise SsmifyError(f"--init: {init!r} is not an init; choose one of {', '.join(INITS)}")
    if layer_choice not in LAYER_CHOICES:
        raise SsmifyError(
            f"--layer-choice: {layer_choice!r} is not a choice; choose one of {', '.join(LAYER_CHOICES)}"
        )
    if layer_choice != "even" and keep_attention is None:
        raise SsmifyError(
            f"--layer-choice {layer_choice} chooses among layers: give --keep-attention F, the share to keep"
        )
    if out is not None and is_nonempty_dir(Path(out)) and not overwrite:
        raise SsmifyError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    started = time.perf_counter()

    if isinstance(teacher, PreTrainedModel):
        model, source = teacher, getattr(teacher, "name_or_path", "") or "<in-memory model>"
        plan = _check_plan(source, model.config, attention_layers, keep_attention)
    else:
        source = str(teacher)
        # Everything that can be checked from config.json is checked before the weights load.
        config = load_config(teacher, trust_remote_code)
        plan = _check_plan(source, config, attention_layers, keep_attention)
        model, loaded = load_teacher(teacher, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or loaded
    model.eval()
    family = model.config.model_type
    adapter = get_adapter(family)
    blocks = adapter.decoder_layers(model)
    windows = _calibration_windows(model, tokenizer, calibration_text)
    calibration, held_out = windows[0::2], windows[1::2] if len(windows) > 1 else windows
    scores = None
    if layer_choice != "even" and 0 < len(plan.attention_layers) < plan.num_layers:
        from ssmify.convert.sensitivity import CHOICE_METRICS, cached_layer_scores, choose_layers

        teacher_dir = None if isinstance(teacher, PreTrainedModel) else teacher
        ids = calibration[:SENSITIVITY_WINDOWS]
        metrics = CHOICE_METRICS[layer_choice]
        scores = cached_layer_scores(model, ids, metrics, tokenizer, mixer, seed, teacher_dir)
        plan = LayerPlan(plan.num_layers, choose_layers(scores, layer_choice, keep_attention))
    log.info("plan: %s", plan.describe())

    first = adapter.read_attention(getattr(blocks[0], adapter.attention_attr))
    block = {
        "base_model_type": family,
        "mixer": mixer,
        "mixer_config": mixer_settings(mixer, first, chunk_size, norm_eps=_norm_eps(model.config)),
        "attention_layers": list(plan.attention_layers),
    }
    torch.manual_seed(seed)
    student = build_student(model.config, block)
    student.to(device=model.device, dtype=next(model.parameters()).dtype).eval()
    _copy_teacher_weights(student, model, adapter.attention_attr, plan)
    student.generation_config = model.generation_config

    mixers = mixer_layers(student)
    if init == "seeded" and plan.converted:
        attentions = {
            i: adapter.read_attention(getattr(blocks[i], adapter.attention_attr)) for i in plan.converted
        }
        for i in plan.converted:
            seed_mixer(mixers[i], attentions[i])
        with torch.no_grad():
            probes = teacher_attention(model, calibration, plan.converted)
        for i, probe in probes.items():
            target = teacher_head_outputs(attentions[i], probe.inputs, probe.probs)
            calibrate_mixer(mixers[i], probe.inputs, target)
        log.info(
            "seeded %d mixers from attention and calibrated them on %d tokens",
            len(probes),
            calibration.numel(),
        )

    report = {
        "teacher": source,
        "family": family,
        "mixer": mixer,
        "init": init,
        "attention_layers": list(plan.attention_layers),
        "layer_choice": layer_choice,
        "layer_scores": scores,
        "converted_layers": list(plan.converted),
        "calibration_tokens": int(calibration.numel()),
        "eval_tokens": int(held_out.numel()),
        "teacher_perplexity": perplexity(model, held_out),
        "student_perplexity": perplexity(student, held_out),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in model.parameters()),
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    log.info(
        "perplexity before training, on %d tokens of calibration text held out from calibrating: teacher %.2f, student %.2f",
        report["eval_tokens"],
        report["teacher_perplexity"],
        report["student_perplexity"],
    )
    student.config.ssmify["provenance"] = {
        "teacher": source,
        "init": init,
        "ssmify_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "perplexity_before_training": {k: report[k] for k in ("teacher_perplexity", "student_perplexity")},
    }
    if out_dtype is not None:
        student.to(out_dtype)
    if out is not None:
        save_student(student, out, tokenizer=tokenizer, report=report, overwrite=overwrite)
    student.convert_report = report
    return student


def _check_plan(
    source: str, config: PretrainedConfig, attention_layers: list[int] | None, keep_attention: float | None
) -> LayerPlan:
    """The layer plan, once the family is known to be supported."""
    if config.model_type == MODEL_TYPE:
        raise SsmifyError(f"{source}: is already an ssmify student; convert its teacher instead")
    get_adapter(config.model_type)
    return LayerPlan.from_args(config.num_hidden_layers, attention_layers, keep_attention)


def _norm_eps(config: PretrainedConfig) -> float:
    """The teacher's own norm epsilon, so that the mixer's gated norm matches what export targets use."""
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        if isinstance(getattr(config, name, None), float):
            return getattr(config, name)
    return 1e-5


def _copy_teacher_weights(
    student: nn.Module, teacher: nn.Module, attention_attr: str, plan: LayerPlan
) -> None:
    """Load every teacher weight the student shares; check that what differs is exactly the swapped attention."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    converted = {str(i) for i in plan.converted}

    def in_converted_attention(key: str) -> bool:
        parts = key.split(".")
        return any(parts[j] in converted and parts[j + 1] == attention_attr for j in range(len(parts) - 1))

    wrong_missing = [k for k in missing if ".mixer." not in k]
    wrong_unexpected = [k for k in unexpected if not in_converted_attention(k)]
    if wrong_missing or wrong_unexpected:
        raise SsmifyError(
            f"teacher and student weights do not line up: missing {wrong_missing[:3]}, "
            f"unexpected {wrong_unexpected[:3]}"
        )


def _calibration_windows(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike | None
) -> torch.Tensor:
    """Token windows (n, CALIBRATION_WINDOW) of the calibration text; random tokens if there is no tokenizer."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SsmifyError(f"--calibration-text: {path}: no such file")
        text = path.read_text(encoding="utf-8")
    else:
        text = files("ssmify.convert").joinpath("data/calibration.txt").read_text(encoding="utf-8")
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


@torch.no_grad()
def perplexity(model: PreTrainedModel, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over the windows (the first token of each window is not scored)."""
    total, count = 0.0, 0
    for window in windows:
        logits = model(input_ids=window[None], use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum")
        total, count = total + nll.item(), count + window.numel() - 1
    return math.exp(total / count)


def save_student(
    student: PreTrainedModel,
    out: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    report: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a loadable student folder atomically: config, safetensors (sharded past 2 GB), tokenizer,
    generation config, a model card, and the convert report."""
    with atomic_directory(out, overwrite=overwrite) as staging:
        student.save_pretrained(staging, max_shard_size="2GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / "convert_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(student, report))
    log.info("saved student to %s", out)
    return Path(out)


def model_card(student: PreTrainedModel, report: dict | None) -> str:
    block = student.config.ssmify
    kept = block["attention_layers"]
    n = student.config.num_hidden_layers
    lines = [
        "---",
        "library_name: transformers",
        "tags: [ssmify, mamba2, hybrid, distillation]",
        "---",
        f"# ssmify student of `{block.get('provenance', {}).get('teacher', 'unknown')}`",
        "",
        f"A {block['base_model_type']} model in which {n - len(kept)} of {n} attention layers were replaced by "
        f"`{block['mixer']}` mixers ({'seeded from the attention weights' if _init(block) == 'seeded' else _init(block)}).",
        f"Attention kept in layers: {', '.join(map(str, kept)) or 'none (pure SSM)'}.",
        "",
        "## Load",
        "",
        "```python",
        "import ssmify  # registers the 'ssmify' model type with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "`ssmify export` turns it into a native transformers architecture that loads without ssmify.",
    ]
    if report:
        lines += [
            "",
            "## At conversion (before any training)",
            "",
            "| | perplexity on calibration text |",
            "|---|---|",
            f"| teacher | {report['teacher_perplexity']:.2f} |",
            f"| student | {report['student_perplexity']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def _init(block: dict) -> str:
    return block.get("provenance", {}).get("init", "seeded")


def _version() -> str:
    try:
        return metadata.version("ssmify")
    except metadata.PackageNotFoundError:
        return "unknown"
