"""What each serving engine needs of an export to run it exactly, read from the student's config.

Each rule comes from a run (DESIGN.md, "Serving engines") and is checked by the tests marked `engines`,
which run exports in the engines themselves. A target lists the engines that implement its architecture
(`ExportTarget.engines`); these rules say when such an engine still cannot run a given student.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from ssmify.export.padding import pad_to_width
from ssmify.export.spec import head_dim, mixer_config, rotary_factor

ENGINE_NAMES = ("vllm", "llama.cpp")
# vLLM 0.32's CPU attention backend (cpu_attn.py, get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# (target, engine): why that engine does not run that architecture at all.
NOT_RUN = {
    ("bamba", "vllm"): "vLLM removed its Bamba implementation in June 2026 (last in v0.23)",
    (
        "granitemoehybrid",
        "llama.cpp",
    ): "llama.cpp's converter keeps RoPE only for BambaForCausalLM, so it would drop this export's RoPE",
    ("falcon_h1", "llama.cpp"): "no test has run a Falcon-H1 export in llama.cpp yet",
}


def vllm_problems(config: PreTrainedConfig) -> list[str]:
    """vLLM-CPU: every export keeps at least one attention layer, whose head size its CPU backend must have."""
    size = head_dim(config)
    if size not in VLLM_CPU_HEAD_SIZES:
        return [f"vLLM's CPU attention runs head_dim {list(VLLM_CPU_HEAD_SIZES)}, and this one's is {size}"]
    return []


def llamacpp_problems(config: PreTrainedConfig) -> list[str]:
    """Stock llama.cpp's granite-hybrid (the Bamba architecture): expand 2, no mixer biases, Llama head size."""
    mixer, problems = mixer_config(config), []
    if mixer.bias:
        problems.append("its mixers have in_proj/out_proj biases, and llama.cpp's Mamba-2 layer has none")
    if pad_to_width(mixer, 2 * config.hidden_size) is None:
        problems.append(
            f"its mixer width {mixer.n_heads * mixer.head_dim} cannot be padded with whole groups of heads to "
            f"2 * hidden_size = {2 * config.hidden_size}, the only width llama.cpp runs"
        )
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        problems.append(
            f"its head_dim {head_dim(config)} is not hidden_size / num_attention_heads, and llama.cpp's "
            "converter ignores head_dim for Granite models"
        )
    if rotary_factor(config) != 1.0 and config.ssmify["attention_layers"]:
        problems.append("its attention uses partial RoPE, which no test has run in llama.cpp")
    if config.vocab_size % 8:
        problems.append(
            f"its vocab_size {config.vocab_size} is not a multiple of 8, and llama.cpp's converter pads it "
            "with tokens of logit 0"
        )
    return problems


RULES = {"vllm": vllm_problems, "llama.cpp": llamacpp_problems}


def engine_problems(
    target: str, engines: tuple[str, ...], config: PreTrainedConfig, engine: str
) -> list[str]:
    """Why `engine` would not run this student exported to `target` exactly; [] if it would."""
    if engine not in engines:
        return [NOT_RUN.get((target, engine), f"{engine} does not run {target}")]
    return RULES[engine](config)


def llamacpp_cuda_warnings(config: PreTrainedConfig, d_state: int) -> list[str]:
    """Where llama.cpp's CUDA build would run this export's Mamba-2 ops on the CPU instead (read from its
    source, not run: no GPU here): SSM_SCAN needs d_state 96, 128 or 256 and head_dim % 16 == 0; SSM_CONV
    needs its channel count (d_inner + 2 * n_groups * d_state, after padding to expand 2) % 128 == 0."""
    mixer, warnings = mixer_config(config), []
    if d_state not in (96, 128, 256) or mixer.head_dim % 16:
        warnings.append(
            f"llama.cpp's CUDA SSM scan runs d_state 96/128/256 with head_dim % 16 == 0, and this export has "
            f"d_state {d_state}, head_dim {mixer.head_dim} (--pad-state 128 pads d_state exactly)"
        )
    padding = pad_to_width(mixer, 2 * config.hidden_size)
    if padding is not None:
        channels = 2 * config.hidden_size + 2 * padding.n_groups * d_state
        if channels % 128:
            warnings.append(
                f"llama.cpp's CUDA SSM conv needs channels % 128 == 0, and this export has {channels}"
            )
    return warnings
