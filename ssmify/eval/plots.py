"""PNG plots for the report: alignment error per layer, retrieval against length, speed against length."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

STUDENT, TEACHER = "tab:blue", "tab:gray"


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_alignment(result: dict, path: Path) -> Path:
    """Relative matrix and hidden-state errors of each converted layer."""
    layers = [row["layer"] for row in result["layers"]]
    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    axis.plot(
        layers,
        [row["matrix_rel_error"] for row in result["layers"]],
        "o-",
        label="mixing matrix vs attention",
    )
    axis.plot(layers, [row["hidden_rel_error"] for row in result["layers"]], "s-", label="block output")
    axis.set(xlabel="layer", ylabel="relative error", title="Alignment with the teacher, per converted layer")
    axis.set_ylim(bottom=0)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.legend()
    return _save(figure, path)


def plot_retrieval(report: dict, path: Path) -> Path:
    """Accuracy against context length, student and teacher, one panel per retrieval task."""
    tasks = [task for task in ("induction", "passkey", "recall") if report.get(task, {}).get("points")]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        points = report[task]["points"]
        lengths = [p["length"] for p in points]
        axis.plot(lengths, [p["accuracy"] for p in points], "o-", color=STUDENT, label="student")
        if "teacher_accuracy" in points[0]:
            axis.plot(lengths, [p["teacher_accuracy"] for p in points], "s--", color=TEACHER, label="teacher")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="context length (tokens)", ylabel="accuracy", title=task, ylim=(-0.02, 1.02))
        axis.legend()
    figure.suptitle("In-context retrieval")
    return _save(figure, path)


def plot_speed(result: dict, path: Path) -> Path:
    """Prefill time, decode speed, peak memory and decoding state against context length."""
    panels = [
        ("prefill_s", "prefill (s)"),
        ("decode_tokens_per_s", "decode (tokens/s)"),
        ("peak_memory_bytes", "peak memory (MiB)"),
        ("state_bytes", "decoding state (MiB)"),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for axis, (key, label) in zip(axes.flat, panels):
        scale = 2**20 if key.endswith("bytes") else 1
        for prefix, name, color, style in (
            ("", "student", STUDENT, "o-"),
            ("teacher_", "teacher", TEACHER, "s--"),
        ):
            series = [
                (p["length"], p[prefix + key] / scale)
                for p in result["points"]
                if p.get(prefix + key) is not None
            ]
            if series:
                axis.plot(*zip(*series), style, color=color, label=name)
        axis.set_xscale("log", base=2)
        axis.set(xlabel="context length (tokens)", ylabel=label)
        if axis.has_data():
            axis.legend()
    figure.suptitle(f"Speed and memory on {result['device']} ({result['dtype']})")
    return _save(figure, path)
