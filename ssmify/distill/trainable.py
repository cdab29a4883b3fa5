"""Which parameters a stage trains: the mixers, the converted blocks, everything, or LoRA adapters (peft)."""

from __future__ import annotations

from torch import nn

from ssmify.distill.recipe import LoraTrainable
from ssmify.errors import SsmifyError


def converted_mixers(student: nn.Module) -> dict[int, nn.Module]:
    """Converted layer index -> mixer; an error if the model has none (it is not a converted student)."""
    from ssmify.convert.student import is_student, mixer_layers

    mixers = mixer_layers(student) if is_student(student) else {}
    if not mixers:
        name = getattr(student.config, "name_or_path", "") or type(student).__name__
        raise SsmifyError(f"student {name}: it has no converted (mixer) layers; run ssmify convert first")
    return mixers


def converted_blocks(student: nn.Module) -> dict[int, nn.Module]:
    """Converted layer index -> the whole decoder block that holds its mixer."""
    from ssmify.convert.adapters import get_adapter

    layers = get_adapter(student.config.ssmify["base_model_type"]).decoder_layers(student)
    return {i: layers[i] for i in converted_mixers(student)}


def apply_trainable(
    student: nn.Module, trainable: str | LoraTrainable, stage_name: str = "logits", where: str = "trainable"
) -> nn.Module:
    """Set requires_grad for the stage; returns the module to train (a peft model for LoRA).

    `where` is the recipe field that errors name, e.g. stages.2.trainable."""
    if trainable == "all":
        return student.requires_grad_(True)
    student.requires_grad_(False)
    if trainable == "mixers":
        for mixer in converted_mixers(student).values():
            mixer.requires_grad_(True)
        return student
    if trainable == "blocks":
        for block in converted_blocks(student).values():
            block.requires_grad_(True)
        return student
    from ssmify.distill.lora import apply_lora

    return apply_lora(student, trainable.lora, stage_name, where)
