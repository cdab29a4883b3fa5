"""Score the teacher, the seeded student and the distilled student on one fixed held-out slice.

The evaluators are ssmify.eval's: perplexity and agreement (KL, top-1) share one pass over the
slice's windows, and speed measures decode tokens/s and memory at a long context for the distilled
student and the teacher in the same run. Each student's results are saved to evaluation.json as soon
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
from ssmify.eval.tasks import run_tasks

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class EvalSlice:
    """The held-out text scored: its first `tokens` tokens, in windows of `seq_len`."""

    file: str
    tokens: int
    seq_len: int
    speed_context: int
    decode_tokens: int

    def describe(self) -> str:
        windows = self.tokens // self.seq_len
        return (
            f"the first {windows * self.seq_len:,} tokens of {Path(self.file).name} "
            f"({windows} window{'s' if windows != 1 else ''} of {self.seq_len})"
        )


def evaluate_models(
    teacher_dir: Path, students: dict[str, Path], data_slice: EvalSlice, out: Path, speed_of: str
) -> dict[str, dict]:
    """{student name: run_tasks results}; `speed_of` names the student whose speed is measured too.

    Every result holds the teacher's perplexity on the same windows ("teacher_value").
    """
    cache_file = out / EVALUATION_FILE
    cached = _read_cache(cache_file, data_slice)
    todo = [name for name in students if name not in cached]
    if not todo:
        log.info("evaluation: reusing %s", cache_file)
        return {name: cached[name] for name in students}
    teacher, tokenizer = load_teacher(teacher_dir, dtype="float32")
    data = load_data([data_slice.file], tokenizer, data_slice.seq_len, data_slice.tokens)
    options = EvalOptions(
        seq_len=data_slice.seq_len,
        max_tokens=data_slice.tokens,
        speed_lengths=(data_slice.speed_context,),
        decode_tokens=data_slice.decode_tokens,
    )
    for name in todo:
        tasks = ["perplexity", "agreement"] + (["speed"] if name == speed_of else [])
        log.info("evaluation: %s student on %s (%s)", name, data_slice.describe(), ", ".join(tasks))
        model, _ = load_teacher(students[name], dtype="float32")
        cached[name] = run_tasks(model, teacher, data, options, tasks)
        del model
        _write_cache(cache_file, data_slice, cached)
    return {name: cached[name] for name in students}


def _read_cache(path: Path, data_slice: EvalSlice) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return saved.get("results", {}) if saved.get("slice") == asdict(data_slice) else {}


def _write_cache(path: Path, data_slice: EvalSlice, results: dict[str, dict]) -> None:
    write_text_atomic(path, json.dumps({"slice": asdict(data_slice), "results": results}, indent=1))
