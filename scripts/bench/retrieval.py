"""Retrieval benchmark: which layer choice and data mix keep in-context retrieval, at equal training tokens.

For every plan (share of layers that keep attention), layer choice (even, sensitive, kl, retrieval,
auto), synthetic-data fraction and seed, one student is converted from the teacher with that layer
choice and the recipe's `student.mixer` (default mamba2; the recipe's own plan is not used)
(`ssmify.convert.convert`, layer scores cached per teacher and text) and trained by the real
loop (`ssmify.distill.run_recipe`) on the demo recipe's stages at the token budgets the recipe lists,
with `data.synthetic: {fraction: F, kinds: [induction, kv, passkey]}` when F > 0. Every student is
scored on the same held-out slice (perplexity against the teacher's) and on the same induction and
passkey samples at --lengths (`ssmify.eval.retrieval`; the teacher is scored on them once).
Retention is student / teacher accuracy; the overall figure sums over the points where the teacher
scores at least 50%.

With --heads N, head-level hybrids join the grid: `convert --keep-heads N` keeps attention in N KV
heads (model-wide: the most induction copy mass, a quarter by previous-token mass below those,
`ssmify.convert.head_scores.circuit_plan`) and makes every other head a mixer head
(`ssmify.convert.mixed_layer`); same recipe, tokens and scoring. For a comparison at equal KV-cache
bytes, give a layer plan with the same number of KV heads: 3 of SmolLM2-135M's 30 layers (--plans 0.1)
hold 9 KV heads, as --heads 9. The table adds the KV-cache MiB at 2k and 8k tokens (float32, one sequence).
--head-plans takes hand-chosen plans in `convert --attention-heads` syntax (LAYER:GROUP,...), for example
the heads that feed the induction heads beside the induction heads themselves.

Results go to OUT/results.json after every student, and a killed student resumes from its last checkpoint
(`run_recipe(resume=True)`), so a killed run continues where it stopped.
Student folders are deleted once scored, unless --keep-students.

    python scripts/bench/retrieval.py                                  # SmolLM2-135M, the full grid
    python scripts/bench/retrieval.py --plans 0.5 --choices even retrieval --synthetic 0
    python scripts/bench/retrieval.py --plans 0.1 --choices retrieval --synthetic 0 --heads 9   # equal KV bytes
    python scripts/bench/retrieval.py --plans --choices retrieval --head-plans 16:0,11:0,18:2   # by hand
    python scripts/bench/retrieval.py --quick --teacher DIR --train T.txt --heldout H.txt --recipe R.yaml
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main

CHOICES = ("even", "sensitive", "kl", "retrieval", "auto")
DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-demo.yaml"


def run_name(keep: float, choice: str, synthetic: float, seed: int) -> str:
    return f"{round(keep * 100)}pct/{choice}/synthetic{round(synthetic * 100)}/seed{seed}"


def head_run_name(heads: int, synthetic: float, seed: int) -> str:
    return f"heads{heads}/circuit/synthetic{round(synthetic * 100)}/seed{seed}"


def hand_run_name(heads: str, synthetic: float, seed: int) -> str:
    tag = hashlib.sha1(heads.encode()).hexdigest()[:6]  # the heads themselves are printed beside the row
    return f"heads{len(heads.split(','))}/hand-{tag}/synthetic{round(synthetic * 100)}/seed{seed}"


def kv_mib(kv_heads: int, head_dim: int, tokens: int) -> float:
    """KV-cache MiB of `kv_heads` KV heads at `tokens` tokens, float32 keys and values, one sequence."""
    return kv_heads * 2 * head_dim * tokens * 4 / 2**20


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def retrieval_scores(model, tokenizer, options) -> dict:
    """{task: {length: accuracy}} for induction and passkey, on the seeded samples of `options`."""
    from ssmify.eval.data import EvalData
    from ssmify.eval.retrieval import induction, passkey

    data = EvalData(tokenizer)
    return {
        task: {p["length"]: p["accuracy"] for p in evaluate(model, None, data, options)["points"]}
        for task, evaluate in (("induction", induction), ("passkey", passkey))
    }


def retention(student: dict, teacher: dict) -> dict:
    """Retention per task and length, per length over the tasks, and overall (teacher >= 50% points only)."""
    from ssmify.eval.retrieval import against_teacher, summarize

    def as_points(scores: dict) -> dict:
        return {
            task: {"points": [{"length": n, "accuracy": a} for n, a in acc.items()]}
            for task, acc in scores.items()
        }

    merged = against_teacher(as_points(student), as_points(teacher))
    summary = summarize(merged)
    return {
        "by_task": {task: {p["length"]: p["retention"] for p in merged[task]["points"]} for task in merged},
        "by_length": summary["by_length"],
        "overall": summary["overall"],
        "not_meaningful": summary["not_meaningful"],
    }


def print_table(results: dict) -> None:
    teacher = results["teacher_retrieval"]
    lengths = sorted({int(n) for task in teacher.values() for n in task})
    print(
        f"\nteacher: perplexity {results['teacher_perplexity']:.2f}; retrieval accuracy {json.dumps(teacher)}"
    )
    cells = [f"{t[:3]}@{n}" for t in ("induction", "passkey") for n in lengths]
    header = f"{'run':<38} | {'ppl x':>6} | " + " | ".join(f"{c:>8}" for c in cells)
    header += " | " + " | ".join(f"{'ret@' + str(n):>8}" for n in lengths) + f" | {'overall':>7}"
    header += f" | {'KV MiB@2k':>9} | {'KV MiB@8k':>9}"
    print(header)
    print("-" * len(header))
    for name, run in results["runs"].items():
        row = f"{name:<38} | {run['perplexity'] / results['teacher_perplexity']:>6.2f} | "
        row += " | ".join(
            f"{run['retrieval'][t][str(n)]:>8.2f}" for t in ("induction", "passkey") for n in lengths
        )
        by_length = run["retention"]["by_length"]
        row += " | " + " | ".join(
            f"{by_length[str(n)]:>8.2f}" if by_length.get(str(n)) is not None else f"{'-':>8}"
            for n in lengths
        )
        overall = run["retention"]["overall"]
        row += f" | {overall:>7.2f}" if overall is not None else f" | {'-':>7}"
        if "kv_heads" in run:
            row += "".join(
                f" | {kv_mib(run['kv_heads'], results['head_dim'], n):>9.1f}" for n in (2048, 8192)
            )
        kept = run.get("attention_heads") or run["attention_layers"]
        print(row + f"   ({kept})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budget, one run")
    add_input_args(parser)
    parser.add_argument(
        "--recipe", type=Path, default=DEMO_RECIPE, help="stages to train (default: the demo's)"
    )
    parser.add_argument("--plans", type=float, nargs="*", default=[0.5, 0.25], help="keep_attention values")
    parser.add_argument(
        "--choices", nargs="+", default=["even", "sensitive", "retrieval", "auto"], choices=CHOICES
    )
    parser.add_argument(
        "--synthetic", type=float, nargs="+", default=[0.0, 0.1], help="synthetic data fractions"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--heads",
        type=int,
        nargs="*",
        default=[],
        help="head-level runs: KV heads kept (convert --keep-heads)",
    )
    parser.add_argument(
        "--head-plans",
        nargs="*",
        default=[],
        help="head-level runs with hand-chosen KV heads (convert --attention-heads LAYER:GROUP,...)",
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048], help="retrieval context lengths"
    )
    parser.add_argument("--samples", type=int, default=4, help="retrieval samples per task and length")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--out", default="runs/bench/retrieval")
    parser.add_argument("--keep-students", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.plans, args.choices, args.synthetic, args.seeds = args.plans[:1], ["retrieval"], [0.5], [0]
        args.lengths, args.samples, args.eval_tokens, args.eval_seq_len = [128], 2, 256, 64

    quiet_offline()
    from ssmify.convert import convert
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.recipe import parse_recipe, stage_dir_name
    from ssmify.distill.run import run_recipe
    from ssmify.distill.students import load_student
    from ssmify.eval.data import load_data
    from ssmify.eval.options import EvalOptions
    from ssmify.eval.perplexity import perplexity_result
    from ssmify.eval.scan import scan_windows

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(args.recipe.read_text())
    mixer = (base.get("student") or {}).get("mixer", "mamba2")  # the recipe's mixer; its plan is the bench's
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.eval().requires_grad_(False)
    windows = load_data([str(heldout)], tokenizer, args.eval_seq_len, max_tokens=args.eval_tokens).windows
    options = EvalOptions(lengths=tuple(args.lengths), samples=args.samples, progress=False)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("runs", {})
    if "teacher_retrieval" not in results:
        start = time.perf_counter()
        sums = scan_windows(teacher, windows, None, 4, agreement=False, progress=False)
        results["teacher_perplexity"] = perplexity_result(sums)["value"]
        results["teacher_retrieval"] = retrieval_scores(teacher, tokenizer, options)
        print(f"teacher scored in {time.perf_counter() - start:.0f} s", flush=True)
    teacher_retrieval = {
        t: {int(n): v for n, v in a.items()} for t, a in results["teacher_retrieval"].items()
    }
    # keyed by stage folder (1-matrix, ...): a recipe may hold two stages of one name
    stage_tokens = {f"{i + 1}-{stage['name']}": stage["tokens"] for i, stage in enumerate(base["stages"])}
    results.update(
        {
            "teacher": str(teacher_dir),
            "recipe": str(args.recipe),
            "mixer": mixer,
            "stage_tokens": stage_tokens,
            "eval_tokens": int(windows.numel()),
            "lengths": args.lengths,
            "samples": args.samples,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "head_dim": teacher.config.head_dim,
            "kv_heads_per_layer": teacher.config.num_key_value_heads,
        }
    )
    save_results(results_path, results)

    jobs = [
        (head_run_name(heads, fraction, seed), {"keep_heads": heads}, fraction, seed)
        for heads in args.heads
        for fraction in args.synthetic
        for seed in args.seeds
    ]
    jobs += [
        (hand_run_name(heads, fraction, seed), {"attention_heads": heads}, fraction, seed)
        for heads in args.head_plans
        for fraction in args.synthetic
        for seed in args.seeds
    ]
    jobs += [
        (
            run_name(keep, choice, fraction, seed),
            {"keep_attention": keep, "layer_choice": choice},
            fraction,
            seed,
        )
        for keep in args.plans
        for choice in args.choices
        for fraction in args.synthetic
        for seed in args.seeds
    ]
    for name, plan, fraction, seed in jobs:
        if name in results["runs"]:
            continue
        run_dir = out / name
        start = time.perf_counter()
        converted = run_dir / "convert"
        if (converted / "convert_report.json").is_file():  # written atomically: a killed run resumes
            report = json.loads((converted / "convert_report.json").read_text())
            print(f"[{name}] resuming from {run_dir}", flush=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            student = convert(  # from the folder, so that the layer scores are cached
                str(teacher_dir),
                out=converted,
                tokenizer=tokenizer,
                mixer=mixer,
                seed=seed,
                overwrite=True,
                **plan,
            )
            report = student.convert_report
            del student
        layers = report["attention_layers"]
        kv_heads = report.get("kv_heads_kept", len(layers) * results["kv_heads_per_layer"])
        recipe = copy.deepcopy(base)
        recipe.update(teacher=str(teacher_dir), student={"path": str(converted)}, seed=seed)
        recipe["output_dir"] = str(run_dir)
        recipe["data"] = {**recipe["data"], "train": [str(train)], "validation": [str(heldout)]}
        recipe["data"].pop("synthetic", None)  # this run's fraction, not the recipe's
        if fraction > 0:
            recipe["data"]["synthetic"] = {"fraction": fraction, "kinds": ["induction", "kv", "passkey"]}
        if args.quick:
            for stage in recipe["stages"]:
                stage.update(tokens=stage["global_batch_tokens"], eval_tokens=64, checkpoint_every=None)
        parsed = parse_recipe(recipe, str(args.recipe))
        run_recipe(parsed, resume=True)
        trained = time.perf_counter() - start
        last = run_dir / stage_dir_name(len(parsed.stages) - 1, parsed.stages[-1])
        model = load_student(last).eval()
        sums = scan_windows(model, windows, None, 4, agreement=False, progress=False)
        scores = retrieval_scores(model, tokenizer, options)
        results["runs"][name] = {
            "plan": plan.get("keep_attention"),
            "choice": plan.get("layer_choice", "by hand" if "attention_heads" in plan else "circuit"),
            "synthetic": fraction,
            "seed": seed,
            "attention_layers": layers,
            "attention_heads": report.get("attention_heads"),
            "kv_heads": kv_heads,
            "layer_scores": report["layer_scores"],
            "head_scores": report.get("head_scores"),
            "training_tokens": sum(s["tokens"] for s in recipe["stages"]),
            "perplexity": perplexity_result(sums)["value"],
            "retrieval": {t: {str(n): v for n, v in a.items()} for t, a in scores.items()},
            "retention": retention(scores, teacher_retrieval),
            "seconds": round(time.perf_counter() - start, 1),
            "train_seconds": round(trained, 1),
        }
        save_results(results_path, results)
        print(f"[{name}] {json.dumps(results['runs'][name]['retention'])}", flush=True)
        del model
        if not args.keep_students:
            shutil.rmtree(run_dir, ignore_errors=True)
    print_table(results)


if __name__ == "__main__":
    run_main(main)
