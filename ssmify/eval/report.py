"""report.json (every number), report.md (a person's view: student and teacher side by side) and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ssmify.atomic import write_text_atomic
from ssmify.eval.plots import plot_alignment, plot_retrieval, plot_speed
from ssmify.eval.retrieval import MEANINGFUL, RETRIEVAL_TASKS

PLOTS = {"alignment": plot_alignment, "speed": plot_speed}


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.4g} {unit}"
        value /= 1024
    return f"{value:.4g} GiB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _quality(results: dict, has_teacher: bool) -> list[str]:
    header = ["metric", "student"] + (["teacher", "student / teacher"] if has_teacher else [])
    rows = []
    if "perplexity" in results:
        ppl = results["perplexity"]
        label = f"perplexity ({ppl['tokens']} tokens, windows of {ppl['seq_len']})"
        row = [label, _num(ppl["value"])]
        if has_teacher:
            row += [_num(ppl.get("teacher_value")), _num(ppl.get("ratio"), 3)]
        rows.append(row)
    if "agreement" in results:
        agree = results["agreement"]
        pad = ["", ""] if has_teacher else []
        rows.append(["KL(teacher ‖ student), nats per token", _num(agree["kl"]), *pad])
        rows.append(["top-1 agreement with the teacher", _num(agree["top1"]), *pad])
    return ["## Quality", "", *_table(header, rows)] if rows else []


def _alignment(result: dict) -> list[str]:
    rows = [
        [str(r["layer"]), _num(r["matrix_rel_error"]), _num(r["hidden_rel_error"])] for r in result["layers"]
    ]
    return [
        "## Alignment with the teacher, per converted layer",
        "",
        "Relative Frobenius error of the mixer's mixing matrix against the teacher's attention matrix, and "
        "relative L2 error of the block output, both on the teacher's own inputs to that layer.",
        "",
        *_table(["layer", "matrix error", "hidden error"], rows),
    ]


def _retrieval(report: dict, has_teacher: bool) -> list[str]:
    """One table over the retrieval tasks: accuracy per task and length, and retention against the teacher."""
    header = ["task", "context", "scored", "student"] + (["teacher", "retention"] if has_teacher else [])
    rows, skipped = [], []
    for task in RETRIEVAL_TASKS:
        if task not in report:
            continue
        for p in report[task]["points"]:
            row = [task, str(p["length"]), str(p.get("scored", p.get("queries"))), _num(p["accuracy"], 3)]
            if has_teacher:
                mark = "" if p["meaningful"] else " (teacher < 50%)"
                row += [_num(p["teacher_accuracy"], 3), _num(p.get("retention"), 3) + mark]
            rows.append(row)
        skipped += [f"- {task} skipped at {s['length']}: {s['reason']}" for s in report[task]["skipped"]]
    if "recall" in report:
        recall = report["recall"]
        skipped.append(
            f"- recall: {recall['queries_per_sample']} keys asked per sample, chance {recall['chance']:.2g}"
            + ("" if recall["separated"] else "; no single-token separator between pairs")
        )
    lines = [
        "## In-context retrieval",
        "",
        "induction: a planted run of random words repeated at the end, the share of its second copy "
        "predicted exactly; passkey: a 5-digit passkey hidden in filler, right when the greedy generated "
        "answer contains it; recall: the value after each asked key. Student and teacher see the same "
        "samples. Retention is student / teacher accuracy.",
        "",
        *_table(header, rows),
        *skipped,
    ]
    summary = report.get("retrieval")
    if summary:
        by_length = ", ".join(f"{n}: {_num(v, 3)}" for n, v in summary["by_length"].items())
        lines += [
            f"**Overall retention {_num(summary['overall'], 3)}** (by length: {by_length}), over the points "
            f"where the teacher scores at least {MEANINGFUL:.0%}.",
        ]
        if summary["not_meaningful"]:
            left_out = ", ".join(f"{p['task']} at {p['length']}" for p in summary["not_meaningful"])
            lines.append(
                f"The teacher itself is below {MEANINGFUL:.0%} at: {left_out}; retention there is not meaningful."
            )
    return lines + [""]


def _speed(result: dict, has_teacher: bool) -> list[str]:
    columns = [("prefill s", "prefill_s", _num), ("decode tok/s", "decode_tokens_per_s", _num)]
    columns += [("peak memory", "peak_memory_bytes", _bytes), ("state", "state_bytes", _bytes)]
    header = ["context"] + [name + (" (student / teacher)" if has_teacher else "") for name, _, _ in columns]
    rows = []
    for p in result["points"]:
        row = [str(p["length"])]
        for _, key, fmt in columns:
            row.append(
                f"{fmt(p.get(key))} / {fmt(p.get('teacher_' + key))}" if has_teacher else fmt(p.get(key))
            )
        rows.append(row)
    lines = [
        "## Speed and memory",
        "",
        f"On {result['device']} in {result['dtype']}; decode speed over {result['decode_tokens']} greedy "
        "tokens with the model's own cache. Peak memory: " + result["memory"] + ". State: exact bytes of the "
        "cache after prefill (KV cache for attention layers, conv and recurrent state for SSM layers).",
        "",
        *_table(header, rows),
    ]
    if has_teacher:
        ratios = ["prefill_speedup", "decode_speedup", "memory_ratio", "state_ratio"]
        ratio_rows = [[str(p["length"])] + [_num(p.get(key), 3) for key in ratios] for p in result["points"]]
        lines += [
            "Speedups above 1: the student is faster; memory and state ratios below 1: it is smaller.",
            "",
            *_table(
                ["context", "prefill speedup", "decode speedup", "memory ratio", "state ratio"], ratio_rows
            ),
        ]
    lines += [f"- skipped {s['model']} at {s['length']}: {s['reason']}" for s in result["skipped"]]
    return lines + ([""] if result["skipped"] else [])


def _lm_eval(result: dict, has_teacher: bool) -> list[str]:
    header = ["task", "metric", "student"] + (["teacher"] if has_teacher else [])
    rows = []
    for task, entry in result.items():
        for metric, value in entry["metrics"].items():
            row = [task, metric, _num(value)]
            if has_teacher:
                row.append(_num(entry.get("teacher_metrics", {}).get(metric)))
            rows.append(row)
    return ["## lm-evaluation-harness", "", *_table(header, rows)]


def render_markdown(report: dict) -> str:
    """The human-readable report; teacher columns appear when the report has a teacher."""
    has_teacher = report.get("teacher") is not None
    lines = ["# ssmify eval report", "", f"- student: `{report.get('model')}`"]
    if has_teacher:
        lines.append(f"- teacher: `{report['teacher']}`")
    lines += [f"- tasks: {', '.join(report.get('tasks', []))}", ""]
    lines += _quality(report, has_teacher)
    if any(task in report for task in RETRIEVAL_TASKS):
        lines += _retrieval(report, has_teacher)
        if "retrieval" in report.get("plots", {}):
            lines += [f"![retrieval]({report['plots']['retrieval']})", ""]
    sections = {"alignment": lambda result, _: _alignment(result), "speed": _speed}
    for key, render in {**sections, "lm_eval": _lm_eval}.items():
        if key in report:
            lines += render(report[key], has_teacher)
            if key in report.get("plots", {}):
                lines += [f"![{key}]({report['plots'][key]})", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | Path) -> dict:
    """Write the plots, report.json and report.md into out_dir; returns {"json", "markdown", plot names}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    report["plots"] = {}
    for key, plot in PLOTS.items():
        if key in report and (report[key].get("points") or report[key].get("layers")):
            plot(report[key], out / f"{key}.png")
            report["plots"][key] = f"{key}.png"
    if any(report.get(task, {}).get("points") for task in RETRIEVAL_TASKS):
        plot_retrieval(report, out / "retrieval.png")
        report["plots"]["retrieval"] = "retrieval.png"
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))
    return {
        "json": out / "report.json",
        "markdown": out / "report.md",
        **{k: out / v for k, v in report["plots"].items()},
    }
