"""`convert`: a Hugging Face causal LM in, a seeded SSM or hybrid student out."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.atomic import atomic_directory, check_output_dir
from ssmify.cards import distillation_section, front_matter
from ssmify.convert.adapters import get_adapter
from ssmify.convert.build import calibration_windows, read_calibration_text, seeded_student
from ssmify.convert.head_plan import HeadPlan, plan_heads
from ssmify.convert.plan import LayerPlan
from ssmify.convert.seed import GATES, WIDTHS
from ssmify.convert.sensitivity import CHOICE_METRICS, cached_layer_scores, choose_layers
from ssmify.convert.student import MODEL_TYPE, mixer_layers
from ssmify.convert.teacher import load_config, load_teacher, resolve_dtype
from ssmify.errors import SsmifyError
from ssmify.mixers import MIXERS
from ssmify.version import version

log = logging.getLogger(__name__)

INITS = ("seeded", "random")
LAYER_CHOICES = ("even", "sensitive", "kl", "retrieval", "auto")
# What `--mixer-option` may set, per mixer: key -> (type, check, what the check wants).
_D_CONV = (int, lambda v: 1 <= v <= 16, "an integer from 1 to 16")
MIXER_OPTIONS: dict[str, dict[str, tuple]] = {
    "mamba2": {"d_conv": _D_CONV},
    "discrete_mamba2": {"d_conv": _D_CONV},
    "gated_deltanet": {"d_conv": _D_CONV, "allow_neg_eigval": (bool, lambda v: True, "true or false")},
}
# Calibration windows the layer scores (loss, kl) are measured on (--layer-choice other than even).
SENSITIVITY_WINDOWS = 2


def convert(
    teacher: str | os.PathLike | PreTrainedModel,
    out: str | os.PathLike | None = None,
    mixer: str = "mamba2",
    mixer_options: dict | None = None,
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
    mixer_width: str = "full",
    gate: str = "z",
    attention_heads: str | None = None,
    keep_heads: float | None = None,
    kv_budget_mib: float | None = None,
    context: int = 2048,
) -> PreTrainedModel:
    """Turn `teacher` into a student whose non-kept attention layers are mixers; save it to `out` if given.

    teacher: a local HF folder, a hub id, a .gguf file, or a loaded model (then pass its `tokenizer`).
    attention_layers / keep_attention: which layers keep attention (indices, or a fraction); neither means
    a pure SSM. layer_choice: which layers a fraction keeps: "even" spreads them evenly; the others keep
    the layers whose seeded mixer alone costs the teacher most (ssmify.convert.sensitivity): "sensitive"
    by loss, "kl" by KL(teacher || student) on the calibration text, "retrieval" by the drop in
    induction and passkey accuracy, "auto" by kl and retrieval together. Those cost one forward pass per
    layer, and are cached per teacher folder and calibration text. init: "seeded" (from the teacher's
    Q/K/V/O, then calibrated) or "random". mixer_options: settings on top of those seeding picks, as in
    MIXER_OPTIONS (the layer scores of --layer-choice are measured with the default settings).
    mixer_width: "full" (x and B for every query head) or "kv" (x and B at the teacher's key/value width,
    shared by the query heads as GQA shares keys and values: fewer weights, the same seeded function).
    gate (mamba2): "z" (gate with in_proj/out_proj biases, pass-through at seeding), "mean" (no bias, for
    llama.cpp: z rows seeded along the mean input direction, see `seed.seed_mean_gate`) or "none".
    attention_heads / keep_heads / kv_budget_mib: a head-level plan instead (ssmify.convert.head_plan):
    KV groups by hand ("3:0,7:2", layer:kv_group), a count or fraction of KV heads, or as many KV heads
    as fit in kv_budget_mib MiB of KV cache at `context` tokens; the last two keep the KV groups with the
    highest induction copy mass and, a quarter of them, the previous-token groups those read from
    (ssmify.convert.head_scores.circuit_plan); every group's scores go into the report. A head
    plan takes the default mixer layout (full width, gate z).
    The student's perplexity before any training, next to the teacher's, and its parameter counts next
    to the teacher's, are logged and saved in `out/convert_report.json`.
    """
    if mixer not in MIXERS:
        raise SsmifyError(f"--mixer: {mixer!r} is not a mixer; choose one of {', '.join(MIXERS)}")
    mixer_options = check_mixer_options(mixer, mixer_options or {})
    check_lean_options(mixer, mixer_width, gate)
    if (attention_heads, keep_heads, kv_budget_mib) != (None, None, None) and (mixer_width, gate) != (
        "full",
        "z",
    ):
        raise SsmifyError(
            f"--mixer-width {mixer_width} --gate {gate}: head-level plans (--attention-heads, --keep-heads, "
            "--kv-budget-mib) take only the default mixer layout, --mixer-width full --gate z"
        )
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
    if (attention_layers is not None or keep_attention is not None) and (
        attention_heads is not None or keep_heads is not None or kv_budget_mib is not None
    ):
        raise SsmifyError("give a layer plan (--attention-layers, --keep-attention) or a head plan, not both")
    if out is not None:
        check_output_dir(out, overwrite)
    text = read_calibration_text(calibration_text)
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    kv_dtype = out_dtype or torch.float32
    started = time.perf_counter()

    if isinstance(teacher, PreTrainedModel):
        model, source = teacher, getattr(teacher, "name_or_path", "") or "<in-memory model>"
        plan = _check_plan(source, model.config, attention_layers, keep_attention)
        heads = plan_heads(model.config, attention_heads, keep_heads, kv_budget_mib, context, kv_dtype)
    else:
        source = str(teacher)
        # Everything that can be checked from config.json is checked before the weights load.
        config = load_config(teacher, trust_remote_code)
        plan = _check_plan(source, config, attention_layers, keep_attention)
        heads = plan_heads(config, attention_heads, keep_heads, kv_budget_mib, context, kv_dtype)
        model, loaded = load_teacher(teacher, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or loaded
    model.eval()
    family = model.config.model_type
    windows = calibration_windows(model, tokenizer, text)
    calibration, held_out = windows[0::2], windows[1::2] if len(windows) > 1 else windows
    scores = None
    if layer_choice != "even" and 0 < len(plan.attention_layers) < plan.num_layers:
        teacher_dir = None if isinstance(teacher, PreTrainedModel) else teacher
        ids = calibration[:SENSITIVITY_WINDOWS]
        metrics = CHOICE_METRICS[layer_choice]
        layout = {
            "chunk_size": chunk_size,
            "mixer_options": mixer_options,
            "width": mixer_width,
            "gate": gate,
        }
        scores = cached_layer_scores(model, ids, metrics, tokenizer, mixer, seed, teacher_dir, layout=layout)
        plan = LayerPlan(plan.num_layers, choose_layers(scores, layer_choice, keep_attention))
    head_scores = previous_scores = None
    if heads is not None:
        from ssmify.convert.head_scores import choose_heads, unkept_feeders

        plan, head_scores, previous_scores = choose_heads(model, heads)
        feeders = unkept_feeders(plan, head_scores, previous_scores)
        if feeders:
            log.warning(
                "the plan converts strong previous-token heads below its induction heads (%s): an "
                "induction head reads keys those heads write; to keep them, name them in --attention-heads "
                "(convert_report.json: previous_token_scores)",
                ", ".join(f"{layer}:{group} {mass:.2f}" for layer, group, mass in feeders),
            )
    log.info("plan: %s", plan.describe())

    gate_report: dict[int, dict] = {}
    student = seeded_student(
        model, plan, mixer, init, calibration, chunk_size, seed, mixer_options, mixer_width, gate, gate_report
    )
    if gate == "mean":
        bias = student.config.ssmify["mixer_config"]["bias"]
        log.info(
            "gate mean: %s",
            "in_proj/out_proj keep biases, for the teacher's q/k/v/o biases (llama.cpp cannot hold them)"
            if bias
            else "in_proj/out_proj have no bias",
        )
    parameters = parameter_counts(model, student, plan.converted)

    report = {
        "teacher": source,
        "family": family,
        "mixer": mixer,
        "mixer_options": mixer_options,
        "init": init,
        "attention_layers": list(plan.attention_layers),
        "layer_choice": layer_choice,
        "layer_scores": scores,
        "converted_layers": list(plan.converted),
        **(
            _head_report(plan, head_scores, previous_scores, context, kv_dtype)
            if isinstance(plan, HeadPlan)
            else {}
        ),
        "calibration_tokens": int(calibration.numel()),
        "eval_tokens": int(held_out.numel()),
        "teacher_perplexity": perplexity(model, held_out),
        "student_perplexity": perplexity(student, held_out),
        "student_parameters": parameters["student"],
        "teacher_parameters": parameters["teacher"],
        "mixer_width": mixer_width,
        "gate": gate,
        "parameters": parameters,
        "mean_gate": {str(i): figures for i, figures in gate_report.items()} if gate == "mean" else None,
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    log.info(
        "perplexity before training, on %d tokens of calibration text held out from calibrating: teacher %.2f, student %.2f",
        report["eval_tokens"],
        report["teacher_perplexity"],
        report["student_perplexity"],
    )
    log.info("parameters: %s", describe_parameters(parameters))
    student.config.ssmify["provenance"] = {
        "teacher": source,
        "init": init,
        "mixer_width": mixer_width,
        "gate": gate,
        "ssmify_version": version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "perplexity_before_training": {k: report[k] for k in ("teacher_perplexity", "student_perplexity")},
    }
    if out_dtype is not None:
        student.to(out_dtype)
    if out is not None:
        save_student(student, out, tokenizer=tokenizer, report=report, overwrite=overwrite)
    student.convert_report = report
    return student


def _head_report(
    plan: HeadPlan, scores: torch.Tensor, previous: torch.Tensor, context: int, dtype: torch.dtype
) -> dict:
    """What a head plan adds to convert_report.json: the kept KV groups, every group's score and its
    previous-token mass (`head_scores.previous_token_scores`)."""
    from ssmify.convert.head_scores import HEAD_SCORE

    return {
        "attention_heads": [list(head) for head in plan.kept],
        "mixed_layers": {str(i): list(g) for i, g in plan.mixed.items()},
        "kv_heads_kept": len(plan.kept),
        "kv_heads_total": plan.total,
        "head_score": HEAD_SCORE,
        "head_scores": scores.tolist(),
        "previous_token_scores": previous.tolist(),
        "kv_cache_context": context,
        "kv_cache_dtype": str(dtype).removeprefix("torch."),
    }


def check_mixer_options(mixer: str, options: dict) -> dict:
    """`options` if `mixer` takes each of them with a value of the right kind; else a one-line SsmifyError."""
    allowed = MIXER_OPTIONS[mixer]
    for key, value in options.items():
        if key not in allowed:
            choices = ", ".join(allowed)
            raise SsmifyError(f"--mixer-option: {mixer} has no option {key!r}; it takes {choices}")
        kind, check, what = allowed[key]
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool) or not check(value):
            raise SsmifyError(f"--mixer-option {key}: must be {what}, not {value!r}")
    return dict(options)


def check_lean_options(mixer: str, width: str, gate: str) -> None:
    """A one-line SsmifyError unless `mixer` has the `width` layout and the `gate` form."""
    if width not in WIDTHS:
        raise SsmifyError(f"--mixer-width: {width!r} is not a width; choose one of {', '.join(WIDTHS)}")
    if gate not in GATES:
        raise SsmifyError(f"--gate: {gate!r} is not a gate; choose one of {', '.join(GATES)}")
    if gate != "z" and mixer != "mamba2":
        raise SsmifyError(
            f"--gate {gate}: only mamba2 takes a gate other than z ({mixer} keeps its gate as seeded)"
        )


def parameter_counts(teacher: PreTrainedModel, student: PreTrainedModel, converted: list[int]) -> dict:
    """Parameters of teacher and student, and of each mixer next to the teacher attention it replaces."""
    adapter = get_adapter(teacher.config.model_type)
    blocks, mixers = adapter.decoder_layers(teacher), mixer_layers(student)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = {
        str(i): {"attention": count(getattr(blocks[i], adapter.attention_attr)), "mixer": count(mixers[i])}
        for i in converted
    }
    for layer in layers.values():
        layer["mixer_per_attention"] = layer["mixer"] / layer["attention"]
    attention, mixed = (sum(layer[k] for layer in layers.values()) for k in ("attention", "mixer"))
    teacher_count, student_count = count(teacher), count(student)
    return {
        "teacher": teacher_count,
        "student": student_count,
        "student_per_teacher": student_count / teacher_count,
        "attention_replaced": attention,
        "mixers": mixed,
        "mixers_per_attention": mixed / attention if attention else None,
        "layers": layers,
    }


def describe_parameters(parameters: dict) -> str:
    """One line: student next to teacher, and mixers next to the attention they replace."""
    line = (
        f"student {parameters['student']:,} ({parameters['student_per_teacher']:.3f}x the teacher's "
        f"{parameters['teacher']:,})"
    )
    if parameters["mixers_per_attention"] is not None:
        ratios = [layer["mixer_per_attention"] for layer in parameters["layers"].values()]
        line += (
            f"; mixers {parameters['mixers']:,}, {parameters['mixers_per_attention']:.3f}x the "
            f"{parameters['attention_replaced']:,} attention parameters they replace (per layer "
            f"{min(ratios):.3f}x to {max(ratios):.3f}x)"
        )
    return line


def _check_plan(
    source: str, config: PretrainedConfig, attention_layers: list[int] | None, keep_attention: float | None
) -> LayerPlan:
    """The layer plan, once the family is known to be supported."""
    if config.model_type == MODEL_TYPE:
        raise SsmifyError(f"{source}: is already an ssmify student; convert its teacher instead")
    get_adapter(config.model_type)
    return LayerPlan.from_args(config.num_hidden_layers, attention_layers, keep_attention)


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


def model_card(student: PreTrainedModel, report: dict | None, stages: list[dict] | None = None) -> str:
    """The student's README.md: front matter naming the teacher, what was converted, how to load it,
    perplexity at conversion (`report`) and the distillation stages it went through (`stages`)."""
    block = student.config.ssmify
    kept = block["attention_layers"]
    n = student.config.num_hidden_layers
    teacher = block.get("provenance", {}).get("teacher")
    lines = [
        *front_matter(teacher, ["ssmify", block["mixer"], "hybrid", "distillation"]),
        f"# ssmify student of `{teacher or 'unknown'}`",
        "",
        f"A {block['base_model_type']} model in which {n - len(kept)} of {n} attention layers were replaced by "
        f"`{block['mixer']}` mixers ({'seeded from the attention weights' if _init(block) == 'seeded' else _init(block)}).",
        f"Attention kept in layers: {', '.join(map(str, kept)) or 'none (pure SSM)'}.",
        *_mixed_lines(block),
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
    lines += distillation_section(stages or [])
    return "\n".join(lines) + "\n"


def _mixed_lines(block: dict) -> list[str]:
    """The card's line on mixed layers: attention kept in some KV groups, a mixer for the other heads."""
    mixed = block.get("attention_heads")
    if not mixed:
        return []
    groups = "; ".join(f"layer {i}: KV groups {', '.join(map(str, g))}" for i, g in mixed.items())
    return [
        f"Mixed layers keep attention in some KV groups and a mixer for the other heads ({groups}); "
        "no native transformers architecture holds such a layer, so this folder is the format to use."
    ]


def _init(block: dict) -> str:
    return block.get("provenance", {}).get("init", "seeded")
