"""Which parameters a stage trains: the mixers, the mixers and the attention kept beside them, the kept
attention alone, the converted blocks, everything, or LoRA adapters (peft)."""

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


def kept_attention(student: nn.Module) -> list[nn.Module]:
    """The attention the student kept: whole attention layers, and in each mixed layer the kept KV
    groups' attention with the o_proj that all its heads share."""
    from ssmify.convert.adapters import get_adapter
    from ssmify.convert.mixed_layer import MixedAttention
    from ssmify.convert.student import MixerAttention

    adapter = get_adapter(student.config.ssmify["base_model_type"])
    found: list[nn.Module] = []
    for block in adapter.decoder_layers(student):
        attention = getattr(block, adapter.attention_attr)
        if isinstance(attention, MixedAttention):
            found += [attention.o_proj] + ([attention.attention] if attention.attention is not None else [])
        elif not isinstance(attention, MixerAttention):
            found.append(attention)
    return found


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
    if trainable == "mixers+attention":
        for module in [*converted_mixers(student).values(), *kept_attention(student)]:
            module.requires_grad_(True)
        return student
    if trainable == "attention":
        # The kept heads alone, the mixers frozen: a stage that should move where the kept heads look (a key
        # far back, say) without refitting the mixers, which carry most of the perplexity.
        kept = kept_attention(student)
        if not kept:
            raise SsmifyError(
                f"{where}: 'attention' trains the kept attention, and this student keeps none; use mixers"
            )
        for module in kept:
            module.requires_grad_(True)
        return student
    if trainable == "blocks":
        for block in converted_blocks(student).values():
            block.requires_grad_(True)
        return student
    from ssmify.distill.lora import apply_lora

    return apply_lora(student, trainable.lora, stage_name, where)
