"""LoRA adapters (peft) in the hidden and logits stages, with the mixers' own parameters trained beside them.

Targets are resolved here to the full dotted paths of Linear layers, and peft gets that explicit
list. So a name that matches nothing is an error that names the field, not a peft traceback; in
the hidden stage the adapters go only into the converted blocks, the only modules its loss sees;
and layers whose weights the mixers read directly (conv1d) can never become silent no-op targets.

`mixer_extras`: a mixer's A_log, dt_bias and D are Parameters on the mixer module itself, and the
scan reads conv1d's and the norms' `.weight` directly instead of calling those modules. peft's
`modules_to_save` wraps whole modules in a copy that only a module call reaches, so it can neither
name a bare Parameter nor stand in for a weight read directly. The preset instead sets requires_grad
on those parameters in place, after get_peft_model (which freezes all that is not an adapter). As
base weights they are in every accelerate checkpoint (the objective's whole state dict) and so
resume exactly; a merge leaves them as trained; and the adapter folder holds them in a file of their
own (`MIXER_EXTRAS_FILE`) beside peft's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ssmify.distill.recipe import MIXER_EXTRAS, LoraOptions, LoraTrainable, Recipe
from ssmify.errors import SsmifyError

ADAPTER_DIR = "adapter"
MIXER_EXTRAS_FILE = "mixer_extras.safetensors"


@dataclass(frozen=True)
class LoraPlan:
    """What a LoRA stage trains, as dotted paths in the student: adapted Linears, wrapped modules, extras."""

    targets: list[str]
    modules_to_save: list[str]
    extras: list[str]


def converted_block_paths(student: nn.Module) -> list[str]:
    """Dotted paths of the decoder blocks whose attention was converted into a mixer."""
    from ssmify.distill.trainable import converted_blocks

    blocks = {id(block) for block in converted_blocks(student).values()}
    return [name for name, module in student.named_modules() if id(module) in blocks]


def _within(name: str, scope: list[str] | None) -> bool:
    return scope is None or any(name == p or name.startswith(p + ".") for p in scope)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def mixer_paths(student: nn.Module) -> list[str]:
    """Dotted paths of the converted mixers."""
    from ssmify.distill.trainable import converted_mixers

    mixers = {id(mixer) for mixer in converted_mixers(student).values()}
    return [name for name, module in student.named_modules() if id(module) in mixers]


def _adapted_or_linear(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, (nn.Linear, BaseTunerLayer))


def mixer_extra_names(student: nn.Module) -> list[str]:
    """The `mixer_extras` preset: every mixer parameter outside its Linear layers (A_log, dt_bias, D,
    conv1d, norms, z_bias), before or after adapters are placed."""
    names = []
    for path in mixer_paths(student):
        mixer = student.get_submodule(path)
        for name, _ in mixer.named_parameters():
            parts = name.split(".")[:-1]
            owners = [mixer.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
            if not any(_adapted_or_linear(owner) for owner in owners):
                names.append(f"{path}.{name}")
    return names


def resolve_targets(
    student: nn.Module, options: LoraOptions, scope: list[str] | None, where: str
) -> list[str]:
    """The Linear layers that get adapters; an error naming `where`.target_modules if a name finds none.

    "all-linear" leaves out the output head, as peft does; a name or expression may still pick it."""
    head = student.get_output_embeddings()
    linears = [
        name
        for name, module in student.named_modules()
        if isinstance(module, nn.Linear) and _within(name, scope)
    ]
    place = "the student" if scope is None else "the converted blocks"
    targets = options.target_modules
    if targets == "all-linear":
        found = [n for n in linears if student.get_submodule(n) is not head]
    elif isinstance(targets, str):
        found = [n for n in linears if re.fullmatch(targets, n)]
    else:
        known = sorted({n.rsplit(".", 1)[-1] for n in linears})
        for pattern in targets:
            if not any(_matches(n, pattern) for n in linears):
                raise SsmifyError(
                    f"{where}.target_modules: {pattern!r} matches no Linear layer in {place} "
                    f"(Linear layer names there: {', '.join(known)})"
                )
        found = [n for n in linears if any(_matches(n, p) for p in targets)]
    if not found:
        hint = " (a string is a regular expression over whole dotted paths; list names as [a, b])"
        raise SsmifyError(
            f"{where}.target_modules: {targets!r} matches no Linear layer in {place}"
            + (hint if isinstance(targets, str) else "")
        )
    return found


def check_untied(student: nn.Module, names: list[str], where: str) -> None:
    """Refuse an adapter on, or a trained copy of, an embedding that the output head shares: the saved
    student would tie them again and lose the change (or, merged, apply it to both)."""
    if not getattr(student.config, "tie_word_embeddings", False):
        return
    tied = {id(student.get_input_embeddings()), id(student.get_output_embeddings())}
    for name in names:
        if id(student.get_submodule(name)) in tied:
            raise SsmifyError(
                f"{where}: {name} shares its weight with the "
                f"{'input embeddings' if name.endswith('lm_head') else 'output head'} (tie_word_embeddings); "
                "leave it out"
            )


def plan_lora(student: nn.Module, options: LoraOptions, stage_name: str, where: str) -> LoraPlan:
    """Resolve a stage's LoRA settings against the student (a real or a meta-device one)."""
    scope = converted_block_paths(student) if stage_name == "hidden" else None
    targets = resolve_targets(student, options, scope, f"{where}.lora")
    check_untied(student, targets, f"{where}.lora.target_modules")
    mixers = mixer_paths(student)
    names = options.modules_to_save
    if names is None:
        names = [MIXER_EXTRAS] if any(_within(t, mixers) for t in targets) else []
    saved: list[str] = []
    modules = [name for name, _ in student.named_modules() if name and _within(name, scope)]
    for pattern in names:
        if pattern == MIXER_EXTRAS:
            continue
        found = [n for n in modules if _matches(n, pattern)]
        if not found:
            raise SsmifyError(
                f"{where}.lora.modules_to_save: {pattern!r} matches no module in "
                f"{'the student' if scope is None else 'the converted blocks'} (or use the preset {MIXER_EXTRAS})"
            )
        for name in found:
            if _within(name, mixers):
                raise SsmifyError(
                    f"{where}.lora.modules_to_save: {pattern!r} is inside a mixer ({name}); "
                    f"the preset {MIXER_EXTRAS} trains the mixers' own parameters"
                )
            if any(_within(t, [name]) or _within(name, [t]) for t in targets):
                raise SsmifyError(
                    f"{where}.lora.modules_to_save: {pattern!r} ({name}) overlaps a LoRA target; "
                    "a module is either adapted or trained fully"
                )
        saved.extend(found)
    check_untied(student, saved, f"{where}.lora.modules_to_save")
    extras = mixer_extra_names(student) if MIXER_EXTRAS in names else []
    return LoraPlan(targets, saved, extras)


def apply_lora(student: nn.Module, options: LoraOptions, stage_name: str, where: str) -> nn.Module:
    """Wrap `student` in a peft model with the stage's adapters, modules to save and mixer extras trainable."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import ModulesToSaveWrapper

    plan = plan_lora(student, options, stage_name, where)
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=plan.targets,
        modules_to_save=plan.modules_to_save or None,
    )
    model = get_peft_model(student, config)
    wrapped = sorted(n for n, m in student.named_modules() if isinstance(m, ModulesToSaveWrapper))
    if wrapped != sorted(plan.modules_to_save):
        raise SsmifyError(f"{where}.lora.modules_to_save: peft wrapped {wrapped}, not {plan.modules_to_save}")
    for name in plan.extras:
        student.get_parameter(name).requires_grad_(True)
    return model


def save_adapter(model: nn.Module, folder: Path) -> None:
    """peft's adapter files (adapter_config.json, adapter_model.safetensors) and the trained mixer extras.

    To rebuild the merged stage from its start student: load MIXER_EXTRAS_FILE into it
    (`load_state_dict(..., strict=False)`), then `PeftModel.from_pretrained(student, folder)`.
    """
    from safetensors.torch import save_file

    model.save_pretrained(str(folder))
    base = model.get_base_model()
    extras = {n: base.get_parameter(n).detach().contiguous() for n in mixer_extra_names(base)}
    trained = {n: t for n, t in extras.items() if base.get_parameter(n).requires_grad}
    if trained:
        save_file(trained, str(folder / MIXER_EXTRAS_FILE))


def merged(model: nn.Module) -> nn.Module:
    """A plain model: LoRA adapters folded into the base weights, the peft wrapper removed."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def check_lora_stages(recipe: Recipe, student_dir: Path) -> None:
    """Resolve every LoRA stage's settings against the student's layout (built on the meta device, no
    weights), so that a bad target stops the run before any stage trains."""
    stages = [(i, s) for i, s in enumerate(recipe.stages) if isinstance(s.trainable, LoraTrainable)]
    if not stages:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ssmify.convert.student import register

    register()
    config = AutoConfig.from_pretrained(str(student_dir))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for index, stage in stages:
        plan_lora(skeleton, stage.trainable.lora, stage.name, f"stages.{index}.trainable")
