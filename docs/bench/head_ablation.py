"""Ablation of single KV groups in the SmolLM2 teacher: convert only the named groups to seeded mixers,
keep every other head's attention, and score induction and passkey at 1k and 2k (4 samples each)."""
import sys, json, time
sys.path.insert(0, "/work/main/scripts/bench")
import torch
torch.set_num_threads(1)
from retrieval import retrieval_scores
import ssmify
from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher
from ssmify.eval.options import EvalOptions
teacher_dir = smollm2_teacher_dir()
_, tok = load_teacher(teacher_dir, dtype="float32")
options = EvalOptions(lengths=(1024, 2048), samples=4, progress=False)
for name, converted in [("prev-token heads 16:0 + 11:0", {(16, 0), (11, 0)}), ("low-score heads 5:1 + 27:2", {(5, 1), (27, 2)})]:
    keep = ",".join(f"{l}:{g}" for l in range(30) for g in range(3) if (l, g) not in converted)
    start = time.time()
    student = ssmify.convert(str(teacher_dir), attention_heads=keep, tokenizer=tok)
    print(name, json.dumps(retrieval_scores(student.eval(), tok, options)), f"{time.time() - start:.0f} s", flush=True)
