"""The one training loop that serves every stage, written against `accelerate.Accelerator`.

Per optimizer step it reads one global batch (global_batch_tokens / seq_len sequences, fixed by
the seed and the step), gives each process its share, and accumulates micro batches of
micro_batch_size sequences. The number of accumulation steps is derived:

    accumulation = global_batch_tokens / (micro_batch_size * seq_len * num_processes)

so a 1-process and an N-process run with the same recipe take the same optimizer steps on the
same data. The teacher runs under no_grad in its own dtype, outside everything accelerate wraps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    ProjectConfiguration,
    set_seed,
)
from torch import nn
from tqdm.auto import tqdm

from ssmify.atomic import write_text_atomic
from ssmify.cards import (  # a stage folder with summary.json (written last) is finished
    SUMMARY_FILE,
    distillation_history,
)
from ssmify.convert.convert import model_card
from ssmify.disk_full import stop_when_disk_full
from ssmify.distill.checkpoints import (
    CHECKPOINTS_DIR,
    drop_checkpoints,
    load_checkpoint,
    newest_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    write_json_atomic,
)
from ssmify.distill.data import Blocks, DistillData
from ssmify.distill.objectives import build_objective
from ssmify.distill.recipe import Recipe, Stage, stage_dir_name, stage_seq_len
from ssmify.distill.schedules import lr_factor
from ssmify.distill.sharding import fsdp_plugin_for_stage
from ssmify.distill.state import distributed_state
from ssmify.distill.students import load_student, save_student
from ssmify.distill.teacher_cache import TeacherCache, stage_pins
from ssmify.distill.tracking import flush_trackers, make_trackers, project_name
from ssmify.errors import SsmifyError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """The sizes a stage runs with on this launch."""

    index: int
    stage: Stage
    seq_len: int
    num_processes: int
    accumulation: int
    steps: int

    @property
    def sequences_per_step(self) -> int:
        return self.stage.global_batch_tokens // self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.stage.global_batch_tokens


def plan_stage(recipe: Recipe, index: int, num_processes: int) -> StagePlan:
    """Derive accumulation and step count; a one-line error naming the field when they do not work out."""
    stage = recipe.stages[index]
    seq_len = stage_seq_len(recipe, stage)
    per_micro_step = stage.micro_batch_size * seq_len * num_processes
    if stage.global_batch_tokens % per_micro_step:
        raise SsmifyError(
            f"stages.{index}.global_batch_tokens: {stage.global_batch_tokens} is not a multiple of "
            f"micro_batch_size x seq_len x processes = {stage.micro_batch_size} x {seq_len} x {num_processes}"
        )
    steps = stage.tokens // stage.global_batch_tokens
    if steps == 0:
        raise SsmifyError(
            f"stages.{index}.tokens: {stage.tokens} is smaller than one batch "
            f"(global_batch_tokens {stage.global_batch_tokens})"
        )
    return StagePlan(index, stage, seq_len, num_processes, stage.global_batch_tokens // per_micro_step, steps)


@dataclass
class StageContext:
    """Everything a stage needs that the run provides."""

    recipe: Recipe
    index: int
    teacher: nn.Module
    tokenizer: Any
    start_dir: Path  # the student this stage starts from
    output_dir: Path
    data: DistillData

    @property
    def stage(self) -> Stage:
        return self.recipe.stages[self.index]

    @property
    def stage_dir(self) -> Path:
        return self.output_dir / stage_dir_name(self.index, self.stage)


def make_accelerator(recipe: Recipe, plan: StagePlan) -> Accelerator:
    """One Accelerator per stage, since accumulation differs between stages; it logs to the stage's trackers."""
    trackers = make_trackers(recipe, plan.index, distributed_state().is_main_process)
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=plan.stage.name == "matrix")]
    project = ProjectConfiguration(
        project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=plan.accumulation,
        mixed_precision=recipe.mixed_precision,
        log_with=trackers or None,
        project_config=project,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    # A launch config's gradient_accumulation_steps (an environment variable) would override the
    # argument; the recipe's global batch decides it here.
    accelerator.gradient_accumulation_steps = plan.accumulation
    fsdp_plugin_for_stage(accelerator)
    return accelerator


def fit_deepspeed_config(accelerator: Accelerator, plan: StagePlan) -> None:
    """Under DeepSpeed, set this stage's batch sizes and clipping in its config (they change between stages).

    accelerate fills only "auto" entries, once; the stages of one run share that config.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    micro = plan.stage.micro_batch_size
    plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=plan.accumulation,
        train_batch_size=micro * plan.accumulation * plan.num_processes,
        gradient_clipping=plan.stage.max_grad_norm or 0.0,
    )


def param_groups(
    model: nn.Module, weight_decay: float, lr_scales: dict[int, float] | None = None
) -> list[dict]:
    """Weight decay on matrices only (not on biases, norms, A_log, D, dt_bias), as nanoGPT does.

    `lr_scales` maps id(parameter) to a multiple of the stage's lr (the kept attention's `attention_lr`);
    each group carries its `lr_scale`, which the schedule multiplies."""
    lr_scales = lr_scales or {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for scale in sorted({1.0, *lr_scales.values()}):  # the order a checkpoint's optimizer state expects
        params = [p for p in trainable if lr_scales.get(id(p), 1.0) == scale]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return groups


def attention_lr_scales(stage: Stage, student: nn.Module) -> dict[int, float]:
    """id(parameter) -> attention_lr / lr for the kept attention's parameters; empty without attention_lr."""
    if stage.attention_lr is None:
        return {}
    from ssmify.distill.trainable import kept_attention

    scale = stage.attention_lr / stage.lr
    return {id(p): scale for module in kept_attention(student) for p in module.parameters()}


def checkpoint_activations(student: nn.Module, where: str) -> None:
    """Recompute each decoder block in the backward pass instead of keeping its activations.

    Without it every block keeps tens of L x d_model activations for the backward (a chunked mixer's
    per-chunk matrices among them), so memory grows with layers x sequence length; with it only each
    block's input is kept, and one block at a time is run again while its gradient is taken. Non-reentrant
    checkpointing, so frozen inputs and LoRA work as they do without it. `where` is the recipe field that
    errors name."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise SsmifyError(
            f"{where}: {type(student).__name__} does not support activation checkpointing; set it to false"
        )
    student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def train_stage(ctx: StageContext, resume: bool) -> dict:
    """Run one stage to the end (or from its newest checkpoint), save its student, and return its summary."""
    recipe, stage = ctx.recipe, ctx.stage
    tracking = bool(recipe.tracking.report_to)
    stage_start = time.perf_counter()
    plan = plan_stage(recipe, ctx.index, distributed_state().num_processes)
    accelerator = make_accelerator(recipe, plan)
    main = accelerator.is_main_process
    set_seed(recipe.seed + ctx.index)

    student = load_student(ctx.start_dir)
    if stage.activation_checkpointing:
        checkpoint_activations(student, f"stages.{ctx.index}.activation_checkpointing")
    where = f"stages.{ctx.index}.trainable"
    objective = build_objective(stage, student, where)
    trainable_parameters = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    if not trainable_parameters:
        raise SsmifyError(f"stages.{ctx.index}.trainable: {stage.trainable!r} selects no parameters")
    groups = param_groups(objective, stage.weight_decay, attention_lr_scales(stage, student))
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=stage.betas, eps=stage.eps)
    fit_deepspeed_config(accelerator, plan)
    model, optimizer = accelerator.prepare(objective, optimizer)
    validation = validation_set(ctx.data.validation, stage, plan)
    teacher = ctx.teacher if stage.teacher_cache is None else open_teacher_cache(ctx, plan, len(validation))

    checkpoints = ctx.stage_dir / CHECKPOINTS_DIR
    resume_from = resume_checkpoint(accelerator, checkpoints) if resume else None
    if resume_from is not None:
        progress = load_checkpoint(accelerator, resume_from)  # its "seconds" are the earlier sessions'
        ctx.data.train.load_state_dict(progress.get("data"))  # a stream starts there, not from its beginning
        if main:
            logger.info("%s: resuming from %s", ctx.stage_dir.name, resume_from)
    else:
        progress = {"step": 0, "seconds": 0.0, "losses": [], "val_losses": []}
        progress["val_losses"].append([0, evaluate(model, objective, teacher, validation, plan, accelerator)])

    earlier_seconds = progress["seconds"]
    if tracking:
        accelerator.init_trackers(project_name(recipe), config={"lr": stage.lr, "tokens": stage.tokens})
    bar = tqdm(
        total=plan.steps, initial=progress["step"], desc=ctx.stage_dir.name, unit="step", disable=not main
    )
    # tokens/s of the optimizer steps alone: validation and checkpoints are not counted
    train_seconds, train_steps, tokens_per_s = 0.0, 0, 0.0
    model.train()
    try:  # the bar is closed before an error message, so that the message is the last line
        for step in range(progress["step"], plan.steps):
            lr = stage.lr * lr_factor(stage.schedule, step, plan.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            step_start = time.perf_counter()
            loss, grad_norm = train_step(model, objective, teacher, ctx.data.train, step, plan, accelerator)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                bad = "loss" if not math.isfinite(loss) else "gradient norm"
                last = newest_checkpoint(checkpoints)
                hint = (
                    f"the last good checkpoint is {last} (continue it with --resume, e.g. after lowering lr)"
                    if last is not None
                    else f"no checkpoint was written yet; the stage starts again from {ctx.start_dir}"
                )
                raise SsmifyError(
                    f"{ctx.stage_dir.name}: the {bad} became {loss if bad == 'loss' else grad_norm} at step "
                    f"{step + 1}; stopped without saving it, and {hint}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            progress["step"] = done
            progress["losses"].append(loss)
            train_steps += 1
            train_seconds += time.perf_counter() - step_start
            tokens_per_s = train_steps * plan.tokens_per_step / max(train_seconds, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            if tracking and done % stage.log_every == 0:
                accelerator.log(
                    {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}, step=done
                )
            if stage.eval_every and done % stage.eval_every == 0 and done < plan.steps:
                val = evaluate(model, objective, teacher, validation, plan, accelerator)
                progress["val_losses"].append([done, val])
                if tracking:
                    accelerator.log({"val_loss": val}, step=done)
            if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < plan.steps:
                progress["seconds"] = earlier_seconds + time.perf_counter() - stage_start
                progress["data"] = ctx.data.train.state_dict()
                save_checkpoint(accelerator, checkpoints, done, progress, recipe.keep_checkpoints)
                flush_trackers(accelerator.trackers)  # what a resume continues from is logged on disk too
    finally:
        bar.close()

    val = evaluate(model, objective, teacher, validation, plan, accelerator)
    progress["val_losses"].append([plan.steps, val])
    seconds = earlier_seconds + time.perf_counter() - stage_start
    state = accelerator.get_state_dict(model)
    summary = {
        "stage": ctx.stage_dir.name,
        "tokens": plan.steps * plan.tokens_per_step,
        "steps": plan.steps,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(plan.steps * plan.tokens_per_step / max(seconds, 1e-9), 1),
        # this launch's optimizer steps alone (no validation, checkpoint or save, no earlier session)
        "train_tokens_per_s": round(tokens_per_s, 1) if train_steps else None,
        "loss_first": progress["losses"][0],
        "loss_last": progress["losses"][-1],
        "val_loss_first": progress["val_losses"][0][1],
        "val_loss_last": progress["val_losses"][-1][1],
        "trainable_parameters": trainable_parameters,
        "processes": plan.num_processes,
        "accumulation": plan.accumulation,
        "losses": progress["losses"],
        "val_losses": progress["val_losses"],
    }
    if main:
        fresh = load_student(ctx.start_dir)
        fresh_objective = build_objective(stage, fresh, where)
        fresh_objective.load_state_dict(state)
        last = newest_checkpoint(checkpoints)
        intact = f"checkpoint {last} is intact" if last is not None else "it wrote no checkpoint"
        with stop_when_disk_full(
            ctx.stage_dir, "the stage's student", f"{intact}; free some space and --resume"
        ):
            save_student(fresh_objective, fresh, ctx.stage_dir, ctx.tokenizer)
            earlier = distillation_history(ctx.start_dir)
            write_text_atomic(ctx.stage_dir / "README.md", model_card(fresh, None, [*earlier, summary]))
            write_json_atomic(ctx.stage_dir / SUMMARY_FILE, summary)
        if not recipe.keep_finished_checkpoints:
            drop_checkpoints(ctx.stage_dir)
        if tracking:
            accelerator.log({"val_loss": val}, step=plan.steps)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:
        tracker.finish()  # not end_training(): that also ends the process group, which later stages need
    accelerator.free_memory()
    return summary


def open_teacher_cache(ctx: StageContext, plan: StagePlan, validation: int) -> TeacherCache:
    """The stage's teacher cache, checked against this recipe, tokenizer and teacher (it replaces the teacher)."""
    dtype = str(next(ctx.teacher.parameters()).dtype).removeprefix("torch.")
    pins = stage_pins(ctx.recipe, ctx.index, ctx.tokenizer, dtype)
    where = f"stages.{ctx.index}.teacher_cache"
    return TeacherCache.open(
        ctx.stage.teacher_cache, pins, plan.steps * plan.sequences_per_step, validation, where
    )


def local_micro_batches(plan: StagePlan, step: int, process_index: int) -> list[int]:
    """The global index of the first sequence of each of this process's micro batches of step `step`.

    Micro batch a of process p holds sequences (a x processes + p) x micro_batch_size onwards, so the
    processes together cover the global batch whatever their count, and each reads only its share."""
    first, size = step * plan.sequences_per_step, plan.stage.micro_batch_size
    return [first + (a * plan.num_processes + process_index) * size for a in range(plan.accumulation)]


def targets_for(
    objective: nn.Module, teacher: nn.Module | TeacherCache, input_ids: torch.Tensor, rows: Any
) -> Any:
    """The teacher's targets for a batch: from the teacher, or read from its cache at `rows`.

    rows is the global index of the first training sequence (an int) or the validation positions (a tensor).
    """
    if not isinstance(teacher, TeacherCache):
        return objective.teacher_targets(teacher, input_ids)
    if isinstance(rows, int):
        return teacher.train_targets(rows, input_ids).to(input_ids.device)
    return teacher.validation_targets(rows, input_ids).to(input_ids.device)


def train_step(
    model: nn.Module,
    objective: nn.Module,
    teacher: nn.Module | TeacherCache,
    train: Blocks,
    step: int,
    plan: StagePlan,
    accelerator: Accelerator,
) -> tuple[float, float]:
    """Forward and backward over this process's micro batches of global step `step`.

    Returns the loss averaged over all processes and the gradient norm (before clipping; 0.0 when
    clipping is off), both as floats, so that the caller can stop before the optimizer step.
    """
    total = torch.zeros((), device=accelerator.device)
    for first in local_micro_batches(plan, step, accelerator.process_index):
        micro = train.take(first, plan.stage.micro_batch_size).to(accelerator.device)
        with accelerator.accumulate(model):
            targets = targets_for(objective, teacher, micro, first)
            loss = model(micro, targets)["loss"]
            accelerator.backward(loss)
        total += loss.detach().float()
    loss_value = accelerator.reduce(total / plan.accumulation, reduction="mean").item()
    grad_norm = 0.0
    if plan.stage.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(model.parameters(), plan.stage.max_grad_norm)
        grad_norm = float(norm) if norm is not None else 0.0
    return loss_value, grad_norm


def validation_set(validation: Blocks, stage: Stage, plan: StagePlan) -> torch.Tensor:
    """The fixed validation blocks: the first eval_tokens / seq_len (at least one), for any process count."""
    return validation.first(max(stage.eval_tokens // plan.seq_len, 1))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: nn.Module,
    teacher: nn.Module | TeacherCache,
    validation: torch.Tensor,
    plan: StagePlan,
    accelerator: Accelerator,
) -> float:
    """The objective's mean loss over the validation blocks, which the processes share out.

    Every process runs the same number of forward passes (FSDP and ZeRO-3 need that): one that
    has run out of blocks reruns the first one with weight zero.
    """
    model.eval()
    size = plan.stage.micro_batch_size
    local = torch.arange(len(validation))[accelerator.process_index :: plan.num_processes]
    passes = math.ceil(math.ceil(len(validation) / plan.num_processes) / size)
    total = torch.zeros(2, device=accelerator.device)
    for i in range(passes):
        rows = local[i * size : (i + 1) * size]
        weight = float(len(rows))
        rows = rows if len(rows) else torch.zeros(1, dtype=torch.long)  # validation[0], weight zero
        chunk = validation[rows].to(accelerator.device)
        loss = model(chunk, targets_for(objective, teacher, chunk, rows))["loss"].float()
        total += torch.stack([loss * weight, torch.tensor(weight, device=total.device)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()
