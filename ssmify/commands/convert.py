"""`ssmify convert TEACHER --out DIR ...`"""

from __future__ import annotations

import argparse

from ssmify.errors import SsmifyError


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices like 3,7,11, got {text!r}"
        ) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="turn a transformer into a seeded SSM or hybrid student",
        description="Replace attention layers of a Hugging Face causal LM by Mamba mixers seeded from their weights.",
    )
    p.add_argument("teacher", help="local HF folder, hub id, or .gguf file")
    p.add_argument("--out", required=True, help="output folder for the student")
    p.add_argument("--mixer", default="mamba2", help="mamba2 (default), discrete_mamba2 or gated_deltanet")
    p.add_argument(
        "--mixer-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mixer setting, repeatable: d_conv=N (any mixer), allow_neg_eigval=true (gated_deltanet)",
    )
    p.add_argument(
        "--mixer-width",
        default="full",
        help="full (default): x and B for every query head; kv: x and B at the teacher's key/value width, "
        "shared by the query heads as GQA shares keys and values (gated_deltanet: k and v)",
    )
    p.add_argument(
        "--gate",
        default="z",
        help="mamba2's output gate: z (default; in_proj/out_proj biases), mean (no bias, so that llama.cpp "
        "holds it; seeded along the mean input direction) or none (no gate; cannot be exported)",
    )
    plan = p.add_mutually_exclusive_group()
    plan.add_argument("--attention-layers", type=_layer_list, help="layers that keep attention, e.g. 3,7,11")
    plan.add_argument(
        "--keep-attention",
        type=float,
        help="fraction of layers that keep attention (0 = pure SSM); --layer-choice says which",
    )
    plan.add_argument(
        "--attention-heads",
        help="KV groups that keep attention, as layer:kv_group, e.g. 3:0,7:2,9:all (a head-level hybrid; "
        "LAYER:all keeps the whole layer)",
    )
    plan.add_argument(
        "--keep-heads",
        type=float,
        help="KV heads that keep attention model-wide: a count (>= 1) or a fraction (< 1), chosen by "
        "induction copy mass, a quarter by previous-token mass below those (a head-level hybrid)",
    )
    plan.add_argument(
        "--kv-budget-mib",
        type=float,
        help="keep as many KV heads (chosen as by --keep-heads) as fit in this many MiB of KV cache at --context",
    )
    p.add_argument(
        "--context", type=int, default=2048, help="context length for --kv-budget-mib (default 2048)"
    )
    p.add_argument(
        "--layer-choice",
        default="even",
        help="with --keep-attention: even (spread evenly, default), or the layers whose seeded mixer costs "
        "the teacher most: sensitive (loss), kl (KL to the teacher), retrieval (induction and passkey "
        "accuracy), auto (kl and retrieval); one forward pass per layer, cached",
    )
    p.add_argument("--init", default="seeded", help="seeded (from attention, default) or random")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 for the saved weights")
    p.add_argument("--calibration-text", default=None, help="text file for calibration (default: built in)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the teacher's own modeling code")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssmify.convert import convert
    from ssmify.convert.convert import describe_parameters

    student = convert(
        args.teacher,
        out=args.out,
        mixer=args.mixer,
        mixer_options=parse_mixer_options(args.mixer_option),
        attention_layers=args.attention_layers,
        keep_attention=args.keep_attention,
        layer_choice=args.layer_choice,
        init=args.init,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        calibration_text=args.calibration_text,
        mixer_width=args.mixer_width,
        gate=args.gate,
        attention_heads=args.attention_heads,
        keep_heads=args.keep_heads,
        kv_budget_mib=args.kv_budget_mib,
        context=args.context,
    )
    report = student.convert_report
    if report is None:
        raise SsmifyError("conversion produced no report")
    heads = (
        f" and {report['kv_heads_kept']} of {report['kv_heads_total']} KV heads"
        if "kv_heads_kept" in report
        else ""
    )
    print(
        f"{args.out}: {report['family']} -> {report['mixer']} ({report['init']}), "
        f"attention kept in {len(report['attention_layers'])} of "
        f"{len(report['attention_layers']) + len(report['converted_layers'])} layers{heads}; "
        f"perplexity before training {report['student_perplexity']:.2f} "
        f"(teacher {report['teacher_perplexity']:.2f}); {report['seconds']:.1f} s"
    )
    print(f"parameters: {describe_parameters(report['parameters'])}")
    return 0


def parse_mixer_options(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` strings -> a dict; VALUE is read as YAML (so `true` is a bool and `3` an int)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SsmifyError(f"--mixer-option: {item!r} is not KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value)
    return options
