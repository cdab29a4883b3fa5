"""`export`: a distilled student in, a native transformers checkpoint out (no ssmify needed to load it)."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from ssmify.atomic import atomic_directory, check_output_dir
from ssmify.convert.teacher import load_config, load_teacher, resolve_dtype
from ssmify.errors import SsmifyError
from ssmify.export.card import model_card
from ssmify.export.checks import choose_target
from ssmify.export.engine_rules import llamacpp_cuda_warnings
from ssmify.export.engines.verify import engines_to_verify, verify_in_engines
from ssmify.export.expand import expand_kv_width
from ssmify.export.padding import pad_state as zero_pad_state
from ssmify.export.spec import read_student
from ssmify.export.targets import TARGETS
from ssmify.export.verify import TOLERANCE, verify_parity
from ssmify.version import version

log = logging.getLogger(__name__)


def export(
    student: str | os.PathLike | PreTrainedModel,
    target: str = "auto",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
    verify_engine: str | None = None,
    pad_state: int | None = None,
) -> Path:
    """Write `student` to `out` as a checkpoint of a native transformers architecture; return `out`.

    student: a student folder (from convert or distill) or a loaded student model (then pass its
    `tokenizer`, if it should travel with the export). target: "auto" (the target that the most engines
    run exactly; `checks.choose_target`), an engine ("vllm", "llama.cpp": a target it runs exactly) or a
    target's name. A student that the target cannot hold exactly is refused with the reason. The folder
    is written atomically, loaded back and compared with the student (`verify_parity`: full-forward
    logits, cached decoding and RoPE, exact in float64 and within float32 rounding as saved); if they
    differ, nothing is written. verify_engine: "vllm", "llama.cpp", "all" or a comma-separated list: also
    run the export in those engines (`engines.verify`) before it is written, and refuse it if they differ.
    pad_state: zero-pad every mixer's d_state to this size (exact; llama.cpp's CUDA scan runs only 96, 128
    and 256).
    """
    if out is None:
        raise SsmifyError("--out: say where the export goes")
    check_output_dir(out, overwrite)

    if isinstance(student, PreTrainedModel):
        source = _in_memory_name(student)
        config = student.config
        name = choose_target(config, target)
        engines = engines_to_verify(verify_engine, TARGETS[name], config)
        model, dtype = student, next(student.parameters()).dtype
    else:
        source = str(student)
        config = load_config(source)  # refuse from config.json alone, before the weights load
        name = choose_target(config, target)
        engines = engines_to_verify(verify_engine, TARGETS[name], config)
        model, loaded_tokenizer = load_teacher(source, dtype=torch.float32)
        tokenizer = tokenizer or loaded_tokenizer
        dtype = resolve_dtype(str(config.dtype).removeprefix("torch.")) if config.dtype else torch.float32

    chosen = TARGETS[name]
    running = chosen.engines_running(config)
    log.info(
        "exporting to %s (--to %s); engines that run it exactly: %s",
        name,
        target,
        ", ".join(running) or "none",
    )
    # The comparison starts from fp32 (then float64); a half-precision student is compared through an fp32 copy.
    reference = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    was_training = reference.training
    reference.eval()
    try:
        spec = expand_kv_width(read_student(reference))
        if pad_state is not None:
            if pad_state < spec.mixer.d_state:
                raise SsmifyError(
                    f"--pad-state {pad_state} is below the student's d_state {spec.mixer.d_state}"
                )
            spec = zero_pad_state(spec, pad_state)
        if "llama.cpp" in running:
            for warning in llamacpp_cuda_warnings(config, spec.mixer.d_state):
                log.warning("%s: on a GPU those ops fall back to the CPU", warning)
        export_config, weights = chosen.build(spec)
        export_config.dtype = dtype
        weights = {key: value.to(dtype).contiguous() for key, value in weights.items()}
        with atomic_directory(out, overwrite=overwrite) as staging:
            export_config.save_pretrained(staging)
            save_torch_state_dict(weights, staging, max_shard_size="2GB")
            if model.generation_config is not None:
                model.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            exported = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).to(reference.device)
            report = {
                "student": source,
                "target": name,
                "architecture": chosen.architecture,
                "attention_layers": spec.attention_layers,
                "export_attention_layers": chosen.layer_plan(spec)[1],
                "d_state": spec.mixer.d_state,
                "dtype": str(dtype).removeprefix("torch."),
                "parity": verify_parity(reference, exported.eval()),
                "tolerance": TOLERANCE,
                "engines_that_run_it": running,
                "engines": verify_in_engines(_as_stored(reference, dtype), staging, engines)
                if engines
                else {},
                "ssmify_version": version(),
            }
            (staging / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (staging / "README.md").write_text(model_card(chosen, spec, source, report))
    finally:
        reference.train(was_training)
    parity = report["parity"]
    log.info(
        "exported %s to %s as %s; max |logit difference| in float64 %.1e (forward), %.1e (cached decoding); "
        "in float32 %.1e, %.1e (largest |logit| %.1f)",
        source,
        out,
        chosen.architecture,
        parity["float64"]["forward"],
        parity["float64"]["decode"],
        parity["float32"]["forward"],
        parity["float32"]["decode"],
        parity["logit_scale"],
    )
    if tokenizer is None:
        log.warning(
            "%s has no tokenizer: pass one, or copy the teacher's tokenizer files next to the export", out
        )
    return Path(out)


def _as_stored(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The float32 student with its weights rounded to the export's storage dtype: what an engine that
    upcasts the export to float32 computes, so that the engine comparison measures the engine alone."""
    if dtype == torch.float32:
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(dtype).float())
    return rounded


def _in_memory_name(student: PreTrainedModel) -> str:
    """The folder a loaded student came from; a freshly converted one still carries its teacher's path."""
    path = getattr(student, "name_or_path", "")
    teacher = (
        student.config.ssmify.get("provenance", {}).get("teacher")
        if hasattr(student.config, "ssmify")
        else None
    )
    return path if path and path != teacher else "<in-memory student>"
