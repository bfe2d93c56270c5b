"""The activation layout the CUDA GEMM reads, in pure torch (CPU or GPU).

``qa`` int8 [M, KA], KA = Kn + O32 (O32 = O rounded up to 32): group g's 128 INT4 values
(one per byte) at bytes [128g, 128g+128), permuted inside each 32-slot chunk so that byte
4t+i+16h holds slot 8t+2i+h; the O INT8 outliers at [Kn, Kn+O) in slot order, zeros up to KA.
``sa`` fp32 [G + (O>0), M]: row g the scales of group g, the last row the outlier scales.
(`cuda/act_quant.cu` writes this; `cuda/w4a4_gemm.cu` reads it.)
"""

from __future__ import annotations

import torch

from vllm_atom.reference import QuantizedActivation

GROUP = 128


def sizes(k: int, n_outliers: int) -> tuple[int, int, int]:
    """(Kn, KA, steps) of a shard with ``k`` channels of which ``n_outliers`` are outliers."""
    kn = k - n_outliers
    if kn <= 0 or kn % GROUP or n_outliers % 16 or not 0 <= n_outliers <= 128:
        raise ValueError(f"K={k} with {n_outliers} outliers: need K-O a positive multiple of {GROUP} "
                         "and O a multiple of 16 in [0, 128]")
    return kn, kn + (n_outliers + 31) // 32 * 32, kn // GROUP + (n_outliers > 0)


def slot_of_byte(device=None) -> torch.Tensor:
    """int64 [128]: the slot (within its group) that each byte of a group holds."""
    p = torch.arange(GROUP, device=device)
    r = p % 32
    return p - r + 8 * ((r % 16) // 4) + 2 * (r % 4) + r // 16


def pack_activation(a: QuantizedActivation) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantized activation -> (qa, sa) in the kernel layout."""
    m, kn = a.q.shape
    o = a.q_outlier.shape[1]
    _, ka, _ = sizes(kn + o, o)
    qa = torch.zeros((m, ka), dtype=torch.int8, device=a.q.device)
    qa[:, :kn] = a.q.unflatten(1, (-1, GROUP))[:, :, slot_of_byte(a.q.device)].flatten(1)
    qa[:, kn:kn + o] = a.q_outlier
    rows = [a.scale.T] + ([a.outlier_scale[None]] if o else [])
    return qa, torch.cat(rows).float().contiguous()


def unpack_activation(qa: torch.Tensor, sa: torch.Tensor, k: int, n_outliers: int) -> QuantizedActivation:
    """Inverse of `pack_activation` (padding bytes are dropped)."""
    kn, _, _ = sizes(k, n_outliers)
    g = qa[:, :kn].unflatten(1, (-1, GROUP))
    q = torch.empty_like(g)
    q[:, :, slot_of_byte(qa.device)] = g
    m = qa.shape[0]
    oscale = sa[kn // GROUP] if n_outliers else torch.zeros(m, dtype=torch.float32, device=qa.device)
    return QuantizedActivation(q.flatten(1), sa[:kn // GROUP].T, qa[:, kn:kn + n_outliers], oscale)
