"""Key smoothing for the INT4 KV cache, folded into q_proj and k_proj.

Per-token INT4 keys share one scale per (token, head), so a few large key channels (Qwen2's
k_proj bias reaches 354 in layer 0 while the other channels stay below 5) push every other
channel onto one or two levels. Attention only needs q . k, so each key channel can be
divided by a factor as long as the matching query channel is multiplied by it. Rotary
embeddings (the rotate-half form of HF Llama / Mistral / Qwen2 checkpoints) rotate channel
j together with j + D/2 of each head, so both channels of a pair must share the factor; the
pair's norm sqrt(k_j^2 + k_{j+D/2}^2) is what RoPE preserves, and its calibration maximum m
gives the factor lam = m^alpha (alpha = `AtomConfig.kv_smooth`, 0.5 as in QServe's
SmoothAttention). Keys then span m^(1-alpha) per pair. The factors are folded into the
weights and biases before they are quantized; weight quantization is per output row, so a
row scale changes nothing but fp16 rounding of the group scales.
"""

from __future__ import annotations

import torch
from torch import nn


class KeyPairMax:
    """Running max over tokens of each key channel pair's norm, [kv_heads, D/2] (fp32)."""

    def __init__(self, kv_heads: int, head_dim: int, device="cpu"):
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} is odd; rotary channel pairs need an even one")
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.value = torch.zeros(kv_heads, head_dim // 2, dtype=torch.float32, device=device)

    def add(self, k: torch.Tensor) -> None:
        """k: k_proj output [..., kv_heads * D] (pre-RoPE, bias included)."""
        k = k.detach().float().reshape(-1, self.kv_heads, 2, self.head_dim // 2)
        self.value = torch.maximum(self.value, k.pow(2).sum(2).sqrt().amax(0))


def smoothing_factors(pair_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """[kv_heads, D/2] pair maxima -> [kv_heads, D] factors (both channels of a pair alike).

    Pairs that never fired (max 0) keep factor 1."""
    lam = torch.where(pair_max > 0, pair_max.clamp_min(1e-6).pow(alpha), torch.ones_like(pair_max))
    return torch.cat([lam, lam], dim=1)


@torch.no_grad()
def fold_key_smoothing(q_proj: nn.Module, k_proj: nn.Module, lam: torch.Tensor) -> None:
    """k_proj rows /= lam, q_proj rows *= lam (each query head by its KV head's factors).

    lam: [kv_heads, D]. Weights [heads * D, hidden] and biases [heads * D], in place."""
    kv_heads, d = lam.shape
    q_heads = q_proj.weight.shape[0] // d
    if k_proj.weight.shape[0] != kv_heads * d or q_heads * d != q_proj.weight.shape[0] or q_heads % kv_heads:
        raise ValueError(f"q_proj {tuple(q_proj.weight.shape)} / k_proj {tuple(k_proj.weight.shape)} do "
                         f"not fit {kv_heads} KV heads of head_dim {d}")
    k_scale = lam.reshape(-1).to(k_proj.weight)
    q_scale = lam.repeat_interleave(q_heads // kv_heads, dim=0).reshape(-1).to(q_proj.weight)
    k_proj.weight.div_(k_scale[:, None])
    q_proj.weight.mul_(q_scale[:, None])
    if k_proj.bias is not None:
        k_proj.bias.div_(k_scale)
    if q_proj.bias is not None:
        q_proj.bias.mul_(q_scale)
