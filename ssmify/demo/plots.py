"""The demo's PNG plots: each stage's loss curves, and the three models' held-out perplexity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

TRAIN, VALIDATION = "tab:blue", "tab:orange"
LOG_SCALE_SPAN = 20
STAGE_LOSS = {
    "matrix": "mixing-matrix error (Frobenius)",
    "hidden": "block-output error (L2)",
    "logits": "KL(teacher || student)",
}
MODEL_COLORS = {"teacher": "tab:gray", "seeded": "tab:red", "distilled": "tab:blue"}


def plot_stage_losses(summaries: list[dict], path: Path) -> Path:
    """One panel per stage: the training loss of every step and the validation loss where it was taken."""
    figure, axes = plt.subplots(1, len(summaries), figsize=(4.2 * len(summaries), 3.4), squeeze=False)
    for axis, summary in zip(axes[0], summaries):
        losses = summary["losses"]
        axis.plot(range(1, len(losses) + 1), losses, "-", color=TRAIN, lw=1.2, label="train")
        if summary.get("val_losses"):
            steps, values = zip(*summary["val_losses"])
            style = "o--" if len(steps) > 2 else "o"  # two points joined would suggest a straight path
            axis.plot(steps, values, style, color=VALIDATION, label="validation")
        name = summary["stage"].partition("-")[2]
        axis.set(
            title=f"{summary['stage']} ({summary['tokens']:,} tokens)",
            xlabel="optimizer step",
            ylabel=STAGE_LOSS.get(name, "loss"),
        )
        if min(losses) > 0 and max(losses) / min(losses) > LOG_SCALE_SPAN:
            axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
    figure.suptitle("Distillation: loss per stage")
    return _save(figure, path)


def plot_perplexity(rows: list[dict], path: Path, target_ratio: float | None = None) -> Path:
    """Bars of held-out perplexity per model, with the teacher x target_ratio line; a log scale when the
    values span more than LOG_SCALE_SPAN (a pure SSM before training is in the thousands)."""
    names = [row["label"] for row in rows]
    values = [row["perplexity"] for row in rows]
    colors = [MODEL_COLORS.get(row["name"], "tab:green") for row in rows]
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    bars = axis.bar(range(len(rows)), values, color=colors)
    axis.bar_label(bars, labels=[f"{v:,.1f}" if v < 1000 else f"{v:,.0f}" for v in values], padding=2)
    axis.set_xticks(range(len(rows)), names, fontsize=8)
    if max(values) / min(values) > LOG_SCALE_SPAN:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.set_ylim(top=max(values) * 3)
        axis.set_ylabel("perplexity (log scale)")
    else:
        axis.set_ylim(0, max(values) * 1.15)
        axis.set_ylabel("perplexity")
    axis.set_title("Held-out perplexity (lower is better)")
    teacher = next((row["perplexity"] for row in rows if row["name"] == "teacher"), None)
    if target_ratio is not None and teacher is not None:
        axis.axhline(
            teacher * target_ratio, color="tab:green", ls=":", lw=1, label=f"{target_ratio:g}x teacher"
        )
        axis.legend()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
