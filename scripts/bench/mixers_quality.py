"""Mixer quality benchmark: mamba2 against gated_deltanet students, same layers kept, same training tokens.

For each plan (share of layers that keep attention: 0 = pure SSM, 0.5 = the 50% hybrid) and each mixer,
one student is converted from the teacher (`ssmify.convert.convert`, seeded and calibrated) and trained
by the real loop (`ssmify.distill.run_recipe`) on the demo recipe's stages (matrix -> hidden -> logits,
with its 10% synthetic lookup data), their token budgets scaled together to --tokens. The hybrid's kept
layers are chosen once, by --layer-choice with the mamba2 mixer (scores cached per teacher and text),
and both mixers keep exactly those. Every student is scored on the same held-out slice (perplexity
against the teacher's) and on the same induction and passkey samples at --lengths (retention = student /
teacher accuracy, `ssmify.eval.retrieval.against_teacher`); its decoding state per mixer layer is
counted, its parameters set against the teacher's, its training tokens/s read from the stage summaries,
and its decode tokens/s measured at --decode-context (`ssmify.eval.speed.measure`, batch 1, greedy).

--variants picks the mixer layouts (`convert`'s mixer_width/gate, as WIDTH/GATE): full/z is the default
student; kv/z, full/none, kv/none and kv/mean are the lean ones (gates other than z are mamba2's alone).

Results go to OUT/results.json after every student, so a killed run continues where it stopped.

    python scripts/bench/mixers_quality.py                    # SmolLM2-135M, 4 students, 25-30 min on 2 cores
    python scripts/bench/mixers_quality.py --tokens 20480     # two thirds of the recipe's budget: about 22 min
    python scripts/bench/mixers_quality.py --plans 0.5 --mixers mamba2 --variants full/z kv/z kv/none
    python scripts/bench/mixers_quality.py --quick --teacher DIR --train T.txt --heldout H.txt
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main
from retrieval import DEMO_RECIPE, retention, retrieval_scores, save_results  # noqa: E402

MIXERS = ("mamba2", "gated_deltanet")
DEFAULT_VARIANT = "full/z"


def run_name(plan: float, mixer: str, variant: str) -> str:
    """The run's key and folder: `50pct/mamba2`, `50pct/mamba2-kv-none` for a variant other than full/z."""
    name = f"{round(plan * 100)}pct/{mixer}"
    return name if variant == DEFAULT_VARIANT else f"{name}-{variant.replace('/', '-')}"


def parse_variant(variant: str) -> tuple[str, str]:
    """WIDTH/GATE -> (mixer_width, gate); a one-line error for anything else."""
    from ssmify.convert.seed import GATES, WIDTHS
    from ssmify.errors import SsmifyError

    width, _, gate = variant.partition("/")
    if width not in WIDTHS or gate not in GATES:
        raise SsmifyError(
            f"--variants: {variant!r} is not WIDTH/GATE with WIDTH in {', '.join(WIDTHS)} "
            f"and GATE in {', '.join(GATES)}"
        )
    return width, gate


def scaled_stages(stages: list[dict], tokens: int) -> list[dict]:
    """The stages with their token budgets scaled together to about `tokens` in all (whole batches, >= 1)."""
    total = sum(stage["tokens"] for stage in stages)
    out = []
    for stage in stages:
        batch = stage["global_batch_tokens"]
        share = round(stage["tokens"] * tokens / total / batch)
        out.append({**stage, "tokens": max(1, share) * batch})
    return out


def kept_layers(
    results: dict, plan: float, teacher_dir: Path, tokenizer, choice: str, out: Path
) -> list[int]:
    """The layers that keep attention under `plan`: none for 0, else --layer-choice's pick with mamba2."""
    from ssmify.convert import convert

    key = str(plan)
    if key not in results["layers"]:
        if plan == 0:
            results["layers"][key] = []
        else:
            student = convert(
                str(teacher_dir),
                keep_attention=plan,
                layer_choice=choice,
                tokenizer=tokenizer,
                mixer="mamba2",
            )
            results["layers"][key] = list(student.config.ssmify["attention_layers"])
        save_results(out / "results.json", results)
    return results["layers"][key]


def print_table(results: dict) -> None:
    lengths = results["lengths"]
    print(
        f"\nteacher: perplexity {results['teacher_perplexity']:.2f}; retrieval {json.dumps(results['teacher_retrieval'])}"
    )
    cells = [f"{t[:3]}@{n}" for t in ("induction", "passkey") for n in lengths]
    header = f"{'run':<34} | {'ppl x':>6} | {'params x':>8} | " + " | ".join(f"{c:>8}" for c in cells)
    header += " | " + " | ".join(f"{'ret@' + str(n):>8}" for n in lengths)
    header += f" | {'state B/layer':>13} | {'train tok/s':>11} | {'decode tok/s@' + str(results['decode_context']):>17}"
    print(header)
    print("-" * len(header))
    for name, run in results["runs"].items():
        row = f"{name:<34} | {run['perplexity_ratio']:>6.2f} | {run['parameters_ratio']:>8.3f} | "
        row += " | ".join(
            f"{run['retention']['by_task'][t][str(n)]:>8.2f}"
            if run["retention"]["by_task"][t].get(str(n)) is not None
            else f"{'-':>8}"
            for t in ("induction", "passkey")
            for n in lengths
        )
        by_length = run["retention"]["by_length"]
        row += " | " + " | ".join(
            f"{by_length[str(n)]:>8.2f}" if by_length.get(str(n)) is not None else f"{'-':>8}"
            for n in lengths
        )
        row += f" | {run['state_bytes_per_layer']:>13,} | {run['train_tokens_per_s']:>11.1f}"
        row += f" | {run['decode_tokens_per_s']:>17.1f}"
        print(row)
    print("(retention per task: student / teacher accuracy; '-' where the teacher scores under 50%;")
    print(" params x: student / teacher parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budgets and lengths")
    add_input_args(parser)
    parser.add_argument(
        "--recipe", type=Path, default=DEMO_RECIPE, help="stages to train (default: the demo's)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=30720,
        help="training tokens per student, all stages (default: the recipe's)",
    )
    parser.add_argument("--plans", type=float, nargs="+", default=[0.0, 0.5], help="keep_attention values")
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[DEFAULT_VARIANT],
        help="mixer layouts as WIDTH/GATE (full|kv / z|mean|none), e.g. full/z kv/z kv/none kv/mean",
    )
    parser.add_argument("--layer-choice", default="retrieval", help="how the hybrid's kept layers are chosen")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048], help="retrieval context lengths"
    )
    parser.add_argument("--samples", type=int, default=4, help="retrieval samples per task and length")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--decode-context", type=int, default=4096, help="context before the timed decode")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/mixers_quality")
    parser.add_argument("--keep-students", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.layer_choice, args.lengths, args.samples = 1, "even", [128], 2
        args.eval_tokens, args.eval_seq_len, args.decode_context, args.decode_tokens = 256, 64, 64, 2

    quiet_offline()
    from ssmify.convert import convert, mixer_layers
    from ssmify.convert.convert import check_lean_options
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.recipe import parse_recipe, stage_dir_name
    from ssmify.distill.run import run_recipe
    from ssmify.distill.students import load_student
    from ssmify.errors import SsmifyError
    from ssmify.eval.data import load_data
    from ssmify.eval.options import EvalOptions
    from ssmify.eval.scan import scan_windows
    from ssmify.eval.speed import measure

    try:
        variants = {variant: parse_variant(variant) for variant in args.variants}
        for mixer in args.mixers:
            for width, gate in variants.values():
                check_lean_options(mixer, width, gate)
    except SsmifyError as error:
        parser.error(str(error))

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(args.recipe.read_text())
    stages = scaled_stages(base["stages"], args.tokens)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.eval().requires_grad_(False)
    teacher_parameters = sum(p.numel() for p in teacher.parameters())
    windows = load_data([str(heldout)], tokenizer, args.eval_seq_len, max_tokens=args.eval_tokens).windows
    options = EvalOptions(lengths=tuple(args.lengths), samples=args.samples, progress=False)
    vocab = teacher.config.vocab_size  # ordinary tokens: above the specials at the start of the vocabulary
    context = torch.randint(
        min(100, vocab // 2), vocab, (1, args.decode_context), generator=torch.Generator().manual_seed(0)
    )

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("runs", {})
    results.setdefault("layers", {})
    if "teacher_retrieval" not in results:
        sums = scan_windows(teacher, windows, None, 4, agreement=False, progress=False)
        results["teacher_perplexity"] = float(torch.tensor(sums.nll / sums.tokens).exp())
        results["teacher_retrieval"] = retrieval_scores(teacher, tokenizer, options)
    teacher_retrieval = {
        t: {int(n): v for n, v in a.items()} for t, a in results["teacher_retrieval"].items()
    }
    results.update(
        teacher=str(teacher_dir),
        teacher_parameters=teacher_parameters,
        recipe=str(args.recipe),
        stage_tokens={stage["name"]: stage["tokens"] for stage in stages},
        eval_tokens=int(windows.numel()),
        lengths=args.lengths,
        samples=args.samples,
        decode_context=args.decode_context,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    save_results(results_path, results)

    for plan in args.plans:
        layers = kept_layers(results, plan, teacher_dir, tokenizer, args.layer_choice, out)
        for mixer, (variant, (width, gate)) in itertools.product(args.mixers, variants.items()):
            name = run_name(plan, mixer, variant)
            if name in results["runs"]:
                continue
            run_dir = out / name
            shutil.rmtree(run_dir, ignore_errors=True)
            start = time.perf_counter()
            convert(
                str(teacher_dir),
                out=run_dir / "convert",
                mixer=mixer,
                attention_layers=layers,
                tokenizer=tokenizer,
                seed=args.seed,
                overwrite=True,
                mixer_width=width,
                gate=gate,
            )
            recipe = copy.deepcopy(base)
            recipe.update(
                teacher=str(teacher_dir),
                student={"path": str(run_dir / "convert")},
                seed=args.seed,
                output_dir=str(run_dir),
                stages=copy.deepcopy(stages),
            )
            recipe["data"] = {**recipe["data"], "train": [str(train)], "validation": [str(heldout)]}
            if args.quick:
                for stage in recipe["stages"]:
                    stage.update(eval_tokens=64, checkpoint_every=None)
            parsed = parse_recipe(recipe, str(args.recipe))
            summaries = run_recipe(parsed, resume=True)
            model = load_student(run_dir / stage_dir_name(len(parsed.stages) - 1, parsed.stages[-1])).eval()
            sums = scan_windows(model, windows, None, 4, agreement=False, progress=False)
            scores = retrieval_scores(model, tokenizer, options)
            mixer_module = next(iter(mixer_layers(model).values()))
            decode = measure(model, context, args.decode_tokens)
            perplexity = float(torch.tensor(sums.nll / sums.tokens).exp())
            entry = {
                "plan": plan,
                "mixer": mixer,
                "mixer_width": width,
                "gate": gate,
                "attention_layers": layers,
                "training_tokens": sum(s["tokens"] for s in summaries),
                "train_tokens_per_s": sum(s["tokens"] for s in summaries)
                / sum(s["seconds"] for s in summaries),
                "stages": {
                    s["stage"]: {k: s[k] for k in ("tokens", "seconds", "loss_first", "loss_last")}
                    for s in summaries
                },
                "perplexity": perplexity,
                "perplexity_ratio": perplexity / results["teacher_perplexity"],
                "retrieval": {t: {str(n): v for n, v in a.items()} for t, a in scores.items()},
                "retention": retention(scores, teacher_retrieval),
                "parameters": sum(p.numel() for p in model.parameters()),
                "parameters_ratio": sum(p.numel() for p in model.parameters()) / teacher_parameters,
                "state_bytes_per_layer": mixer_module.allocate_state(1).nbytes(),
                "cache_bytes_at_decode_context": decode["state_bytes"],
                "decode_tokens_per_s": decode["decode_tokens_per_s"],
                "seconds": round(time.perf_counter() - start, 1),
            }
            results["runs"][name] = json.loads(json.dumps(entry))  # keys as the saved file has them
            save_results(results_path, results)
            print(f"[{name}] {json.dumps(results['runs'][name]['retention'])}", flush=True)
            del model
            if not args.keep_students:
                shutil.rmtree(run_dir, ignore_errors=True)
    print_table(results)


if __name__ == "__main__":
    run_main(main)
