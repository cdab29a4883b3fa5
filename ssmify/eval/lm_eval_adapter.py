"""lm-evaluation-harness on an already-loaded student (or any causal LM), through lm_eval's own HFLM.

Task names are the harness's; `lm_eval_include` adds folders of local task YAML files, which run offline
when their dataset is local (e.g. `dataset_path: json` with `data_files`). The harness is an optional
dependency (`pip install 'ssmify[eval]'`) and is imported only here.
"""

from __future__ import annotations

import functools
import logging
import numbers

from transformers import PreTrainedModel

from ssmify.errors import SsmifyError
from ssmify.eval.data import EvalData
from ssmify.eval.options import EvalOptions

log = logging.getLogger(__name__)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise SsmifyError("lm-eval tasks need lm-evaluation-harness: pip install 'ssmify[eval]'") from err
    return lm_eval, HFLM, TaskManager


@functools.lru_cache(maxsize=4)
def _task_manager(names: tuple[str, ...], include: tuple[str, ...]):
    _, _, TaskManager = _import_lm_eval()
    if include:
        local = TaskManager(include_path=list(include), include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=list(include) or None)
    missing = sorted(set(names) - set(manager.all_tasks))
    if missing:
        where = (
            f" or in {', '.join(include)}" if include else "; pass --lm-eval-include DIR for local task files"
        )
        raise SsmifyError(f"unknown lm-eval task(s) {', '.join(missing)}: not in lm-eval's task list{where}")
    return manager


def task_manager(names: list[str], include: list[str]):
    """A TaskManager that knows every requested task; indexes the harness's built-in tasks only if needed."""
    return _task_manager(tuple(names), tuple(include))


def _metrics(task_results: dict) -> dict:
    """The numeric entries of one task's results (drops "alias", "name" and "N/A" stderrs)."""
    return {
        key: float(value)
        for key, value in task_results.items()
        if isinstance(value, numbers.Number) and not isinstance(value, bool)
    }


def run_harness(model: PreTrainedModel, data: EvalData, options: EvalOptions, manager) -> dict:
    """{task: {metric: value}} for one model."""
    lm_eval, HFLM, _ = _import_lm_eval()
    harness_model = HFLM(
        pretrained=model, tokenizer=data.tokenizer, backend="causal", batch_size=options.batch_size
    )
    output = lm_eval.simple_evaluate(
        model=harness_model,
        tasks=list(options.lm_eval_tasks),
        task_manager=manager,
        limit=options.lm_eval_limit,
        log_samples=False,
        random_seed=options.seed,
        numpy_random_seed=options.seed,
        torch_random_seed=options.seed,
    )
    return {task: _metrics(results) for task, results in output["results"].items()}


def lm_eval_tasks(
    model: PreTrainedModel,
    teacher: PreTrainedModel | None = None,
    data: EvalData | None = None,
    options: EvalOptions | None = None,
) -> dict:
    """{task: {"metrics": {...}, "teacher_metrics": {...}}} for options.lm_eval_tasks."""
    options = options or EvalOptions()
    if not options.lm_eval_tasks:
        raise SsmifyError("no lm-eval task named: use --tasks lm-eval:TASK")
    if data is None or data.tokenizer is None:
        raise SsmifyError("lm-eval tasks need the model's tokenizer; save one beside the model")
    manager = task_manager(options.lm_eval_tasks, options.lm_eval_include)
    student = run_harness(model, data, options, manager)
    teacher_results = run_harness(teacher, data, options, manager) if teacher is not None else {}
    result = {}
    for task, metrics in student.items():
        result[task] = {"metrics": metrics}
        if task in teacher_results:
            result[task]["teacher_metrics"] = teacher_results[task]
    return result
