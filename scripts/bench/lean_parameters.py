"""Parameters of lean students: each mixer beside the attention it replaces, and the pure-SSM student
beside its teacher, for every --mixer-width (full, kv) and --gate (z, mean, none) of mamba2, and both
widths of gated_deltanet, side by side in one run.

    python scripts/bench/lean_parameters.py                  # SmolLM2-135M-Instruct
    python scripts/bench/lean_parameters.py --teacher DIR    # any teacher folder convert takes
    python scripts/bench/lean_parameters.py --quick          # a tiny random GQA llama (tests/test_bench.py)

Every student is a pure SSM (every attention layer a mixer) built as `ssmify convert` builds it,
with the counts from `convert`'s own `parameter_counts`. Counts do not depend on the init, so the
students are left unseeded (seeding 30 layers six times takes most of an hour on 2 shared cores).
It prints a markdown table, and with --json the same rows as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ssmify.convert.build import seeded_student
from ssmify.convert.convert import parameter_counts
from ssmify.convert.plan import LayerPlan
from ssmify.convert.seed import GATES, WIDTHS
from ssmify.convert.student import mixer_layers


def quick_teacher() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


STUDENTS = [("mamba2", width, gate) for width, gate in itertools.product(WIDTHS, GATES)] + [
    ("gated_deltanet", width, "z") for width in WIDTHS
]


def rows(teacher: torch.nn.Module) -> list[dict]:
    """One row per (mixer, width, gate): mixer and attention parameters of layer 0, student and teacher
    totals."""
    plan = LayerPlan(teacher.config.num_hidden_layers, [])
    out = []
    for mixer, width, gate in STUDENTS:
        student = seeded_student(teacher, plan, mixer, "random", torch.empty(0), width=width, gate=gate)
        counts = parameter_counts(teacher, student, plan.converted)
        layer = counts["layers"]["0"]
        out.append(
            {
                "mixer": mixer,
                "width": width,
                "gate": gate,
                "bias": mixer_layers(student)[0].config.bias,  # in_proj/out_proj (GDN: q/k/v/out_proj)
                "mixer_parameters": layer["mixer"],
                "attention": layer["attention"],
                "mixer_per_attention": counts["mixers_per_attention"],
                "student": counts["student"],
                "teacher": counts["teacher"],
                "student_per_teacher": counts["student_per_teacher"],
            }
        )
        del student
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| --mixer | --mixer-width | --gate | projection biases | mixer params / layer "
        "| attention params / layer | mixer / attention | pure-SSM student | teacher | student / teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['mixer']} | {r['width']} | {r['gate']} | {'yes' if r['bias'] else 'no'} "
            f"| {r['mixer_parameters']:,} | {r['attention']:,} "
            f"| {r['mixer_per_attention']:.3f}x | {r['student']:,} | {r['teacher']:,} "
            f"| {r['student_per_teacher']:.4f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quick", action="store_true", help="a tiny random llama instead")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    if args.quick:
        teacher = quick_teacher()
    else:
        from ssmify.assets import smollm2_teacher_dir
        from ssmify.convert.teacher import load_teacher

        teacher, _ = load_teacher(args.teacher or smollm2_teacher_dir(), dtype=torch.float32)
        teacher.eval()
    results = rows(teacher)
    print(table(results))
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
