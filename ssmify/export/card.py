"""The README.md model card of an export: what it is, how to load it, how exact it is, what serves it."""

from __future__ import annotations

from ssmify.cards import distillation_history, distillation_section, front_matter
from ssmify.export.base import ExportTarget
from ssmify.export.spec import StudentSpec


def model_card(target: ExportTarget, spec: StudentSpec, source: str, report: dict) -> str:
    parity = report["parity"]
    exact, served = parity["float64"], parity["float32"]
    teacher = spec.config.ssmify.get("provenance", {}).get("teacher", "unknown")
    family = spec.config.ssmify["base_model_type"]
    num_layers, attention = target.layer_plan(spec)
    kept = (
        f"attention is kept in layers {', '.join(map(str, spec.attention_layers))}, and the others hold"
        if spec.attention_layers
        else "every layer holds"
    )
    lines = [
        *front_matter(teacher if teacher != "unknown" else None, ["ssmify", "mamba2", "hybrid", target.name]),
        f"# {target.architecture} export of an ssmify student",
        "",
        f"Exported by ssmify from the student `{source}` (teacher `{teacher}`, a {family} model). This folder "
        f"is a native transformers `{target.architecture}` checkpoint (model_type `{target.name}`): plain "
        "transformers 5.x loads it, without ssmify and without `trust_remote_code`.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "## Layers",
        "",
        f"The student has {spec.num_layers} layers; {kept} a Mamba-2 mixer in place of attention. "
        "Embeddings, norms and MLPs are the teacher's.",
    ]
    if num_layers > spec.num_layers:
        lines += [
            "",
            f"Layer {attention[0]} is an identity layer: an attention layer and MLP whose weights are all zero, "
            "so it adds exactly 0. transformers 5.x cannot generate with a cache when a hybrid model has no "
            "attention layer; this one layer makes it work, for one layer's KV cache.",
        ]
    if not target.adds_identity_layer:
        lines += [
            "",
            f"{target.architecture} runs attention and a mixer side by side in every layer. In each layer "
            "the branch that the student does not use has all-zero weights and adds exactly 0, but it still "
            "keeps a KV cache and costs compute: this export keeps the student's outputs, not its speed.",
        ]
    lines += [
        "",
        "## Exactness",
        "",
        "Before this folder was written, it was loaded back and compared with the student on random token "
        f"windows (largest |logit| {parity['logit_scale']:.1f}). In float64, with transformers' float32 "
        "downcasts lifted so that both models compute in float64 throughout, the max |logit difference| was "
        f"{exact['forward']:.1e} in a full forward pass and {exact['decode']:.1e} in cached greedy decoding "
        f"(limit {exact['limits']['forward']:.1e}): the same function up to float64 rounding. In float32, "
        f"from the saved weights, it was {served['forward']:.1e} and {served['decode']:.1e} (limit "
        f"{served['limits']['forward']:.1e}): float32 rounding, which grows with the residual stream.",
        "",
        "## Serving",
        "",
        f"Engines that run this export exactly, by ssmify's engine tests: "
        f"{', '.join(report['engines_that_run_it']) or 'none'}. "
        + (
            "Run on this export (`--verify-engine`): "
            + "; ".join(
                f"{name} {run['versions']}, greedy tokens "
                + ", ".join(p["tokens_matched"] for p in run["prompts"])
                + f" on prompts of {', '.join(str(p['length']) for p in run['prompts'])} tokens"
                for name, run in report["engines"].items()
            )
            + "."
            if report.get("engines")
            else "ssmify has not run this export in an engine (`ssmify export --verify-engine all` does)."
        ),
    ]
    lines += distillation_section(distillation_history(source))
    return "\n".join(lines) + "\n"
