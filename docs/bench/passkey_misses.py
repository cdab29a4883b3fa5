"""Which passkey samples a student misses: the 16 scored samples per length of `heads_rescore.py`, one line each.

`heads_rescore.py` gives one accuracy per length. This rebuilds the same samples (the evaluator's seed, the
lengths in the same order, so the generator draws the same prompts) and prints, for every sample, how far
the passkey sits from the question (tokens from the fact to the end of the prompt), and the teacher's and each
student's greedy answer, so that misses can be read against the distance.

    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/passkey_misses.py STUDENT_DIR [STUDENT_DIR ...]
"""

import sys

import torch
from transformers import AutoModelForCausalLM

import ssmify  # noqa: F401  (registers the student classes)
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.lookup import filler_tokens, passkey_sample
from ssmify.convert.teacher import load_teacher
from ssmify.eval.options import EvalOptions
from ssmify.eval.retrieval import generate_passkey, passkey_answered

SAMPLES, LENGTHS = 16, (1024, 2048)


def distance(sample) -> int:
    """Tokens from the passkey's first digit in the fact to the end of the prompt."""
    ids, digits = sample.prompt_ids.tolist(), sample.answer_ids.tolist()[-len(sample.passkey) :]
    for start in range(len(ids) - len(digits)):
        if ids[start : start + len(digits)] == digits:
            return len(ids) - start
    raise ValueError(
        f"passkey {sample.passkey}: its digits are not in the prompt as the answer tokenizes them"
    )


teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
models = {"teacher": teacher} | {
    path: AutoModelForCausalLM.from_pretrained(path).eval() for path in sys.argv[1:]
}
generator = torch.Generator().manual_seed(EvalOptions().seed)
filler = filler_tokens(tokenizer)
for length in LENGTHS:
    samples = [passkey_sample(length, tokenizer, filler, generator) for _ in range(SAMPLES)]
    print(f"length {length}: distance, passkey, then per model: hit (1/0) and answer", flush=True)
    far = {id(s): distance(s) for s in samples}
    rows = sorted(samples, key=lambda s: far[id(s)])
    with torch.no_grad():
        answers = {
            name: [
                tokenizer.decode(generate_passkey(model, s), skip_special_tokens=True).strip() for s in rows
            ]
            for name, model in models.items()
        }
    for i, sample in enumerate(rows):
        cells = [
            f"{int(passkey_answered(sample.passkey, answers[name][i]))} {answers[name][i]!r}"
            for name in models
        ]
        print(f"{far[id(sample)]:5d} {sample.passkey} | " + " | ".join(cells), flush=True)
    for name in models:
        hits = sum(passkey_answered(s.passkey, a) for s, a in zip(rows, answers[name]))
        print(f"  {name}: {hits}/{len(rows)}", flush=True)
