"""Zero-ablation of single KV groups in the SmolLM2 teacher: the copy loss (cross-entropy on the second copy of
4 random 128-token sequences repeated once) when one group's query heads output zero before o_proj, minus
the teacher's own (2.44 nats). One forward pass per group, 90 in all.

The script that produced copy_ablation.json (docs/benchmarks.md section 13):
    OMP_NUM_THREADS=1 .venv/bin/python docs/bench/copy_ablation.py
"""

import json
import time
from pathlib import Path

import torch

from ssmify.assets import smollm2_teacher_dir
from ssmify.convert.teacher import load_teacher

torch.set_num_threads(1)
model, tok = load_teacher(smollm2_teacher_dir(), dtype="float32")
model.eval()
cfg = model.config
H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
g = torch.Generator().manual_seed(0)
L = 128
first = torch.randint(100, cfg.vocab_size, (4, L), generator=g)
ids = torch.cat([first, first], 1)


def copy_loss():
    with torch.no_grad():
        logits = model(ids).logits[:, L:-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, L + 1 :].reshape(-1)
    ).item()


base = copy_loss()
print("base copy loss", base, flush=True)
res = {}
t = time.time()
for layer in range(cfg.num_hidden_layers):
    o = model.model.layers[layer].self_attn.o_proj
    for grp in range(K):
        qs = range(grp * H // K, (grp + 1) * H // K)

        def pre(mod, args, qs=qs):
            x = args[0].clone()
            for q in qs:
                x[..., q * D : (q + 1) * D] = 0
            return (x,)

        h = o.register_forward_pre_hook(pre)
        res[f"{layer}:{grp}"] = copy_loss() - base
        h.remove()
print(f"{time.time() - t:.0f} s")
top = sorted(res.items(), key=lambda kv: -kv[1])[:20]
print(json.dumps([(k, round(v, 3)) for k, v in top]))
json.dump({"base": base, "drop": res}, open(Path(__file__).with_name("copy_ablation.json"), "w"), indent=1)
