"""Which half of the INT4 KV cache costs perplexity, and how much a per-head Hadamard rotation wins back.

Simulation only (no kernel does this yet; issue 16): the model's 16-bit weights, every attention's
K and / or V fake-quantized to INT4 per (token, head) after RoPE as `reference.quantize_kv` does,
optionally in a rotated basis: X' = fq(X H) H^T with H the normalised Sylvester Hadamard matrix of
head_dim (`reference.fake_quantize_kv(x, rotate=True)`, what the kernels' ``kv_rotate_k`` computes; the
committed results/kv4-rotation-smollm2.json, 0370be2, came from a first form of this script that also
rounded X H to the 16-bit dtype before quantizing). For K that is what rotating Q and K online after RoPE computes ((Q H)(fq(K H))^T =
Q fq'(K)^T); for V what H folded into v_proj's rows and o_proj's columns computes.

    python examples/benchmarks/kv4_rotation.py MODEL_DIR [--text wiki] [--max-tokens 16384]
        [--variants nokv,base,k,v,hk,hv,hkv] [--out results/kv4-rotation-<model>.json]

Variants: nokv (no KV quantization), base (K and V INT4), k / v (only that one INT4), hk / hv (both
INT4, that one rotated), hkv (both rotated); with a trailing c (bc, kc, hkc, hkvc) the keys are
also centered first: each layer's mean post-RoPE key (per kv head and channel, over the first
--center-tokens of --center-text, `quantize.key_center.KeyMean`) is subtracted before quantizing
and added back after (`reference.fake_quantize_kv(..., center=)`, as `vllm-atom eval` does; the
committed results/kv4-centering-smollm2.json, 807bca7, came from a first form that summed the
keys in fp32 and rounded K - mean to the 16-bit dtype before quantizing). One `vllm-atom eval --methods fp16` pass per variant
(CPU: ~3.5 min per 16k tokens of SmolLM2-135M on 2 cores). Writes the rows with their per-window
NLL, and prints the cost of each variant over nokv.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from vllm_atom import evaluate, simulate
from vllm_atom import reference as ref
from vllm_atom.cli import main as cli_main
from vllm_atom.quantize.key_center import KeyMean

# variant -> (quantize K, quantize V, rotate K, rotate V[, center K])
VARIANTS = {"nokv": None, "base": (1, 1, 0, 0), "k": (1, 0, 0, 0), "v": (0, 1, 0, 0),
            "hk": (1, 1, 1, 0), "hv": (1, 1, 0, 1), "hkv": (1, 1, 1, 1),
            "bc": (1, 1, 0, 0, 1), "kc": (1, 0, 0, 0, 1), "hkc": (1, 1, 1, 0, 1), "hkvc": (1, 1, 1, 1, 1)}
_current: list = [None]
# key centering: per layer, the mean post-RoPE key [kv heads, head_dim] over calibration text
# (--center-text); fq(K - mu) + mu. In attention the mean's term q . mu is the same for every key
# of a query, so softmax removes it: a cache could store K - mu alone.
CENTER: dict[int, torch.Tensor] = {}
_means: dict[int, KeyMean] = {}


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    flags = _current[0]
    if flags == "collect":  # key [batch, kv heads, tokens, head_dim] after RoPE
        _means.setdefault(module.layer_idx, KeyMean(key.shape[1], key.shape[3], key.device)).add(key)
    elif flags is not None:
        qk, qv, rk, rv, ck = (*flags, 0)[:5]
        dt = getattr(module, "atom_io_dtype", torch.float16)
        if qk:
            mu = CENTER[module.layer_idx][None, :, None, :] if ck else None
            key = ref.fake_quantize_kv(key.to(dt), bool(rk), mu).to(query.dtype)
        if qv:
            value = ref.fake_quantize_kv(value.to(dt), bool(rv)).to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--text", default="wiki")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--center-text", default="c4", help="text whose first --center-tokens give the key means")
    ap.add_argument("--center-tokens", type=int, default=4096)
    args = ap.parse_args()
    names = args.variants.split(",")
    if "nokv" not in names:
        names.insert(0, "nokv")
    # the fp16 method with the attention wrapper on (kv_bits 4 routes every layer through it)
    simulate._atom_sim_attention = _attention
    keep = evaluate.set_kv_bits
    evaluate.set_kv_bits = lambda mods, kv, dt, *_: keep(mods, 4, dt)  # (this script rotates, not the simulation)
    rows = {}
    tmp = Path(tempfile.mkdtemp(prefix="kv4-rotation-"))
    if any(len(VARIANTS[n] or ()) == 5 for n in names):
        _current[0] = "collect"
        cli_main(["eval", args.model, "--text", args.center_text, "--methods", "fp16",
                  "--max-tokens", str(args.center_tokens), "--json", str(tmp / "center.json")])
        CENTER.update({i: mean.value for i, mean in _means.items()})
    for name in names:
        _current[0] = VARIANTS[name]
        path = tmp / f"{name}.json"
        cli_main(["eval", args.model, "--text", args.text, "--methods", "fp16",
                  "--max-tokens", str(args.max_tokens), "--json", str(path)])
        (row,) = json.loads(path.read_text())
        rows[name] = {k: row[k] for k in ("ppl", "tokens", "predicted_tokens", "text", "window_nll")}
    base = rows["nokv"]["ppl"]
    for name, row in rows.items():
        row["cost_over_nokv"] = round(row["ppl"] / base - 1, 4)
        print(f"{name:>5}  ppl {row['ppl']:8.3f}  {100 * row['cost_over_nokv']:+6.1f} %")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
