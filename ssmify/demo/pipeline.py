"""`run_demo`: text and teacher -> convert -> distill sized to the time budget -> evaluate -> report.

Output folder (DIR):

    demo.json         the demo's plan: settings, attention layers, the fitted recipe, the eval slice
    0-convert/        the seeded student, before any training
    1-matrix/ 2-hidden/ 3-logits/   the distillation stages (ssmify.distill's layout)
    student/          the final student: the last stage's model files (hard links where possible)
    evaluation.json   the scores of each student beside the teacher
    report.md  report.json  loss_curves.png  perplexity.png

Rerunning the demo with the same DIR continues an interrupted run (finished stages are skipped, the
current one resumes from its checkpoint, scores already computed are reused) with the plan it
started with; `overwrite=True` starts over.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssmify.atomic import atomic_directory, is_nonempty_dir, write_text_atomic
from ssmify.convert.teacher import load_config, load_teacher
from ssmify.demo.budget import (
    Throughput,
    evaluation_seconds,
    fastest_threads,
    forward_tokens_per_s,
    training_seconds,
)
from ssmify.demo.evaluation import EvalSlice, evaluate_models
from ssmify.demo.layers import cached_scores, choose_attention_layers, first_tokens
from ssmify.demo.report import (
    commands,
    describe_speed,
    machine,
    model_rows,
    results_table,
    speed_ratios,
    write_report,
)
from ssmify.distill.budget import fit_to_time
from ssmify.distill.recipe import Recipe, load_recipe, parse_recipe, stage_dir_name, stage_seq_len
from ssmify.distill.run import CONVERT_DIR
from ssmify.errors import SsmifyError

log = logging.getLogger(__name__)

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-demo.yaml"
DEMO_EXTRA = ("gguf", "gensim")
STATE_FILE = "demo.json"
STUDENT_DIR = "student"
EVAL_SEQ_LEN = 512
# Held-out windows scored at a budget of 10 minutes or more; fewer below, down to one.
EVAL_WINDOWS = 8
SPEED_CONTEXT = 4096
# Training-text tokens the layer sensitivity is measured on (once per teacher; cached).
SENSITIVITY_TOKENS = 512
DECODE_TOKENS = 16
# In-context retrieval (induction, passkey) at 1k and 2k: 4 samples per task and length keeps the
# teacher's and the two students' scoring to about 3 minutes of the budget on 2 cores.
RETRIEVAL_LENGTHS = (1024, 2048)
RETRIEVAL_SAMPLES = 4


@dataclass
class DemoSettings:
    """What the demo runs. teacher / train_text / heldout_text default to SmolLM2 and the Wikipedia
    excerpt from ssmify.assets; give all three to run it on other (e.g. tiny) models and text.
    cache_dir: where assets and the layer sensitivity are cached (default: ssmify.assets.cache_root())."""

    out: Path = Path("runs/demo")
    keep_attention: float | None = None
    attention_layers: list[int] | None = None
    layer_choice: str | None = (
        None  # even, sensitive, kl, retrieval or auto (default: the recipe's, else sensitive)
    )
    budget_minutes: float = 15.0
    recipe: Path | None = None
    eval_tokens: int | None = None
    eval_seq_len: int = EVAL_SEQ_LEN
    speed_context: int = SPEED_CONTEXT
    decode_tokens: int = DECODE_TOKENS
    retrieval_lengths: tuple[int, ...] = RETRIEVAL_LENGTHS
    retrieval_samples: int = RETRIEVAL_SAMPLES
    overwrite: bool = False
    teacher: Path | None = None
    train_text: Path | None = None
    heldout_text: Path | None = None
    cache_dir: Path | None = None
    sensitivity_tokens: int = SENSITIVITY_TOKENS
    teacher_name: str = "SmolLM2-135M-Instruct"
    text_name: str = "the gensim Wikipedia excerpt, split by article"


@dataclass
class DemoResult:
    table: str
    report: Path
    student: Path
    numbers: dict = field(default_factory=dict)


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run (or continue) the whole demo into settings.out; returns the table and where things are."""
    started = time.perf_counter()
    check_settings(settings)
    recipe_path = Path(settings.recipe) if settings.recipe is not None else default_recipe()
    base = load_recipe(recipe_path)
    out = Path(settings.out)
    saved = previous_run(out, settings.overwrite)
    custom_assets = [settings.teacher, settings.train_text, settings.heldout_text]
    if all(item is None for item in custom_assets):
        check_demo_extra()
    elif any(item is None for item in custom_assets):
        raise SsmifyError(
            "give teacher, train_text and heldout_text together, or none of them (the defaults)"
        )
    phases: dict[str, float] = {}

    step(1, f"text: {settings.text_name}, as train and held-out files (built once, then cached)")
    with timed(phases, "text"):
        train, heldout = _text(settings)
    step(2, f"teacher: {settings.teacher_name} as a plain Hugging Face folder (built once, then cached)")
    with timed(phases, "teacher"):
        teacher_dir = _teacher(settings)

    num_layers = load_config(teacher_dir).num_hidden_layers
    request = {
        "recipe": str(recipe_path.resolve()),
        "teacher": str(Path(teacher_dir).resolve()),
        "attention_layers": settings.attention_layers,
        "keep_attention": _keep_fraction(settings, base, num_layers),
    }
    if saved is not None and "recipe" not in saved:
        saved = None  # interrupted before its plan was saved: plan again (the conversion is redone)
    if saved is not None and saved["request"] != request:
        raise SsmifyError(
            f"{out} holds a demo run with other settings ({_differences(saved['request'], request)}); "
            "pass --overwrite to replace it, or --out for a new folder"
        )
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / STATE_FILE, json.dumps({"request": request}, indent=1))
        plan = plan_run(
            settings, base, recipe_path, request, teacher_dir, train, heldout, num_layers, started, phases
        )
        gc.collect()  # the teacher and the seeded student loaded for planning are no longer needed
    else:
        plan = saved
        torch.set_num_threads(plan["summary"]["torch_threads"])  # as measured when the run was planned
        step(3, "convert: done in an earlier session")
        log.info(
            "continuing the demo run in %s (its plan: %s)", out, _describe_stages(plan["recipe"]["stages"])
        )
    recipe = parse_recipe(plan["recipe"], source=str(out / STATE_FILE))
    data_slice = EvalSlice(**plan["slice"])
    plan["sessions"] = [*plan.get("sessions", []), phases]  # this session's times, saved even if interrupted
    try:
        step(4, f"distill: {_describe_stages(plan['recipe']['stages'])}")
        with timed(phases, "distill"):
            summaries = _distill(recipe)
        student = finish_student(recipe, out / STUDENT_DIR)
        step(5, f"evaluate: teacher, seeded and distilled student on {data_slice.describe()}")
        with timed(phases, "evaluate"):
            results = evaluate_models(
                teacher_dir, {"seeded": out / CONVERT_DIR, "distilled": student}, data_slice, out, "distilled"
            )
    finally:
        phases["total"] = time.perf_counter() - started
        write_text_atomic(out / STATE_FILE, json.dumps(plan, indent=1))

    step(6, "report")
    kept = len(plan["attention_layers"])
    rows = model_rows(results, {"teacher": f"{num_layers}/{num_layers}", "student": f"{kept}/{num_layers}"})
    table = results_table(rows, data_slice.speed_context)
    ratios = speed_ratios(results)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "wall_seconds": sum(session["total"] for session in plan["sessions"]),
        "sessions": plan["sessions"],
        "teacher_name": settings.teacher_name,
        "text_name": settings.text_name,
        "teacher": str(teacher_dir),
        "train_text": str(train),
        "heldout_text": str(heldout),
        "recipe": str(recipe_path),
        "student": str(student),
        "plan": plan["summary"] | {"attention_layers": plan["attention_layers"]},
        "slice": data_slice.describe(),
        "rows": rows,
        "table": table,
        "speed_ratios": ratios,
        "speed_memory": describe_speed(ratios),
        "stages": summaries,
        "results": results,
        "commands": commands(student, teacher_dir, heldout, data_slice.tokens, data_slice.speed_context, out),
    }
    path = write_report(report, out)
    log.info("wrote %s in %.1f min", path, phases["total"] / 60)
    return DemoResult(table=table, report=path, student=student, numbers=report)


def plan_run(
    settings: DemoSettings,
    base: Recipe,
    recipe_path: Path,
    request: dict,
    teacher_dir: Path,
    train: Path,
    heldout: Path,
    num_layers: int,
    started: float,
    phases: dict[str, float],
) -> dict:
    """Convert the seeded student, measure this machine, size the stages to the budget; save the plan."""
    out = Path(settings.out)
    convert_options = base.student.convert_kwargs()
    mixer = convert_options.get("mixer", "mamba2")
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    sample = _sample(tokenizer, train, base)
    with timed(phases, "measure"):
        threads, by_threads = fastest_threads(teacher, sample)
    log.info(
        "torch threads: %d (teacher forward tokens/s by threads: %s)",
        threads,
        ", ".join(f"{n}: {v:.0f}" for n, v in by_threads.items()),
    )
    explicit = None
    if settings.attention_layers is not None:
        explicit = (settings.attention_layers, "as given")
    elif (
        settings.keep_attention is None
        and settings.layer_choice is None
        and base.student.attention_layers is not None
    ):
        explicit = (base.student.attention_layers, f"as {recipe_path.name} lists them")

    layer_choice = settings.layer_choice or base.student.layer_choice or "sensitive"

    def scores() -> dict[str, dict[int, float]]:
        with timed(phases, "sensitivity"):
            return cached_scores(
                teacher,
                tokenizer,
                teacher_dir,
                train,
                settings.sensitivity_tokens,
                mixer,
                layer_choice,
                settings.cache_dir,
            )

    layers, choice = choose_attention_layers(
        num_layers, _keep_fraction(settings, base, num_layers), explicit, layer_choice, scores
    )
    step(3, f"convert: {num_layers - len(layers)} of {num_layers} attention layers -> {mixer} mixers, seeded")
    with timed(phases, "convert"):
        from ssmify.convert import convert

        seeded = convert(
            teacher,
            out=out / CONVERT_DIR,
            tokenizer=tokenizer,
            mixer=mixer,
            attention_layers=layers,
            init=convert_options.get("init", "seeded"),
            overwrite=True,
        )

    recipe = load_recipe(
        recipe_path,
        [
            f"teacher={json.dumps(str(teacher_dir))}",
            f"student={json.dumps({'path': str(out / CONVERT_DIR)})}",
            f"data.train={json.dumps([str(train)])}",
            f"data.validation={json.dumps([str(heldout)])}",
            f"output_dir={json.dumps(str(out))}",
        ],
    )
    with timed(phases, "measure"):
        throughput = Throughput(by_threads[threads], forward_tokens_per_s(seeded, sample))

    budget_s = settings.budget_minutes * 60
    eval_tokens = settings.eval_tokens or default_eval_tokens(settings.budget_minutes, settings.eval_seq_len)
    data_slice = EvalSlice(
        file=str(heldout),
        tokens=eval_tokens,
        seq_len=settings.eval_seq_len,
        speed_context=settings.speed_context,
        decode_tokens=settings.decode_tokens,
        retrieval_lengths=tuple(settings.retrieval_lengths),
        retrieval_samples=settings.retrieval_samples,
    )
    retrieval_tokens = 2 * data_slice.retrieval_samples * sum(data_slice.retrieval_lengths)
    evaluation_s = evaluation_seconds(
        throughput, eval_tokens, settings.speed_context, settings.decode_tokens, retrieval_tokens
    )
    elapsed = time.perf_counter() - started
    train_s = training_seconds(budget_s, elapsed, evaluation_s, len(recipe.stages))
    if train_s <= 0:
        log.warning(
            "a %g-minute budget leaves no time for training after %.0f s of setup and ~%.0f s of evaluation; "
            "each stage runs its minimum of one batch",
            settings.budget_minutes,
            elapsed,
            evaluation_s,
        )
    converted_share = (num_layers - len(layers)) / num_layers
    recipe = fit_to_time(recipe, max(train_s, 1e-3), throughput.teacher, converted_share)
    log.info(
        "plan: %.0f s already spent, ~%.1f min of training (teacher %.0f, student %.0f forward tokens/s), "
        "~%.1f min of evaluation",
        elapsed,
        train_s / 60,
        throughput.teacher,
        throughput.student,
        evaluation_s / 60,
    )
    plan = {
        "request": request,
        "attention_layers": layers,
        "recipe": recipe.model_dump(mode="json"),
        "slice": data_slice.__dict__,
        "summary": {
            "num_layers": num_layers,
            "mixer": mixer,
            "layer_choice": choice,
            "budget_minutes": settings.budget_minutes,
            "training_seconds": max(train_s, 0.0),
            "evaluation_seconds_estimate": evaluation_s,
            "setup_seconds": elapsed,
            "torch_threads": threads,
            "teacher_tokens_per_s_by_threads": by_threads,
            "teacher_tokens_per_s": throughput.teacher,
            "student_tokens_per_s": throughput.student,
            "speed_context": settings.speed_context,
        },
    }
    write_text_atomic(out / STATE_FILE, json.dumps(plan, indent=1))
    return plan


def check_settings(settings: DemoSettings) -> None:
    """One-line errors for values the demo cannot run with, before anything loads."""
    if settings.keep_attention is not None and not 0.0 <= settings.keep_attention <= 1.0:
        raise SsmifyError(f"--keep-attention {settings.keep_attention:g}: must be between 0 and 1")
    if not settings.budget_minutes > 0:
        raise SsmifyError(f"--budget-minutes {settings.budget_minutes:g}: must be more than 0")
    if settings.eval_tokens is not None and settings.eval_tokens < settings.eval_seq_len:
        raise SsmifyError(
            f"--eval-tokens {settings.eval_tokens}: must be at least one window of {settings.eval_seq_len} tokens"
        )


def default_recipe() -> Path:
    """recipes/smollm2-demo.yaml of the checkout this package runs from."""
    if not DEFAULT_RECIPE.is_file():
        raise SsmifyError(
            f"{DEFAULT_RECIPE}: the demo recipe is not there (ssmify is not running from a clone of its "
            "repository); pass --recipe with a copy of recipes/smollm2-demo.yaml"
        )
    return DEFAULT_RECIPE


def check_demo_extra() -> None:
    """The default teacher and text need the `demo` extra: say which package is missing, in one line."""
    missing = [name for name in DEMO_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise SsmifyError(
            f"ssmify demo needs {' and '.join(missing)} (the 'demo' extra) for its teacher and text: "
            "pip install 'ssmify[demo]'"
        )


def previous_run(out: Path, overwrite: bool) -> dict | None:
    """The plan of the demo run in `out` to continue, or None to start fresh (after clearing it if asked)."""
    state = out / STATE_FILE
    if overwrite and out.exists():
        if is_nonempty_dir(out) and not state.is_file():
            raise SsmifyError(f"{out}: not a demo folder (no {STATE_FILE}); refusing to delete it")
        log.info("--overwrite: deleting the earlier demo run in %s", out)
        shutil.rmtree(out)
        return None
    if state.is_file():
        try:
            return json.loads(state.read_text())
        except json.JSONDecodeError:
            raise SsmifyError(f"{state}: not valid JSON; pass --overwrite to start over") from None
    if is_nonempty_dir(out):
        raise SsmifyError(f"{out}: folder exists and holds no demo run; choose another --out")
    return None


def _keep_fraction(settings: DemoSettings, base: Recipe, num_layers: int) -> float:
    """The fraction of layers that keep attention: the setting, else the recipe's (listed layers count), else 0.5."""
    if settings.keep_attention is not None:
        return settings.keep_attention
    if base.student.keep_attention is not None:
        return base.student.keep_attention
    if base.student.attention_layers is not None:
        return len(base.student.attention_layers) / num_layers
    return 0.5


def default_eval_tokens(budget_minutes: float, seq_len: int) -> int:
    """EVAL_WINDOWS windows at 10 minutes or more, proportionally fewer below (at least one)."""
    windows = max(1, min(EVAL_WINDOWS, round(EVAL_WINDOWS * budget_minutes / 10)))
    return windows * seq_len


def finish_student(recipe: Recipe, target: Path) -> Path:
    """DIR/student: the last stage's model files, linked (or copied)."""
    index = len(recipe.stages) - 1
    last = Path(recipe.output_dir) / stage_dir_name(index, recipe.stages[index])
    with atomic_directory(target, overwrite=True) as staging:
        for item in last.iterdir():
            if item.is_file() and item.name != "summary.json":
                try:
                    os.link(item, staging / item.name)
                except OSError:
                    shutil.copy2(item, staging / item.name)
    return target


def _distill(recipe: Recipe) -> list[dict]:
    from ssmify.distill.run import run_recipe

    # resume=True: a fresh folder simply has nothing to skip; an interrupted one continues.
    return run_recipe(recipe, resume=True)


def _text(settings: DemoSettings) -> tuple[Path, Path]:
    if settings.train_text is not None:
        for path in (settings.train_text, settings.heldout_text):
            if not Path(path).is_file():
                raise SsmifyError(f"{path}: text file not found")
        return Path(settings.train_text), Path(settings.heldout_text)
    from ssmify.assets import wikipedia_text

    return wikipedia_text(settings.cache_dir)


def _teacher(settings: DemoSettings) -> Path:
    if settings.teacher is not None:
        return Path(settings.teacher)
    from ssmify.assets import smollm2_teacher_dir

    return smollm2_teacher_dir(settings.cache_dir)


def _sample(tokenizer, text: Path, recipe: Recipe) -> torch.Tensor:
    """A batch shaped like the last stage's micro batch, from the start of the training text."""
    stage = recipe.stages[-1]
    shape = (stage.micro_batch_size, stage_seq_len(recipe, stage))
    return first_tokens(tokenizer, text, shape[0] * shape[1]).view(shape)


def _describe_stages(stages: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['tokens']:,} tokens" for s in stages)


def _differences(before: dict, now: dict) -> str:
    return "; ".join(f"{k}: {before.get(k)!r} there, {now[k]!r} now" for k in now if before.get(k) != now[k])


def step(number: int, text: str) -> None:
    log.info("[%d/6] %s", number, text)


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
