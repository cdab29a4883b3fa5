"""Init ablation: seeded vs random mixers, MOHAWK stages vs logits-only KD, at one total token budget.

For every layer plan (share of layers that keep attention) and seed, four students start from the
teacher and each trains on the same number of tokens:

    seeded+mohawk   mixers seeded from attention (convert's default), then matrix -> hidden -> logits
    seeded+kd       mixers seeded from attention, then logits-only KD on the whole budget
    random+mohawk   MOHAWK's published init: mixers random, MLPs and norms copied; matrix -> hidden -> logits
    random+kd       mixers random, then logits-only KD on the whole budget

Conversion is `ssmify.convert.convert(seed=seed)`; training is `ssmify.distill.run_recipe` (the real
loop). After conversion and after every stage, the student is scored on a fixed held-out slice (the
first --eval-tokens tokens of the held-out text, windows of --eval-seq-len): perplexity, mean
KL(teacher || student) per token and top-1 agreement, computed with the eval package's scoring
functions; the teacher's logits on the slice are computed once and reused.

Results go to OUT/results.json after every student, so a killed run continues where it stopped
(finished students are skipped). Stage folders are deleted once scored, unless --keep-students.

    python scripts/bench/init_ablation.py                       # SmolLM2-135M, 50% and 0% plans, seeds 0 1
    python scripts/bench/init_ablation.py --plans 0.5 --seeds 0 1 --tokens 16384
    python scripts/bench/init_ablation.py --quick --teacher DIR --train T.txt --heldout H.txt   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from bench_inputs import add_input_args, quiet_offline, resolve_teacher, resolve_text, run_main

VARIANTS = {
    "seeded+mohawk": ("seeded", ("matrix", "hidden", "logits")),
    "seeded+kd": ("seeded", ("logits",)),
    "random+mohawk": ("random", ("matrix", "hidden", "logits")),
    "random+kd": ("random", ("logits",)),
}
# Per-stage settings (the demo recipe's, with 512-token global batches so that small budgets still
# take a few dozen optimizer steps). The logits stage is the same in the MOHAWK and the KD students.
STAGE_SETTINGS = {
    "matrix": {"seq_len": 64, "micro_batch_size": 8, "lr": 6.0e-3},
    "hidden": {"seq_len": 256, "micro_batch_size": 2, "lr": 5.0e-3},
    "logits": {"seq_len": 256, "micro_batch_size": 2, "lr": 3.0e-4},
}
QUICK_SETTINGS = {
    "matrix": {"seq_len": 32, "micro_batch_size": 2, "lr": 3.0e-3},
    "hidden": {"seq_len": 32, "micro_batch_size": 2, "lr": 3.0e-3},
    "logits": {"seq_len": 32, "micro_batch_size": 2, "lr": 3.0e-3},
}


class HeldOut:
    """A fixed held-out slice and the teacher's logits on it, to score students against."""

    def __init__(self, teacher, windows: torch.Tensor, batch_size: int) -> None:
        from ssmify.eval.scan import logits, nll_sum

        self.batches = list(windows.split(batch_size))
        self.teacher_logits = [logits(teacher, batch) for batch in self.batches]
        self.teacher_nll = sum(nll_sum(t, b) for t, b in zip(self.teacher_logits, self.batches))
        self.tokens = windows.shape[0] * (windows.shape[1] - 1)
        self.seq_len = windows.shape[1]

    def score(self, model) -> dict:
        """perplexity, kl (nats/token), top1, and the teacher's perplexity on the same tokens."""
        from ssmify.eval.agreement import agreement_result
        from ssmify.eval.perplexity import perplexity_result
        from ssmify.eval.scan import WindowSums, kl_and_top1, logits, nll_sum

        sums = WindowSums(self.tokens, self.seq_len, 0.0, self.teacher_nll, 0.0, 0)
        for batch, teacher_logits in zip(self.batches, self.teacher_logits):
            student_logits = logits(model, batch)
            sums.nll += nll_sum(student_logits, batch)
            kl, top1 = kl_and_top1(student_logits, teacher_logits)
            sums.kl += kl
            sums.top1 += top1
        ppl, agree = perplexity_result(sums), agreement_result(sums)
        return {
            "perplexity": ppl["value"],
            "teacher_perplexity": ppl["teacher_value"],
            "kl": agree["kl"],
            "top1": agree["top1"],
        }


def stage_list(
    stages: tuple[str, ...],
    tokens: int,
    split: dict[str, float],
    settings: dict,
    batch: int,
    eval_tokens: int,
) -> list[dict]:
    """Recipe stages whose token budgets add up to `tokens` (whole global batches)."""
    shares = [split[name] for name in stages]
    budgets = [int(tokens * share / sum(shares)) // batch * batch for share in shares]
    budgets[-1] += tokens - sum(budgets)  # what rounding left over goes to the last stage
    result = []
    for name, budget in zip(stages, budgets):
        stage = {
            "name": name,
            "tokens": budget,
            "global_batch_tokens": batch,
            "schedule": {"kind": "wsd", "warmup": 0.1, "decay": 0.3},
            "eval_tokens": eval_tokens,  # the loop's own validation, before and after the stage
            "checkpoint_every": None,
            **settings[name],
        }
        if name == "logits":
            stage["loss"] = {"kind": "forward_kl", "temperature": 1.0, "ce_weight": 0.0}
        result.append(stage)
    return result


def plan_name(keep: float) -> str:
    return f"{round(keep * 100)}pct-attention"


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)


def print_tables(results: dict) -> None:
    """Per plan: each student's perplexity after conversion and after each stage, final KL and top-1;
    then each variant's final numbers over the seeds (mean, and the spread max - min)."""
    print(
        f"\nteacher perplexity on the held-out slice: {results['teacher_perplexity']:.2f} "
        f"({results['eval_tokens']} tokens scored)"
    )
    for plan, runs in results["runs"].items():
        print(f"\n{plan}: held-out perplexity after each stage (KL = KL(teacher||student) nats/token)")
        header = (
            f"{'variant':<14} | {'seed':>4} | {'converted':>10} | {'matrix':>9} | {'hidden':>9} | "
            f"{'logits':>9} | {'KL conv':>7} | {'KL final':>8} | {'top1':>5} | {'min':>5}"
        )
        print(header)
        print("-" * len(header))
        for run in runs.values():
            cells = {s["stage"]: s for s in run["scores"]}

            def ppl(stage: str, cells=cells) -> str:
                return f"{cells[stage]['perplexity']:>9.1f}" if stage in cells else f"{'-':>9}"

            final = run["scores"][-1]
            print(
                f"{run['variant']:<14} | {run['seed']:>4} | {cells['converted']['perplexity']:>10.1f} | "
                f"{ppl('matrix')} | {ppl('hidden')} | {ppl('logits')} | {cells['converted']['kl']:>7.3f} | "
                f"{final['kl']:>8.3f} | {final['top1']:>5.3f} | {run['train_seconds'] / 60:>5.1f}"
            )
        by_variant: dict[str, list[dict]] = {}
        for run in runs.values():
            by_variant.setdefault(run["variant"], []).append(run["scores"][-1])
        print(f"\n{plan}: final numbers over seeds (spread = max - min over the seeds)")
        for variant, finals in by_variant.items():
            ppls, kls = [f["perplexity"] for f in finals], [f["kl"] for f in finals]
            print(
                f"  {variant:<14} n={len(finals)}  perplexity {statistics.mean(ppls):9.2f} "
                f"(spread {max(ppls) - min(ppls):7.2f})   KL {statistics.mean(kls):.4f} "
                f"(spread {max(kls) - min(kls):.4f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budget and slice")
    add_input_args(parser)
    parser.add_argument("--plans", type=float, nargs="+", default=[0.5, 0.0], help="keep_attention values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=16384, help="training tokens per student, all stages")
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=[0.25, 0.25, 0.5],
        metavar=("MATRIX", "HIDDEN", "LOGITS"),
        help="MOHAWK shares of the budget",
    )
    parser.add_argument("--batch-tokens", type=int, default=512, help="global batch of every stage, tokens")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--stage-eval-tokens", type=int, default=512, help="the loop's validation per stage")
    parser.add_argument("--out", default="runs/bench/init-ablation")
    parser.add_argument("--keep-students", action="store_true", help="keep every stage's student folder")
    args = parser.parse_args()
    settings = STAGE_SETTINGS
    if args.quick:
        args.tokens, args.batch_tokens, args.eval_tokens, args.eval_seq_len = 256, 64, 256, 64
        args.plans, args.seeds, args.stage_eval_tokens, settings = (
            args.plans[:1],
            args.seeds[:1],
            64,
            QUICK_SETTINGS,
        )

    quiet_offline()
    from ssmify.convert import convert
    from ssmify.convert.teacher import load_teacher
    from ssmify.distill.recipe import parse_recipe
    from ssmify.distill.run import run_recipe
    from ssmify.distill.students import load_student
    from ssmify.eval.data import load_data

    teacher_dir = resolve_teacher(args)
    train, heldout = resolve_text(args, parser)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    teacher.eval().requires_grad_(False)
    windows = load_data([str(heldout)], tokenizer, args.eval_seq_len, max_tokens=args.eval_tokens).windows
    heldout_slice = HeldOut(teacher, windows, batch_size=4)

    results_path = out / "results.json"
    results = load_results(results_path)
    results.update(
        {
            "teacher": str(teacher_dir),
            "train": str(train),
            "heldout": str(heldout),
            "tokens_per_student": args.tokens,
            "mohawk_split": dict(zip(("matrix", "hidden", "logits"), args.split)),
            "stage_settings": settings,
            "batch_tokens": args.batch_tokens,
            "eval_tokens": heldout_slice.tokens,
            "eval_seq_len": args.eval_seq_len,
            "teacher_perplexity": math.exp(heldout_slice.teacher_nll / heldout_slice.tokens),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        }
    )
    results.setdefault("runs", {})
    results.setdefault("started", datetime.datetime.now().isoformat(timespec="seconds"))
    split = dict(zip(("matrix", "hidden", "logits"), args.split))
    print(
        f"init ablation: teacher {teacher_dir.name}, {args.tokens} training tokens per student, "
        f"held-out slice {heldout_slice.tokens} tokens, teacher perplexity {results['teacher_perplexity']:.2f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )

    for keep in args.plans:
        plan = plan_name(keep)
        runs = results["runs"].setdefault(plan, {})
        for seed in args.seeds:
            for init in ("seeded", "random"):
                variants = [v for v in args.variants if VARIANTS[v][0] == init]
                pending = [v for v in variants if f"{v}/seed{seed}" not in runs]
                if not pending:
                    continue
                convert_dir = out / plan / f"seed{seed}" / f"{init}-convert"
                if not (convert_dir / "config.json").is_file():
                    start = time.perf_counter()
                    convert(
                        teacher,
                        out=convert_dir,
                        keep_attention=keep,
                        init=init,
                        tokenizer=tokenizer,
                        seed=seed,
                        overwrite=True,
                    )
                    print(
                        f"[{plan} seed {seed}] converted ({init}) in {time.perf_counter() - start:.0f} s",
                        flush=True,
                    )
                converted = heldout_slice.score(load_student(convert_dir))
                for variant in pending:
                    run_dir = out / plan / f"seed{seed}" / variant
                    recipe = parse_recipe(
                        {
                            "teacher": str(teacher_dir),
                            "student": {"path": str(convert_dir)},
                            "data": {"train": [str(train)], "validation": [str(heldout)], "seq_len": 256},
                            "output_dir": str(run_dir),
                            "seed": seed,
                            "teacher_dtype": "float32",
                            "stages": stage_list(
                                VARIANTS[variant][1],
                                args.tokens,
                                split,
                                settings,
                                args.batch_tokens,
                                args.stage_eval_tokens,
                            ),
                        },
                        source=f"{variant} recipe",
                    )
                    start = time.perf_counter()
                    summaries = run_recipe(recipe, resume=True)
                    train_seconds = time.perf_counter() - start
                    scores = [{"stage": "converted", "tokens": 0, **converted}]
                    for summary in summaries:
                        name = summary["stage"].split("-", 1)[1]
                        score = heldout_slice.score(load_student(run_dir / summary["stage"]))
                        scores.append(
                            {
                                "stage": name,
                                "tokens": summary["tokens"],
                                "seconds": summary["seconds"],
                                **score,
                            }
                        )
                    runs[f"{variant}/seed{seed}"] = {
                        "variant": variant,
                        "seed": seed,
                        "init": init,
                        "train_seconds": round(train_seconds, 1),
                        "scores": scores,
                    }
                    save_results(results_path, results)
                    steps = "  ".join(f"{s['stage']} {s['perplexity']:.1f}" for s in scores)
                    print(
                        f"[{plan} seed {seed}] {variant}: {steps}; final KL {scores[-1]['kl']:.3f} "
                        f"({train_seconds / 60:.1f} min)",
                        flush=True,
                    )
                    if not args.keep_students:
                        shutil.rmtree(run_dir, ignore_errors=True)
                if not args.keep_students:
                    shutil.rmtree(convert_dir, ignore_errors=True)
    results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    save_results(results_path, results)
    print_tables(results)
    print(f"\nresults: {results_path}")


if __name__ == "__main__":
    run_main(main)
