"""KV4 variants on a 16-bit model (no weight quantization): which layers and which key smoothing
keep per-token INT4 keys usable. Prints PPL of FP16, all-INT4 KV, then each variant.

    python examples/benchmarks/kv4_variants.py MODEL_DIR TOKENS "ALPHA/SKIP;..." [cpu|cuda]

A variant is ``alpha/layers``: key smoothing exponent (0 = none) and a comma list of layers
kept 16-bit, e.g. "0.5/;0/0,1;0.75/0,1". Calibration: 2 x 1024 Austen tokens; evaluation: the
first TOKENS tokens of wiki (windows of up to 2048). docs/accuracy.md has the Qwen2.5 / SmolLM2
numbers.
"""
import math
import sys

import torch
from transformers import AutoTokenizer

from vllm_atom.data import find_text
from vllm_atom.evaluate import SimModel, eval_windows, load_model
from vllm_atom.quantize.smooth import KeyPairMax, fold_key_smoothing, smoothing_factors

P, NTOK, VARIANTS = sys.argv[1], int(sys.argv[2]), sys.argv[3]
DEV = sys.argv[4] if len(sys.argv) > 4 else 'cpu'
model, io = load_model(P, DEV)
tok = AutoTokenizer.from_pretrained(P)
sim = SimModel(model, io)
sim.add_method('fp16', None); sim.add_method('kv4', None, 4)
W = eval_windows(tok, find_text('wiki'), min(NTOK, 2048), NTOK)
cal = eval_windows(tok, find_text('austen'), 1024, 2048)
attn = [l.self_attn for l in model.model.layers]
def ppl(m):
    sim.activate(m)
    nll = n = 0
    for ids in W:
        lp = torch.log_softmax(sim.logits(ids)[:-1], -1)
        nll -= float(lp.gather(1, ids[1:, None]).sum()); n += len(ids) - 1
    return math.exp(nll / n)
print('fp16', ppl('fp16'), 'kv4', ppl('kv4'), flush=True)
sim.activate('fp16')
d = attn[0].head_dim
ks = [KeyPairMax(a.k_proj.out_features // d, d) for a in attn]
hooks = [a.k_proj.register_forward_hook(lambda m, i, o, s=s: s.add(o)) for a, s in zip(attn, ks)]
for row in cal:
    sim.logits(row)
for h in hooks: h.remove()
print('pair max per layer', [round(k.value.max().item(), 1) for k in ks], flush=True)
orig = [[p.data.clone() for p in (a.q_proj.weight, a.k_proj.weight) + tuple(b for b in (a.q_proj.bias, a.k_proj.bias) if b is not None)] for a in attn]
def reset():
    for a, o in zip(attn, orig):
        ps = [a.q_proj.weight, a.k_proj.weight] + [b for b in (a.q_proj.bias, a.k_proj.bias) if b is not None]
        for p, v in zip(ps, o): p.data.copy_(v)
for name in VARIANTS.split(';'):
    reset()
    alpha, skip = name.split('/')
    alpha = float(alpha); skip = [int(x) for x in skip.split(',') if x]
    if alpha > 0:
        for a, k in zip(attn, ks):
            fold_key_smoothing(a.q_proj, a.k_proj, smoothing_factors(k.value, alpha))
    sim.add_method(name, None, 4, skip)
    print(f'alpha {alpha} skip {skip}: kv4', ppl(name), flush=True)
