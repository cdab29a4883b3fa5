"""The task names `--tasks` accepts, what each needs, and running a list of them into one results dict."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.eval.agreement import agreement_result
from ssmify.eval.alignment import alignment
from ssmify.eval.checks import require_teacher, require_windows
from ssmify.eval.data import EvalData
from ssmify.eval.lm_eval_adapter import lm_eval_tasks
from ssmify.eval.options import EvalOptions
from ssmify.eval.perplexity import perplexity_result
from ssmify.eval.recall import recall
from ssmify.eval.retrieval import RETRIEVAL_TASKS, induction, passkey, summarize
from ssmify.eval.scan import scan_windows
from ssmify.eval.speed import speed

LM_EVAL_PREFIX = "lm-eval:"
GROUPS = {"retrieval": RETRIEVAL_TASKS}  # a name that stands for several tasks


@dataclass(frozen=True)
class TaskNeeds:
    teacher: bool
    data: bool


TASKS = {
    "perplexity": TaskNeeds(teacher=False, data=True),
    "agreement": TaskNeeds(teacher=True, data=True),
    "alignment": TaskNeeds(teacher=True, data=True),
    "induction": TaskNeeds(teacher=False, data=False),
    "passkey": TaskNeeds(teacher=False, data=False),
    "recall": TaskNeeds(teacher=False, data=False),
    "speed": TaskNeeds(teacher=False, data=False),
}


def default_tasks(has_teacher: bool) -> list[str]:
    """Perplexity, plus agreement when there is a teacher: the cheap quality numbers."""
    return ["perplexity", "agreement"] if has_teacher else ["perplexity"]


def parse_tasks(text: str) -> list[str]:
    """Split a comma list and check every name; a group name stands for its tasks; `lm-eval:NAME` passes
    NAME to the harness."""
    names = [
        part for name in text.split(",") if name.strip() for part in GROUPS.get(name.strip(), [name.strip()])
    ]
    if not names:
        raise SsmifyError("--tasks is empty; name at least one task")
    for name in names:
        if name in TASKS:
            continue
        if name.startswith(LM_EVAL_PREFIX) and name[len(LM_EVAL_PREFIX) :]:
            continue
        choices = ", ".join([*TASKS, *GROUPS, LM_EVAL_PREFIX + "TASK"])
        raise SsmifyError(f"unknown task {name!r} in --tasks; choose from {choices}")
    return list(dict.fromkeys(names))


def lm_eval_names(tasks: list[str]) -> list[str]:
    """The harness task names inside a task list."""
    return [name[len(LM_EVAL_PREFIX) :] for name in tasks if name.startswith(LM_EVAL_PREFIX)]


def check_tasks(tasks: list[str], has_teacher: bool, has_data: bool) -> None:
    """Refuse, before loading anything, a task whose teacher or data is missing."""
    for name in tasks:
        needs = TASKS.get(name, TaskNeeds(teacher=False, data=False))
        if needs.teacher and not has_teacher:
            require_teacher(None, name)
        if needs.data and not has_data:
            require_windows(None, name)


def run_tasks(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None,
    data: EvalData,
    options: EvalOptions,
    tasks: list[str],
) -> dict:
    """Run the tasks in order; perplexity and agreement share one pass over the windows."""
    check_tasks(tasks, teacher is not None, data.windows is not None)
    results: dict = {}
    if "perplexity" in tasks or "agreement" in tasks:
        sums = scan_windows(
            model,
            data.windows,
            teacher,
            options.batch_size,
            agreement="agreement" in tasks,
            progress=options.progress,
        )
        if "perplexity" in tasks:
            results["perplexity"] = perplexity_result(sums)
        if "agreement" in tasks:
            results["agreement"] = agreement_result(sums)
    if "alignment" in tasks:
        results["alignment"] = alignment(model, teacher, data, options)
    retrieval = {"induction": induction, "passkey": passkey, "recall": recall}
    for name, evaluate in retrieval.items():
        if name in tasks:
            results[name] = evaluate(model, teacher, data, options)
    summary = summarize(results)
    if summary is not None:
        results["retrieval"] = summary
    if "speed" in tasks:
        results["speed"] = speed(model, teacher, data, options)
    if lm_eval_names(tasks):
        results["lm_eval"] = lm_eval_tasks(model, teacher, data, options)
    return results
