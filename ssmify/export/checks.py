"""Whether a student can be exported exactly, and to which targets; every rule reads the student's config.

An export must compute what the student computes, so anything a target cannot express is a refusal
with the reason, never an approximation. The rules every target shares are here; each target adds its
own (`ExportTarget.problems`). After writing, `verify.py` checks the numbers as well.
"""

from __future__ import annotations

from transformers import PreTrainedConfig, PreTrainedModel

from ssmify.convert.student import MODEL_TYPE
from ssmify.errors import SsmifyError
from ssmify.export.engine_rules import ENGINE_NAMES
from ssmify.export.spec import mixer_config
from ssmify.export.targets import TARGETS

# Families whose decoder block is the Llama block: RMSNorm -> attention -> residual -> RMSNorm ->
# SiLU-gated MLP -> residual, no scaling anywhere. Qwen3 adds q/k norms (a rule below).
LLAMA_BLOCK_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
OTHER_STRUCTURE = {
    "gemma2": "norms after attention and after the MLP, soft-capped logits, scaled embeddings and a GELU MLP",
    "phi": "LayerNorm with bias, attention and MLP in parallel from one norm, and a non-gated GELU MLP",
    "gpt2": "LayerNorm with bias, learned absolute positions and a non-gated GELU MLP",
    "gpt_neox": "LayerNorm with bias, a parallel residual and a non-gated GELU MLP",
}
EXPORTABLE = (
    f"mamba2 students of llama-family teachers (llama, SmolLM, mistral, qwen2, phi3) to {', '.join(TARGETS)}"
)


def student_problems(config: PreTrainedConfig) -> list[str]:
    """Why no target can hold this student exactly, whatever the target; [] if that is not the case."""
    block = getattr(config, MODEL_TYPE, None)
    if config.model_type != MODEL_TYPE or not isinstance(block, dict):
        return [f"it is not an ssmify student (model_type {config.model_type!r}); run ssmify convert first"]
    family = block["base_model_type"]
    if family not in LLAMA_BLOCK_FAMILIES:
        return [f"its {family} blocks have {OTHER_STRUCTURE.get(family, 'a structure no target has')}"]
    problems = []
    if block["mixer"] == "gated_deltanet":
        problems.append(
            f"its mixer is gated_deltanet, and no native transformers architecture holds a Gated DeltaNet "
            f"student of a {family} teacher: OLMo-Hybrid, the one with GDN layers, has no biases on them (a "
            "seeded student's gate and beta need g_proj and b_proj biases) and OLMo-2 post-norm attention "
            "blocks, so it would need a GDN without those biases and, to keep attention, an OLMo-family "
            "teacher, which ssmify does not convert yet"
        )
    elif block["mixer"] != "mamba2":
        problems.append(
            f"its mixer is {block['mixer']} (no conv activation, no gated norm, A fixed at -1), and every "
            "target's mixer is mamba2"
        )
    else:
        problems += _mixer_problems(config)
    if config.hidden_act != "silu":
        problems.append(
            f"its hidden_act is {config.hidden_act!r}, and every target uses hidden_act for both the MLP and "
            "the mixer's conv, which is SiLU"
        )
    kept = sorted(block["attention_layers"])
    windowed = [i for i in kept if _narrow_window(config, i)]
    if windowed:
        problems.append(
            f"its attention layers {windowed} see only the last {_narrow_window(config, windowed[0])} tokens "
            f"(sliding_window) of max_position_embeddings {config.max_position_embeddings}, and every "
            "target's attention is full; keep no attention layer, or only full ones"
        )
    if family == "qwen3" and kept:
        problems.append(
            f"its attention layers {kept} normalise queries and keys (q_norm, k_norm), which no target does"
        )
    return problems


def _mixer_problems(config: PreTrainedConfig) -> list[str]:
    mixer = mixer_config(config)
    problems = []
    if mixer.gate == "none":
        problems.append(
            "its mixers have no output gate (mixer_config.gate 'none'), and every target's Mamba-2 gates "
            "its norm with silu(z); convert with --gate z or --gate mean to export"
        )
    if mixer.bc_norm:
        problems.append(
            f"its mixers normalise B and C (mixer_config.bc_norm {mixer.bc_norm!r}, from the teacher's "
            "q/k norms), which no target's mixer does"
        )
    if mixer.norm_eps != config.rms_norm_eps:
        problems.append(
            f"its mixer norm_eps {mixer.norm_eps} differs from rms_norm_eps {config.rms_norm_eps}, and every "
            "target uses rms_norm_eps for the mixer's gated norm"
        )
    if mixer.dt_limit is not None and tuple(mixer.dt_limit) != (0.0, float("inf")):
        problems.append(
            f"its mixer clamps dt to {tuple(mixer.dt_limit)} (mixer_config.dt_limit), and the targets "
            "clamp only in their chunked path, not when decoding"
        )
    if mixer.d_model != config.hidden_size:
        problems.append(f"its mixer d_model {mixer.d_model} is not hidden_size {config.hidden_size}")
    return problems


def _narrow_window(config: PreTrainedConfig, layer: int) -> int | None:
    """The sliding window of attention layer `layer` if it is shorter than max_position_embeddings, else None.

    The window applies per layer where the config has layer_types (Qwen2, Qwen3), to every layer otherwise
    (Mistral, Phi-3). A window at least as long as the context is full attention.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and layer_types[layer] != "sliding_attention"):
        return None
    return window if window < config.max_position_embeddings else None


def exportable_targets(student: PreTrainedModel | PreTrainedConfig) -> list[str]:
    """The targets that can hold `student` exactly, in `--to auto` order."""
    config = getattr(student, "config", student)
    if student_problems(config):
        return []
    return [name for name, target in TARGETS.items() if not target.problems(config)]


def check_exportable(student: PreTrainedModel | PreTrainedConfig, target: str) -> None:
    """Raise a one-line SsmifyError saying why `student` cannot be exported exactly to `target`
    ("auto": to any target), and what can be exported; return None if it can."""
    config = getattr(student, "config", student)
    if target != "auto" and target not in TARGETS and target not in ENGINE_NAMES:
        raise SsmifyError(
            f"--to: {target!r} is not a target; choose auto, an engine ({', '.join(ENGINE_NAMES)}) or one of "
            f"{', '.join(TARGETS)}"
        )
    problems = student_problems(config)
    if problems:
        raise SsmifyError(f"cannot export this student: {'; '.join(problems)}. ssmify exports {EXPORTABLE}")
    if target in ENGINE_NAMES:
        if not targets_for_engine(config, target):
            reasons = "; ".join(
                f"{name}: {'; '.join(t.problems(config) + t.engine_problems(config, target))}"
                for name, t in TARGETS.items()
            )
            raise SsmifyError(
                f"cannot export this student for {target}: no target runs it exactly there ({reasons})"
            )
        return
    if target == "auto":
        if not exportable_targets(config):
            reasons = "; ".join(f"{name}: {'; '.join(t.problems(config))}" for name, t in TARGETS.items())
            raise SsmifyError(f"no target can hold this student exactly ({reasons})")
        return
    problems = TARGETS[target].problems(config)
    if problems:
        others = exportable_targets(config)
        alternative = (
            f"it can be exported to {', '.join(others)}" if others else "no other target fits either"
        )
        raise SsmifyError(f"cannot export this student to {target}: {'; '.join(problems)}; {alternative}")


def targets_for_engine(student: PreTrainedModel | PreTrainedConfig, engine: str) -> list[str]:
    """The targets whose export of `student` `engine` runs exactly, in `--to auto` order."""
    config = getattr(student, "config", student)
    return [name for name in exportable_targets(config) if not TARGETS[name].engine_problems(config, engine)]


def choose_target(student: PreTrainedModel | PreTrainedConfig, target: str = "auto") -> str:
    """The target to export to: `target` itself; for an engine name, the first target that engine runs
    exactly; for "auto", the target the most engines run exactly (the first of TARGETS on a tie)."""
    config = getattr(student, "config", student)
    mixed = (getattr(config, MODEL_TYPE, None) or {}).get("attention_heads")
    if mixed:
        raise SsmifyError(
            f"export: layers {', '.join(mixed)} mix attention and mixer heads, which no native transformers "
            "architecture holds; use the ssmify-native student folder (import ssmify; "
            "AutoModelForCausalLM.from_pretrained) instead"
        )
    check_exportable(config, target)
    if target in ENGINE_NAMES:
        return targets_for_engine(config, target)[0]
    if target == "auto":
        return max(exportable_targets(config), key=lambda name: len(TARGETS[name].engines_running(config)))
    return target
