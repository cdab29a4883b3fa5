"""Score the teacher, the seeded student and the distilled student on one fixed held-out slice.

The evaluators are ssmify.eval's: perplexity and agreement (KL, top-1) share one pass over the
slice's windows, speed measures decode tokens/s and memory at a long context for the distilled
student and the teacher in the same run, and induction and passkey measure in-context retrieval at
`retrieval_lengths`. The retrieval samples depend on the seed and the tokenizer only, so the teacher
is scored on them once (as "teacher") and each student alone; `retrieval_rows` puts them side by side. Each student's results are saved to evaluation.json as soon
as they exist, keyed by the slice, so a rerun of the demo does not score them again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ssmify.atomic import write_text_atomic
from ssmify.convert.teacher import load_teacher
from ssmify.eval.data import load_data
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import against_teacher, summarize
from ssmify.eval.tasks import run_tasks

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
TEACHER = "teacher"
RETRIEVAL = ["induction", "passkey"]


@dataclass(frozen=True)
class EvalSlice:
    """The held-out text scored: its first `tokens` tokens, in windows of `seq_len`."""

    file: str
    tokens: int
    seq_len: int
    speed_context: int
    decode_tokens: int
    retrieval_lengths: tuple[int, ...] = (1024, 2048)
    retrieval_samples: int = 4

    def describe(self) -> str:
        windows = self.tokens // self.seq_len
        return (
            f"the first {windows * self.seq_len:,} tokens of {Path(self.file).name} "
            f"({windows} window{'s' if windows != 1 else ''} of {self.seq_len})"
        )


def evaluate_models(
    teacher_dir: Path, students: dict[str, Path], data_slice: EvalSlice, out: Path, speed_of: str
) -> dict[str, dict]:
    """{student name: run_tasks results}, and "teacher": its retrieval results when retrieval_lengths is set;
    `speed_of` names the student whose speed is measured too.

    Every result holds the teacher's perplexity on the same windows ("teacher_value").
    """
    cache_file = out / EVALUATION_FILE
    cached = _read_cache(cache_file, data_slice)
    todo = [name for name in students if name not in cached]
    wanted = [*students, TEACHER] if data_slice.retrieval_lengths else list(students)
    if all(name in cached for name in wanted):
        log.info("evaluation: reusing %s", cache_file)
        return {name: cached[name] for name in wanted}
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    data = load_data([data_slice.file], tokenizer, data_slice.seq_len, data_slice.tokens)
    options = EvalOptions(
        seq_len=data_slice.seq_len,
        max_tokens=data_slice.tokens,
        speed_lengths=(data_slice.speed_context,),
        decode_tokens=data_slice.decode_tokens,
        lengths=data_slice.retrieval_lengths,
        samples=data_slice.retrieval_samples,
    )
    if data_slice.retrieval_lengths and TEACHER not in cached:
        log.info("evaluation: teacher on %s", ", ".join(RETRIEVAL))
        cached[TEACHER] = run_tasks(teacher, None, data, options, RETRIEVAL)
        _write_cache(cache_file, data_slice, cached)
    for name in todo:
        tasks = ["perplexity", "agreement"] + (["speed"] if name == speed_of else [])
        log.info("evaluation: %s student on %s (%s)", name, data_slice.describe(), ", ".join(tasks))
        model, _ = load_teacher(students[name], dtype="float32")
        cached[name] = run_tasks(model, teacher, data, options, tasks)
        if data_slice.retrieval_lengths:
            cached[name].update(run_tasks(model, None, data, options, RETRIEVAL))
        del model
        _write_cache(cache_file, data_slice, cached)
    return {name: cached[name] for name in wanted}


def retrieval_rows(results: dict[str, dict]) -> dict[str, dict]:
    """{model: {"accuracy": {task: {length: accuracy}}, "retention": overall, "by_length": {...}}} with
    each student's retention against the teacher's results on the same samples."""
    teacher = results.get(TEACHER)
    if teacher is None:
        return {}
    rows = {}
    for name, result in results.items():
        merged = against_teacher(result, teacher)
        summary = summarize(merged)
        rows[name] = {
            "accuracy": {
                task: {p["length"]: p["accuracy"] for p in merged[task]["points"]} for task in RETRIEVAL
            },
            "retention": summary["overall"] if summary else None,
            "by_length": summary["by_length"] if summary else {},
            "not_meaningful": summary["not_meaningful"] if summary else [],
        }
    return rows


def _read_cache(path: Path, data_slice: EvalSlice) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    described = json.loads(json.dumps(asdict(data_slice)))  # tuples as JSON gives them back: lists
    return saved.get("results", {}) if saved.get("slice") == described else {}


def _write_cache(path: Path, data_slice: EvalSlice, results: dict[str, dict]) -> None:
    write_text_atomic(path, json.dumps({"slice": asdict(data_slice), "results": results}, indent=1))
