"""Rotations folded into a Llama / Qwen2 model's weights before quantizing: the residual stream's
(QuaRot's R1, `rotate_model`) and the attention values' (R2, `rotate_values`).

The hidden state h (a row vector of size d) is replaced everywhere by h Q for an orthogonal Q:
the embeddings become E Q; each RMSNorm's weight g is folded into the linears it feeds (W diag(g))
and set to 1, which leaves the norm unchanged on the rotated stream (|h Q| = |h|); the linears that
read the stream (q/k/v, gate/up, lm_head) become W diag(g) Q, the ones that write to it (o_proj,
down_proj) Q^T W (and their bias b Q). Attention, RoPE and the MLP's inner activations do not
change, so the model computes the same function up to the rounding of the rotated weights to its
dtype (computed in float64). The rotation spreads the residual stream's outlier channels over all
channels, which INT4 activations of the stream's readers then quantize better; the checkpoint stores
the rotated embeddings, norms (ones) and an untied lm_head, so it runs anywhere as a plain model.

Q = diag(random signs) (R_b kron H_a) with d = a b, a the largest power of two dividing d, H_a the
normalised Walsh-Hadamard matrix and R_b a random orthogonal b x b matrix (b = 1 for d = 4096, 9 for
SmolLM2's 576, 3 for Qwen2.5-1.5B's 1536), all from ``seed``.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def hadamard(a: int) -> torch.Tensor:
    """The normalised Walsh-Hadamard (Sylvester) matrix, float64 [a, a], a a power of two."""
    if a <= 0 or a & (a - 1):
        raise ValueError(f"a Hadamard matrix needs a power of two, got {a}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < a:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / a ** 0.5


def rotation_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal float64 [d, d] matrix (see the module docstring)."""
    a = d & -d  # largest power of two dividing d
    b = d // a
    h = hadamard(a)
    g = torch.Generator().manual_seed(seed)
    r = torch.ones(1, 1, dtype=torch.float64)
    if b > 1:
        r, tri = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))
        r = r * torch.sign(torch.diagonal(tri))[None, :]
    signs = torch.randint(0, 2, (d,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(r.contiguous(), h)


def _check_model_type(model: nn.Module, flag: str) -> None:
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{flag} supports model types {SUPPORTED_MODEL_TYPES}, not {mtype!r}")


def _check(model: nn.Module) -> None:
    _check_model_type(model, "--rotate")
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if getattr(norm, "bias", None) is not None:
                raise ValueError("--rotate: RMSNorm with a bias cannot be folded")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Fold the rotation into ``model`` in place (weights keep their dtype); unties lm_head from
    the embeddings (``config.tie_word_embeddings`` becomes False)."""
    _check(model)
    emb = model.model.embed_tokens
    q = rotation_matrix(emb.weight.shape[1], seed)

    def reads(lin: nn.Linear, g: torch.Tensor) -> None:  # W -> W diag(g) Q
        w = lin.weight.double() * g.double()[None, :]
        lin.weight.copy_((w @ q).to(lin.weight.dtype))

    def writes(lin: nn.Linear) -> None:  # W -> Q^T W, b -> b Q
        lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))

    if model.lm_head.weight is emb.weight or getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            reads(lin, layer.input_layernorm.weight)
        layer.input_layernorm.weight.fill_(1.0)
        writes(attn.o_proj)
        for lin in (mlp.gate_proj, mlp.up_proj):
            reads(lin, layer.post_attention_layernorm.weight)
        layer.post_attention_layernorm.weight.fill_(1.0)
        writes(mlp.down_proj)
    reads(model.lm_head, model.model.norm.weight)
    model.model.norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_values(model: nn.Module, seed: int = 0) -> None:
    """Fold a rotation of every attention head's values into v_proj and o_proj, in place.

    Per layer one orthogonal Q (`rotation_matrix` of head_dim, from ``seed`` and the layer index:
    random signs times the Walsh-Hadamard matrix) turns each value row v (one kv head, head_dim)
    into v Q: v_proj's rows of each kv head become Q^T W_g (its bias b_g Q). Attention mixes value
    rows of a head linearly, so each query head's output is rotated the same way, and o_proj's
    columns of each head become W_h Q, which undoes it: the model computes the same function up to
    the rounding of the rotated weights. What changes is what gets quantized: the INT4 value cache
    and o_proj's input see every head's large channels spread over the head."""
    _check_model_type(model, "--rotate-values")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        d = getattr(attn, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
        v, o = attn.v_proj, attn.o_proj
        if v.out_features % d or o.in_features % d:
            raise ValueError(f"layer {i}: v_proj out {v.out_features} / o_proj in {o.in_features} "
                             f"are not multiples of head_dim {d}")
        q = rotation_matrix(d, seed * 1_000_003 + i)
        w = v.weight.double().view(-1, d, v.in_features)  # [kv heads, d, in]
        v.weight.copy_(torch.einsum("ed,gdi->gei", q.T, w).reshape(v.weight.shape).to(v.weight.dtype))
        if v.bias is not None:
            v.bias.copy_((v.bias.double().view(-1, d) @ q).reshape(-1).to(v.bias.dtype))
        w = o.weight.double().view(o.out_features, -1, d)  # [out, heads, d]
        o.weight.copy_((w @ q).reshape(o.weight.shape).to(o.weight.dtype))
