"""How much one decoder layer's attention suffers from an INT4 KV cache.

Per-token INT4 keys fail where a few key channels dwarf the rest in every token (Qwen2.5's
k_proj biases reach 354 in layer 0): one scale per (token, head) leaves the other channels a
step or two. The error shows up directly in the attention output, so that is what is
measured: on calibration inputs, with the layer's 16-bit weights (after the key smoothing),
the relative L2 error of ``self_attn``'s output when its K/V are fake-quantized to INT4
(`vllm_atom.reference.fake_quantize_kv`, after RoPE) against the same call with 16-bit K/V:

    err = sqrt(sum ||attn_kv4 - attn||^2 / sum ||attn||^2)    over the samples

Measured on Austen calibration text (docs/accuracy.md): SmolLM2-135M 0.04-0.31 in every
layer; Qwen2.5-Coder-1.5B with the default key smoothing 0.80 in layer 0 and 0.07-0.35
elsewhere. The default threshold 0.5 keeps Qwen's layer 0 in 16 bit, which takes its
simulated W4A4KV4 perplexity from ~1,500 back to within ~5 % of W4A4; no SmolLM2 layer.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_atom.simulate import run_layer, set_kv_bits

# Layers whose KV4 attention error exceeds this keep a 16-bit KV cache under --kv-skip-layers auto.
DEFAULT_KV_SKIP_THRESHOLD = 0.5


def kv4_attention_error(layer: nn.Module, inps: torch.Tensor, kwargs: dict, io_dtype: torch.dtype,
                        max_samples: int = 8, rotate_k: bool = False,
                        k_center: torch.Tensor | None = None) -> float:
    """Relative L2 error of ``layer.self_attn``'s output with INT4 K/V (see module doc).

    layer: a decoder layer in fp32 whose attention runs through the simulation's attention
    (`use_sim_attention`), with its linears unquantized; inps: [n, seqlen, hidden] layer
    inputs (the first ``max_samples`` are used); kwargs: the layer's other arguments; rotate_k:
    INT4 keys in the Hadamard basis (`AtomConfig.kv_rotate_k`); k_center: the keys' center
    (`AtomConfig.kv_center_k`), fp32 [kv_heads, head_dim], or None.
    """
    attn = layer.self_attn
    acc = {"err": 0.0, "ref": 0.0}

    def hook(module, args, kw, out):
        set_kv_bits([module], 4, io_dtype, rotate_k, k_center)
        try:
            o4 = module.forward(*args, **kw)
        finally:
            set_kv_bits([module], None, io_dtype)
        o = out[0] if isinstance(out, tuple) else out
        o4 = o4[0] if isinstance(o4, tuple) else o4
        acc["err"] += float((o4.float() - o.float()).pow(2).sum())
        acc["ref"] += float(o.float().pow(2).sum())

    set_kv_bits([attn], None, io_dtype)
    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        run_layer(layer, inps[:max_samples], kwargs, keep=False)
    finally:
        handle.remove()
    return (acc["err"] / acc["ref"]) ** 0.5 if acc["ref"] > 0 else 0.0
