"""Retrieval of distilled students on 16 samples per task and length instead of the bench's 4.

With 4 samples a passkey point moves in steps of 0.25, so one sample decides between two rows of
docs/benchmarks.md section 13. This scores the kept students again with `ssmify.eval.retrieval` on 16
seeded samples per task and length (the evaluator's default seed; the lengths draw in turn from one
generator, so these are not the bench's 4 samples and 12 more), the teacher once on the same samples, and prints accuracy, retention per length and the overall retention
(the points where the teacher scores at least 50%), one JSON line per student. It also prints held-out
perplexity on the bench's slice (and on the same windows with BOS in place of their first token) (the first 4,096 held-out tokens in 512-token windows), so that a stage
folder the bench does not score (the one before a last stage, say) can be compared with its rows.

    B=runs/bench
    OMP_NUM_THREADS=2 .venv/bin/python docs/bench/heads_rescore.py $B/heads_attn/heads9/hand-2cc6ee/synthetic10/seed0/3-logits \
        $B/heads_logits_heavy/heads9/hand-2cc6ee/synthetic10/seed0/3-logits \
        $B/heads_logits_heavy/10pct/retrieval/synthetic10/seed0/3-logits > docs/bench/heads_rescore.txt

`--teacher-from FILE` takes the teacher's scores from the first line of an earlier output (same samples,
same slice) instead of scoring the teacher again.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir, wikipedia_text
from ssmify.convert.teacher import load_teacher
from ssmify.eval.data import EvalData, load_data
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import against_teacher, induction, passkey, summarize
from ssmify.eval.scan import scan_windows

SAMPLES, LENGTHS = 16, (1024, 2048)
options = EvalOptions(lengths=LENGTHS, samples=SAMPLES, progress=False)


def perplexity(model, windows: torch.Tensor) -> float:
    """Held-out perplexity on the bench's slice, as scripts/bench/retrieval.py computes it."""
    sums = scan_windows(model, windows, None, 4, agreement=False, progress=False)
    return round(float(torch.tensor(sums.nll / sums.tokens).exp()), 3)


def scores(model, data: EvalData) -> dict:
    """{task: {"points": [{"length", "accuracy", ...}]}} for induction and passkey."""
    return {
        task: evaluate(model, None, data, options)
        for task, evaluate in (("induction", induction), ("passkey", passkey))
    }


teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
data = EvalData(tokenizer)
windows = load_data([str(wikipedia_text()[1])], tokenizer, 512, max_tokens=4096).windows
bos_windows = windows.clone()
bos_windows[:, 0] = tokenizer.bos_token_id  # as data.bos trains: BOS in place of each window's first token
with torch.no_grad():
    teacher_bos_perplexity = perplexity(teacher, bos_windows)
paths = sys.argv[1:]
if paths[:1] == ["--teacher-from"]:  # the teacher's line of an earlier rescoring: same samples, same slice
    earlier = json.loads(open(paths[1]).readline())
    reference = {
        t: {"points": [{"length": int(n), "accuracy": a} for n, a in by_length.items()]}
        for t, by_length in earlier["teacher"].items()
    }
    teacher_perplexity, paths = earlier["perplexity"], paths[2:]
else:
    with torch.no_grad():
        reference = scores(teacher, data)
        teacher_perplexity = perplexity(teacher, windows)
print(
    json.dumps(
        {
            "teacher": {t: {p["length"]: p["accuracy"] for p in r["points"]} for t, r in reference.items()},
            "perplexity": teacher_perplexity,
            "perplexity, BOS first": teacher_bos_perplexity,
        }
    ),
    flush=True,
)
for path in paths:
    student = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        student_perplexity = perplexity(student, windows)
        student_bos_perplexity = perplexity(student, bos_windows)
    merged = against_teacher(scores(student, data), reference)
    summary = summarize(merged)
    print(
        json.dumps(
            {
                "student": path,
                "perplexity x teacher": round(student_perplexity / teacher_perplexity, 3),
                "perplexity x teacher, BOS first": round(student_bos_perplexity / teacher_bos_perplexity, 3),
                "accuracy": {
                    t: {p["length"]: round(p["accuracy"], 3) for p in r["points"]} for t, r in merged.items()
                },
                "retention by length": {n: round(v, 3) for n, v in summary["by_length"].items()},
                "overall": round(summary["overall"], 3),
            }
        ),
        flush=True,
    )
