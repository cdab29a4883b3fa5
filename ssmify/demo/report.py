"""The demo's results table (terminal and report.md), report.md itself, and report.json.

One row per model: the teacher, the seeded student before training and the distilled student,
all scored on the same held-out slice; decode speed and memory are measured for the teacher and the
distilled student in the same run (the seeded student has the same architecture).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import transformers

from ssmify.atomic import write_text_atomic
from ssmify.demo.evaluation import retrieval_rows
from ssmify.demo.plots import plot_perplexity, plot_stage_losses

PERPLEXITY_TARGET = 1.5  # the distilled student's perplexity goal, as a multiple of the teacher's


def model_rows(results: dict[str, dict], attention: dict[str, str]) -> list[dict]:
    """Rows for the teacher, the seeded and the distilled student, from ssmify.eval results."""
    retrieval = retrieval_rows(results)
    distilled = results["distilled"]
    speed = _speed_point(distilled)
    teacher_ppl = distilled["perplexity"]["teacher_value"]
    rows = [
        {
            "name": "teacher",
            "label": "teacher",
            "attention": attention["teacher"],
            "perplexity": teacher_ppl,
            "ratio": 1.0,
            "kl": None,
            "top1": None,
            "decode_tokens_per_s": speed.get("teacher_decode_tokens_per_s"),
            "peak_memory_bytes": speed.get("teacher_peak_memory_bytes"),
            "state_bytes": speed.get("teacher_state_bytes"),
            "retrieval": retrieval.get("teacher"),
        }
    ]
    for name, label in (("seeded", "seeded student, untrained"), ("distilled", "distilled student")):
        result = results[name]
        rows.append(
            {
                "name": name,
                "label": label,
                "attention": attention["student"],
                "perplexity": result["perplexity"]["value"],
                "ratio": result["perplexity"]["value"] / teacher_ppl,
                "kl": result["agreement"]["kl"],
                "top1": result["agreement"]["top1"],
                "decode_tokens_per_s": speed.get("decode_tokens_per_s") if name == "distilled" else None,
                "peak_memory_bytes": speed.get("peak_memory_bytes") if name == "distilled" else None,
                "state_bytes": speed.get("state_bytes") if name == "distilled" else None,
                "retrieval": retrieval.get(name),
            }
        )
    return rows


def _speed_point(result: dict) -> dict:
    points = result.get("speed", {}).get("points", [])
    return points[0] if points else {}


def _retrieval_cells(row: dict, lengths: list[int]) -> list[str]:
    found = row.get("retrieval")
    cells = []
    for task in ("induction", "passkey"):
        accuracy = (found or {}).get("accuracy", {}).get(task, {})
        cells += [_percent(accuracy.get(n, accuracy.get(str(n)))) for n in lengths]
    retention = None if found is None else found["retention"]
    return cells + [_number(retention, 2)]


def _retrieval_lengths(rows: list[dict]) -> list[int]:
    found = next((row["retrieval"] for row in rows if row.get("retrieval")), None)
    return sorted(int(n) for n in found["accuracy"]["induction"]) if found else []


def _short(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def results_table(rows: list[dict], context: int) -> str:
    """A markdown table with padded columns, readable in a terminal as it is."""
    lengths = _retrieval_lengths(rows)
    retrieval_header = [f"{task} @{_short(n)}" for task in ("induction", "passkey") for n in lengths]
    retrieval_header += ["retention"] if lengths else []
    header = [
        "model",
        "attention layers",
        "perplexity",
        "x teacher",
        "KL",
        "top-1",
        f"decode tok/s @{context}",
        f"memory @{context}",
        f"state @{context}",
        *retrieval_header,
    ]
    body = [
        [
            row["label"],
            row["attention"],
            _number(row["perplexity"], 2),
            _number(row["ratio"], 2),
            _number(row["kl"], 3),
            _percent(row["top1"]),
            _number(row["decode_tokens_per_s"], 1),
            _mebibytes(row["peak_memory_bytes"]),
            _mebibytes(row["state_bytes"]),
            *(_retrieval_cells(row, lengths) if lengths else []),
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _mebibytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f} MiB"


def speed_ratios(results: dict[str, dict]) -> dict:
    """Decode speedup and memory / state ratios (student / teacher) at the long context."""
    point = _speed_point(results["distilled"])
    return {
        key: point.get(key) for key in ("decode_speedup", "memory_ratio", "state_ratio", "prefill_speedup")
    }


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def describe_machine(info: dict) -> str:
    device = info["cuda"] or f"{info['cpu_cores']} CPU cores ({info['torch_threads']} torch threads)"
    return f"{device}, {info['platform']}, torch {info['torch']}, transformers {info['transformers']}"


def commands(student: Path, teacher: Path, heldout: Path, eval_tokens: int, context: int, out: Path) -> dict:
    """Exact shell commands to chat with, evaluate and export the student."""
    python = _shell_path(Path(sys.executable))
    chat = (
        "import ssmify; from transformers import pipeline; "
        f'chat = pipeline("text-generation", model={json.dumps(str(student))}); '
        'print(chat([{"role": "user", "content": "What is the capital of France?"}], '
        'max_new_tokens=60)[0]["generated_text"][-1]["content"])'
    )
    quote = shlex.quote
    return {
        "chat": f"{python} -c {quote(chat)}",
        "evaluate": (
            f"{python} -m ssmify eval {quote(str(student))} --teacher {quote(str(teacher))} "
            f"--data {quote(str(heldout))} --max-tokens {eval_tokens} "
            f"--tasks perplexity,agreement,retrieval,speed --lengths 1024,2048 --speed-lengths 1024,{context} "
            f"--out {quote(str(out / 'eval'))}"
        ),
        "export": f"{python} -m ssmify export {quote(str(student))} --out {quote(str(out / 'export'))}",
    }


def _shell_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_report(report: dict, out: Path) -> Path:
    """Write report.json, loss_curves.png, perplexity.png and report.md into `out`; returns report.md."""
    plot_stage_losses(report["stages"], out / "loss_curves.png")
    plot_perplexity(report["rows"], out / "perplexity.png", PERPLEXITY_TARGET)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))
    return out / "report.md"


def _retrieval_paragraph(rows: dict[str, dict]) -> list[str]:
    """What the induction, passkey and retention columns mean, with the distilled student's retention by length."""
    found = rows["distilled"].get("retrieval")
    if not found or found["retention"] is None:
        return []
    by_length = ", ".join(f"{_number(v, 2)} at {n} tokens" for n, v in found["by_length"].items())
    return [
        "Induction (a planted run of random words, repeated: share of the second copy predicted exactly) and "
        "passkey (a 5-digit key hidden in filler: share of greedy generated answers that contain it) measure "
        "in-context retrieval, on the same seeded samples for every model (`ssmify.eval.retrieval`). "
        f"Retention is the student's accuracy over the teacher's: {by_length} for the distilled student.",
        "",
    ]


def render_markdown(report: dict) -> str:
    plan = report["plan"]
    ratios = report["speed_ratios"]
    rows = {row["name"]: row for row in report["rows"]}
    kept = plan["attention_layers"]
    lines = [
        f"# ssmify demo: {report['teacher_name']} -> "
        + (f"hybrid, attention kept in {len(kept)} of {plan['num_layers']} layers" if kept else "pure SSM"),
        "",
        f"Run on {report['date']} on {describe_machine(report['machine'])}. Wall time "
        f"{report['wall_seconds'] / 60:.1f} min (budget {plan['budget_minutes']:g} min)"
        + _sessions(report["sessions"])
        + ".",
        "",
        "## Results",
        "",
        report["table"],
        "",
        f"Perplexity, KL(teacher ‖ student) in nats per token and top-1 agreement (share of positions where "
        f"the student's most likely next token is the teacher's) on {report['slice']}, the same for every model. "
        f"Decode speed and memory at a {plan['speed_context']}-token context, teacher and student measured in "
        f"the same run: {report['speed_memory']}.",
        "",
        f"The distilled student's perplexity is {rows['distilled']['ratio']:.2f}x the teacher's "
        f"(goal: at most {PERPLEXITY_TARGET:g}x); before training it was {rows['seeded']['ratio']:.1f}x.",
        "",
        *_retrieval_paragraph(rows),
        "![held-out perplexity](perplexity.png)",
        "",
        "## What the demo did",
        "",
        f"1. **Teacher**: {report['teacher_name']}, a plain Hugging Face folder at `{report['teacher']}`.",
        f"2. **Text**: `{report['train_text']}` for training, `{report['heldout_text']}` held out "
        f"({report['text_name']}).",
        f"3. **Convert**: {plan['num_layers'] - len(kept)} of {plan['num_layers']} attention layers became "
        f"`{plan['mixer']}` mixers seeded from their attention weights; "
        + (
            f"attention kept in layers {', '.join(map(str, kept))} ({plan['layer_choice']})."
            if kept
            else "no layer keeps attention (a pure SSM)."
        ),
        f"4. **Distill** (`{report['recipe']}`), stages sized to the budget: "
        f"{plan['training_seconds'] / 60:.1f} min planned for training.",
        "",
        *_stage_table(report["stages"]),
        "",
        "![loss per stage](loss_curves.png)",
        "",
        f"5. **Evaluate** on {report['slice']}.",
        "",
        *_phase_table(report["sessions"]),
        "",
        "## Use the student",
        "",
        f"The distilled student is a Hugging Face folder, `{report['student']}`; after `import ssmify`, "
        "`AutoModelForCausalLM.from_pretrained` loads it.",
        "",
        "```bash",
        "# chat with it",
        report["commands"]["chat"],
        "# evaluate it (perplexity, agreement, in-context retrieval, speed)",
        report["commands"]["evaluate"],
        "# export it to a native transformers architecture (loads without ssmify)",
        report["commands"]["export"],
        "```",
        "",
    ]
    if ratios.get("decode_speedup") is None:
        lines.append("Speed was not measured for both models; see report.json.")
    return "\n".join(lines)


def _sessions(sessions: list[dict]) -> str:
    if len(sessions) < 2:
        return ""
    times = " + ".join(f"{session['total'] / 60:.1f}" for session in sessions)
    return f", over {len(sessions)} sessions ({times} min: later ones continue or reuse the first)"


def _phase_table(sessions: list[dict]) -> list[str]:
    """Seconds per phase, summed over the sessions of the run."""
    totals: dict[str, float] = {}
    for session in sessions:
        for name, seconds in session.items():
            totals[name] = totals.get(name, 0.0) + seconds
    return [
        "| phase | seconds |",
        "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in totals.items()],
    ]


def _stage_table(stages: list[dict]) -> list[str]:
    lines = [
        "| stage | tokens | steps | seconds | tokens/s | train loss first -> last | validation loss first -> last |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in stages:
        lines.append(
            f"| {s['stage']} | {s['tokens']:,} | {s['steps']} | {s['seconds']:.0f} | {s['tokens_per_s']:.0f} | "
            f"{s['loss_first']:.4g} -> {s['loss_last']:.4g} | {s['val_loss_first']:.4g} -> {s['val_loss_last']:.4g} |"
        )
    return lines


def describe_speed(ratios: dict) -> str:
    parts = []
    if ratios.get("decode_speedup") is not None:
        parts.append(f"decode {ratios['decode_speedup']:.2f}x the teacher's speed")
    if ratios.get("memory_ratio") is not None:
        parts.append(f"peak memory {ratios['memory_ratio']:.2f}x the teacher's")
    if ratios.get("state_ratio") is not None:
        parts.append(f"decoding state {ratios['state_ratio']:.2f}x the teacher's KV cache")
    return ", ".join(parts) or "not measured"
