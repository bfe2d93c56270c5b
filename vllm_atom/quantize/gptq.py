"""GPTQ for Atom's weight layout (one shard of one linear).

Columns are processed in slot order: the reorder (salience ascending) replaces GPTQ's
act-order, so the least salient columns are quantized first and the ``n_outliers`` most
salient columns last. The normal columns are quantized to INT4 on exactly the runtime
grid (`reference.weight_group_scale` / `quantize_sym`: fp16 scale = w_clip*absmax/7 of
the *error-updated* group, q = clamp(round(w/scale), -8, 7)); each group's scale is
chosen when the sweep reaches the group. Their rounding error is propagated to every
later column, including the outlier columns, which are then INT8-RTN quantized per row
(`reference.quantize_outlier_weight`), as Atom does.

If H is not positive definite even after extra damping, the linear falls back to RTN
and the reason is returned (and logged by the caller).

With ``clip_search`` each group's scale is instead the best of `CLIP_RATIOS` * absmax / 7:
the one with the least squared rounding error of the group, each column weighted by its
Hessian diagonal (the input's second moment; all ones for RTN). The on-disk format is the same
(any fp16 group scale).
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import torch

from vllm_atom import reference as ref

log = logging.getLogger(__name__)


class GPTQResult(NamedTuple):
    weight: ref.QuantizedWeight
    fallback: Optional[str]  # None, or why RTN was used instead


# Clip ratios the per-group search tries (absmax / 7 times each).
CLIP_RATIOS = tuple(round(0.6 + 0.025 * i, 3) for i in range(17))  # 0.6 .. 1.0


def searched_group_scale(w: torch.Tensor, group_size: int, col_weight: Optional[torch.Tensor] = None,
                         ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """fp16 group scales [N, Kn/G] of w [N, Kn]: per group the candidate
    ``fp16(r * absmax / 7)`` (r in ``ratios``) whose INT4 rounding error
    sum_k col_weight[k] * (w - q * scale)^2 is least (ties: the first ratio)."""
    n, kn = w.shape
    w = w.float()
    cw = torch.ones(kn, device=w.device) if col_weight is None else col_weight.float().clamp_min(0)
    best_err = torch.full((n, kn // group_size), float("inf"), device=w.device)
    best = torch.zeros(n, kn // group_size, dtype=torch.float16, device=w.device)
    for r in ratios:
        scale = ref.weight_group_scale(w, group_size, r)
        q = ref.quantize_weight_groups(w, scale)
        d = w - ref.dequantize_weight_groups(q, scale)
        err = (d * d * cw).unflatten(1, (-1, group_size)).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


def rtn_quantize(w: torch.Tensor, n_outliers: int, group_size: int = 128,
                 w_clip: float = 0.85, clip_search: bool = False) -> ref.QuantizedWeight:
    """RTN of w [N, K] that is already in slot order."""
    ident = torch.arange(w.shape[1], device=w.device)
    scale = searched_group_scale(w[:, :w.shape[1] - n_outliers], group_size) if clip_search else None
    return ref.quantize_weight(w, ident, n_outliers, group_size, w_clip, scale)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; raises on failure."""
    k = h.shape[0]
    diag = torch.arange(k, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        hd = h.clone()
        hd[diag, diag] += damp * extra * torch.mean(torch.diag(h))
        l, info = torch.linalg.cholesky_ex(hd.double())
        if info == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                if extra > 1:
                    log.info("GPTQ: needed damping %.3g", damp * extra)
                return u.float()
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 100x damping")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, n_outliers: int, group_size: int = 128,
                  w_clip: float = 0.85, damp: float = 0.01, block_size: int = 128,
                  clip_search: bool = False) -> GPTQResult:
    """Quantize w [N, K] (slot order) with Hessian h [K, K] (slot order).

    Returns the runtime tensors of one shard (`reference.QuantizedWeight`).
    """
    n, k = w.shape
    kn = k - n_outliers
    if kn <= 0 or kn % group_size:
        raise ValueError(f"K={k} minus {n_outliers} outliers is not a multiple of {group_size}")
    if block_size % group_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {group_size}")
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hdiag = torch.diag(h).clone()
    try:
        u = _inverse_hessian_factor(h, damp)
    except torch.linalg.LinAlgError as e:
        return GPTQResult(rtn_quantize(w, n_outliers, group_size, w_clip, clip_search), f"RTN fallback: {e}")

    q = torch.zeros(n, kn, dtype=torch.int8, device=w.device)
    scales = torch.zeros(n, kn // group_size, dtype=torch.float16, device=w.device)
    for i1 in range(0, kn, block_size):
        i2 = min(i1 + block_size, kn)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        scale = None
        for j in range(i2 - i1):
            if j % group_size == 0:
                g = (i1 + j) // group_size
                grp = w1[:, j:j + group_size]
                scales[:, g] = (searched_group_scale(grp, group_size, hdiag[i1 + j:i1 + j + group_size])
                                if clip_search else ref.weight_group_scale(grp, group_size, w_clip))[:, 0]
                scale = scales[:, g].float()
            col = w1[:, j]
            qj = ref.quantize_sym(col, scale, ref.INT4_MAX)
            q[:, i1 + j] = qj
            e = (col - qj.float() * scale) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    qo, oscale = ref.quantize_outlier_weight(w[:, kn:])
    return GPTQResult(ref.QuantizedWeight(q, scales, qo, oscale), None)


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Proxy output error trace((W - W_hat) H (W - W_hat)^T), both in slot order."""
    d = (w.float() - w_hat.float())
    return float(torch.einsum("nk,kl,nl->", d, h.float(), d))
