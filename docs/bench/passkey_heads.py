"""Passkey retrieval mass of each KV group of the SmolLM2 teacher, beside its induction and previous-token mass.

On 4 passkey prompts of 1,024 tokens (the evaluator's builtin filler, generator seed 1, so not the scored
samples), teacher-forced with the answer appended: at every position that predicts an answer token, the
attention each query head puts on the passkey's own tokens in the fact (" The pass key is NNNNN. Remember it.
NNNNN is the pass key.", both copies, not the words around them, which the question repeats), averaged over
positions and prompts; a KV group takes its best query head, as `ssmify.convert.head_scores` does.
Sorted by passkey mass; the groups the circuit plan and the 3-layer plan keep are marked.

    OMP_NUM_THREADS=2 .venv/bin/python docs/bench/passkey_heads.py > docs/bench/passkey_heads.txt
"""

import torch
from passkey_prompts import passkey_prompts

from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.head_scores import induction_head_scores, previous_token_scores
from ssmify.convert.probes import teacher_attention
from ssmify.convert.teacher import load_teacher

LENGTH, SAMPLES = 1024, 4
CIRCUIT = {(16, 0), (11, 0), (18, 2), (17, 1), (23, 0), (20, 2), (23, 2), (24, 1), (22, 2)}
LAYERS = {16, 17, 18}

teacher, tokenizer = load_teacher(smollm2_teacher_dir(), dtype="float32")
teacher.eval()
config = teacher.config
heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
layers = range(config.num_hidden_layers)
mass = torch.zeros(len(layers), heads)
for ids, positions, _, key in passkey_prompts(tokenizer, LENGTH, SAMPLES):
    with torch.no_grad():
        probes = teacher_attention(teacher, ids[None], layers)
    for i in layers:
        rows = probes[i].probs[0][:, positions]  # (heads, answer positions, L)
        mass[i] += rows[..., key].sum(-1).mean(-1) / SAMPLES
    del probes
group = mass.view(len(layers), kv_heads, heads // kv_heads).amax(-1)
induction, previous = induction_head_scores(teacher), previous_token_scores(teacher)
order = sorted(((float(group[i, g]), i, g) for i in layers for g in range(kv_heads)), reverse=True)
print(f"{'group':>6} | passkey mass | induction mass | previous-token mass | kept by")
for score, i, g in order[:20]:
    kept = ", ".join(
        name for name, keeps in (("circuit", (i, g) in CIRCUIT), ("3 layers", i in LAYERS)) if keeps
    )
    print(f"{i:>3}:{g:<2} | {score:12.2f} | {induction[i, g]:14.2f} | {previous[i, g]:19.2f} | {kept}")
