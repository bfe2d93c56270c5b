"""Simulated (fake) Atom quantization inside a Hugging Face model.

Used twice: by the quantizer (calibration passes run the layer being quantized with
quantized activations, then with its quantized weights) and by `vllm_atom.evaluate`
(perplexity of a whole simulated model). The integer and scale arithmetic is
`vllm_atom.reference`'s, i.e. the runtime's:

* every quantized linear quantizes its input per token, at every call, with
  `reference.quantize_activation` (INT4 groups of 128 in reordered slot order,
  INT8 outliers), and multiplies with the dequantized checkpoint weights
  (`reference.w4a4_linear_dequant` up to fp32 summation order);
* the KV cache is quantized per (token, KV head) with `reference.fake_quantize_kv`
  **after RoPE**, where vLLM writes its cache (Atom's paper quantized K before RoPE); with
  ``kv_rotate_k`` the keys in the Hadamard basis and rotated back (the kernels rotate the
  query instead: the same up to the query's 16-bit rounding).
  Attention reads the quantized K and V for every position, the current one included,
  as an attention kernel reading the paged cache does.

The model runs in fp32; where the runtime holds a tensor in the model dtype
(fp16/bf16) -- the input and output of each quantized linear and the K/V written to the
cache -- the simulation rounds to that dtype first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from vllm_atom import reference as ref

ATTN_IMPLEMENTATION = "atom_sim_sdpa"


@dataclass(frozen=True)
class ActScheme:
    """How a linear's input is quantized (one scheme per shard layout).

    index: int64 [K] shard-local slot -> channel (identity for no reorder).
    shards: S; each shard of K/S channels is quantized on its own.
    n_outliers: outlier slots per shard (the last ones).
    group_size: channels per INT4 group, or None for one group per token over all
        normal channels (per-token quantization).
    clip: INT4 clip ratio.
    outliers: "int8" (Atom) or "fp" (kept unquantized; an ablation step).
    """

    index: torch.Tensor
    shards: int = 1
    n_outliers: int = 0
    group_size: Optional[int] = 128
    clip: float = 0.9
    outliers: str = "int8"

    def shard_slices(self, k: int):
        ks = k // self.shards
        for s in range(self.shards):
            yield s, slice(s * ks, (s + 1) * ks)


def fake_quantize_activation(x: torch.Tensor, scheme: ActScheme) -> torch.Tensor:
    """x [M, K] -> fp32 [M, K] dequantized, in slot order (shard by shard)."""
    parts = []
    for _, sl in scheme.shard_slices(x.shape[-1]):
        xs, idx = x[:, sl], scheme.index[sl]
        kn = xs.shape[1] - scheme.n_outliers
        g = scheme.group_size or kn
        a = ref.quantize_activation(xs, idx, scheme.n_outliers, g, scheme.clip)
        d = ref.dequantize_activation(a)
        if scheme.outliers == "fp" and scheme.n_outliers:
            d[:, kn:] = xs.float().index_select(1, idx[kn:])
        parts.append(d)
    return torch.cat(parts, 1)


def fake_quantize_weight(w: torch.Tensor, scheme: ActScheme, clip: float) -> torch.Tensor:
    """Round-to-nearest weights in the layout of ``scheme``: w [N, K] -> fp32 [N, K] slot order."""
    parts = []
    for _, sl in scheme.shard_slices(w.shape[1]):
        ws, idx = w[:, sl], scheme.index[sl]
        kn = ws.shape[1] - scheme.n_outliers
        g = scheme.group_size or kn
        d = ref.dequantize_weight(ref.quantize_weight(ws, idx, scheme.n_outliers, g, clip))
        if scheme.outliers == "fp" and scheme.n_outliers:
            d[:, kn:] = ws.float().index_select(1, idx[kn:])
        parts.append(d)
    return torch.cat(parts, 1)


def permute_columns(w: torch.Tensor, scheme: ActScheme) -> torch.Tensor:
    """w [N, K] in channel order -> slot order (unquantized)."""
    return torch.cat([w[:, sl].index_select(1, scheme.index[sl]) for _, sl in scheme.shard_slices(w.shape[1])], 1)


@dataclass
class SimState:
    """One quantization of a linear: activation scheme + weights in slot order (fp32), and
    the bias to use with them (None: the module's own; a checkpoint's q/k biases carry the
    key smoothing, see `vllm_atom.quantize.smooth`)."""

    act: ActScheme
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class SimLinear(nn.Module):
    """Drop-in for ``nn.Linear``: unquantized while ``state`` is None, else simulated W4A4.

    ``observer``, if set, is called with the tensor the GEMM multiplies (the raw input
    when unquantized, the dequantized slot-order activation otherwise), flattened to
    [tokens, K]; calibration uses it to collect statistics and Hessians.
    """

    def __init__(self, linear: nn.Linear, io_dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.io_dtype = io_dtype
        self.state: Optional[SimState] = None
        self.observer: Optional[Callable[[torch.Tensor], None]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.state is None:
            if self.observer is not None:
                self.observer(x2)
            return nn.functional.linear(x, self.weight, self.bias)
        xq = fake_quantize_activation(x2.to(self.io_dtype), self.state.act)
        if self.observer is not None:
            self.observer(xq)
        y = xq @ self.state.weight.T
        bias = self.bias if self.state.bias is None else self.state.bias
        if bias is not None:
            y = y + bias.float()
        return y.to(self.io_dtype).to(x.dtype).reshape(*shape[:-1], -1)


def wrap_linears(module: nn.Module, names, io_dtype: torch.dtype) -> dict[str, SimLinear]:
    """Replace ``module.<name>`` (dotted) for each name by a SimLinear; return them by name."""
    out = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        lin = getattr(parent, attr)
        if not isinstance(lin, SimLinear):
            lin = SimLinear(lin, io_dtype)
            setattr(parent, attr, lin)
        out[name] = lin
    return out


def run_layer(layer: nn.Module, inps: torch.Tensor, kwargs: dict, keep: bool) -> Optional[torch.Tensor]:
    """Run a decoder layer (fp32) on each sample of ``inps`` [n, seqlen, hidden] with the
    layer's other arguments ``kwargs``; its outputs in ``inps``' dtype if ``keep``, else None."""
    outs = torch.empty_like(inps) if keep else None
    with torch.no_grad():
        for i in range(inps.shape[0]):
            y = layer(inps[i][None].float(), **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            if keep:
                outs[i] = y[0].to(outs.dtype)
    return outs


# ---- KV cache: quantized after RoPE, in the attention call ----

def _atom_sim_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observer = getattr(module, "atom_key_observer", None)
    if observer is not None:  # key [batch, kv heads, tokens, head_dim], after RoPE
        observer(key)
    if getattr(module, "atom_kv_bits", None) == 4:
        dt = getattr(module, "atom_io_dtype", torch.float16)
        center = getattr(module, "atom_k_center", None)
        key = ref.fake_quantize_kv(key.to(dt), getattr(module, "atom_kv_rotate_k", False),
                                   None if center is None else center[None, :, None, :]).to(query.dtype)
        value = ref.fake_quantize_kv(value.to(dt)).to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_sim_attention(model: nn.Module) -> None:
    """Route the model's attention through the KV-quantizing wrapper (SDPA underneath)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _atom_sim_attention)
    model.config._attn_implementation = ATTN_IMPLEMENTATION


def set_kv_bits(attn_modules, kv_bits: Optional[int], io_dtype: torch.dtype, rotate_k: bool = False,
                k_center: Optional[torch.Tensor] = None) -> None:
    """Turn KV4 on (4) or off (None) for these attention modules; rotate_k: keys quantized in the
    Hadamard basis (`AtomConfig.kv_rotate_k`); k_center: fp32 [kv_heads, head_dim] subtracted from
    the keys before they are quantized (`AtomConfig.kv_center_k`), or None."""
    for m in attn_modules:
        m.atom_kv_bits = kv_bits
        m.atom_io_dtype = io_dtype
        m.atom_kv_rotate_k = rotate_k
        m.atom_k_center = k_center
