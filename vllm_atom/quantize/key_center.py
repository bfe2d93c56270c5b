"""Key centering for the INT4 KV cache (`AtomConfig.kv_center_k`).

Per-token INT4 keys share one range per (token, head); a channel whose keys sit far from zero
(the low-frequency rotary channels, which barely turn over a context, carry most of a model's
key offsets) stretches that range for every token. Subtracting a constant from every key of a
head changes each logit of a query q by the same -q . c, which softmax removes, so the cache can
hold K - c instead of K, with c the calibration mean of the post-RoPE keys per (kv head,
channel). Unlike the key smoothing (`smooth`), this cannot be folded into k_proj: after RoPE a
pre-RoPE constant turns with the position. So the cache write subtracts it, and the checkpoint
carries it (`vllm_atom.format`: ``model.layers.{i}.self_attn.k_center``).
"""

from __future__ import annotations

import torch


class KeyMean:
    """Running mean over tokens of the post-RoPE keys, fp32 [kv_heads, head_dim]."""

    def __init__(self, kv_heads: int, head_dim: int, device="cpu"):
        self.sum = torch.zeros(kv_heads, head_dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, key: torch.Tensor) -> None:
        """key: [batch, kv_heads, tokens, head_dim] after RoPE, as the attention call receives it."""
        if key.dim() != 4 or tuple(key.shape[1::2]) != tuple(self.sum.shape):
            raise ValueError(f"keys {tuple(key.shape)}: expected [batch, {self.sum.shape[0]}, tokens, "
                             f"{self.sum.shape[1]}]")
        self.sum += key.detach().double().sum(dim=(0, 2))
        self.count += key.shape[0] * key.shape[2]

    @property
    def value(self) -> torch.Tensor:
        if not self.count:
            raise ValueError("no keys were observed")
        return (self.sum / self.count).float()
