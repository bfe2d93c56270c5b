"""The layouts the CUDA kernels read, in pure torch (CPU or GPU): the oracle of their packing.

mma.sync GEMM (`cuda/w4a4_gemm.cu`, every arch). Weights as on disk (`vllm_atom.format`).
``qa`` int8 [M, KA], KA = Kn + O32 (O32 = O rounded up to 32): group g's 128 INT4 values
(one per byte) at bytes [128g, 128g+128), permuted inside each 32-slot chunk so that byte
4t+i+16h holds slot 8t+2i+h; the O INT8 outliers at [Kn, Kn+O) in slot order, zeros up to KA.
``sa`` fp32 [G + (O>0), M]: row g the scales of group g, the last row the outlier scales.
(`cuda/act_quant.cu` writes this; `cuda/w4a4_gemm.cu` reads it.)

wgmma GEMM (`cuda/w4a4_sm90.cu`, sm_90a). A step is one INT4 group or the outlier block.
``qa`` int8 [steps, M, 128]: the bytes of step s of token m (as above; the outliers
zero-padded to 128) at [s, m], with 16-byte chunk c stored at chunk c ^ (m % 8).
``sa`` fp32 [steps, 2*Mp], Mp = M rounded up to 8: per token pair (2p, 2p+1) four floats at
[s, 4p:4p+4] = (scale of 2p, scale of 2p+1, C of 2p, C of 2p+1) with C = fp32(X * scale) * 2^-6,
X the sum of the token's integers in group s (0 for the outlier step); entries of tokens >= M
unspecified, and so is C without e4m3 (the s8 GEMM reads only the scales; act_quant.cu
writes C for the e4m3 path alone). With e4m3 (`gemm_plan.sm90_e4m3(M)`, decided by M alone)
the INT4 group bytes hold the e4m3 encodings of the integers instead of the int8 ones (the
outlier step stays int8); the GEMM then folds (X + the e4m3 products' offset) with C, see
cuda/w4a4_sm90.cu.
``wpack`` uint8 [Np/64, slab] (`prepack_sm90`, Np = N rounded up to 128, zero rows past N):
for each 64-row slab, G chunks of CHUNK4 bytes then, if O > 0, one of CHUNK8 bytes.
INT4 chunk of group g: byte w*1024 + h*512 + l*16 + 4*kc + b holds byte b of 32-bit word
4*kc + l%4 of row 16w + l//4 + 8h's 64 bytes of group g (the wgmma A fragment of lane l of
warp w for k-chunk kc), then the 64 rows' fp16 scales. Outlier chunk: byte w*2048 + kc*512 +
l*16 + 4*r + b holds the INT8 weight of row 16w + l//4 + 8*(r%2), outlier slot
32*kc + 16*(r//2) + 4*(l%4) + b (zero past O), then the 64 rows' fp16 outlier scales.
"""

from __future__ import annotations

import torch

from vllm_atom.kernels.gemm_plan import sm90_e4m3
from vllm_atom.reference import QuantizedActivation

GROUP = 128
CHUNK4 = 4096 + 128  # one INT4 group of a 64-row slab: A fragments + fp16 scales
CHUNK8 = 8192 + 128  # the outlier block of a 64-row slab
SLAB_ROWS = 64
N_ALIGN = 128  # prepacked rows are padded to this (the widest CTA tile)


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


# ---- wgmma GEMM (sm_90a) ----

def padded_tokens(m: int) -> int:
    """Mp: the token count rounded up to 8 (rows of ``sa`` in the sm90 layout)."""
    return (m + 7) // 8 * 8


def _swizzle(m: int, device=None) -> torch.Tensor:
    """int64 [m, 128]: position of byte p of token m inside its 128-byte row (chunk ^ m % 8)."""
    p = torch.arange(128, device=device)
    r = torch.arange(m, device=device)[:, None] % 8
    return ((p // 16) ^ r) * 16 + p % 16


def e4m3_bytes(q: torch.Tensor) -> torch.Tensor:
    """int8 integers in [-8, 7] -> the int8 view of their (exact) e4m3 encodings."""
    return q.float().to(torch.float8_e4m3fn).view(torch.int8)


def e4m3_values(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `e4m3_bytes`."""
    return b.view(torch.float8_e4m3fn).float().round().to(torch.int8)


def _interleave(scale: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """scale, c fp32 [steps, M] -> sa fp32 [steps, 2*Mp]: (scale 2p, scale 2p+1, c 2p, c 2p+1) per pair."""
    steps, m = scale.shape
    mp = padded_tokens(m)
    both = torch.zeros((steps, 2, mp), dtype=torch.float32, device=scale.device)
    both[:, 0, :m], both[:, 1, :m] = scale, c
    return both.view(steps, 2, mp // 2, 2).transpose(1, 2).reshape(steps, 2 * mp).contiguous()


def sm90_entries(sa: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, C) fp32 [steps, M] of an sm90-layout ``sa`` [steps, 2*Mp]."""
    pairs = sa.view(sa.shape[0], -1, 2, 2)
    return pairs[:, :, 0].flatten(1)[:, :m], pairs[:, :, 1].flatten(1)[:, :m]


def pack_activation_sm90(a: QuantizedActivation) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference quantized activation -> (qa int8 [steps, M, 128], sa fp32 [steps, 2*Mp])."""
    m, kn = a.q.shape
    o = a.q_outlier.shape[1]
    g = kn // GROUP
    groups = a.q.unflatten(1, (g, GROUP))  # [M, G, 128] in slot order
    rows = groups[:, :, slot_of_byte(a.q.device)]
    if sm90_e4m3(m):
        rows = e4m3_bytes(rows)
    if o:
        outl = torch.zeros((m, 1, GROUP), dtype=torch.int8, device=a.q.device)
        outl[:, 0, :o] = a.q_outlier
        rows = torch.cat([rows, outl], 1)
    steps = rows.shape[1]
    qa = torch.empty((steps, m, GROUP), dtype=torch.int8, device=a.q.device)
    qa.scatter_(2, _swizzle(m, a.q.device).expand(steps, m, GROUP), rows.transpose(0, 1).contiguous())
    scale = torch.zeros((steps, m), dtype=torch.float32, device=a.q.device)
    c = torch.zeros_like(scale)
    scale[:g] = a.scale.T.float()
    c[:g] = (groups.sum(2, dtype=torch.int32).T.float() * scale[:g]) * 2.0 ** -6
    if o:
        scale[g] = a.outlier_scale
    return qa, _interleave(scale, c)


def unpack_activation_sm90(qa: torch.Tensor, sa: torch.Tensor, k: int, n_outliers: int) -> QuantizedActivation:
    """Inverse of `pack_activation_sm90` (the C entries are dropped)."""
    kn, _, steps = sizes(k, n_outliers)
    m = qa.shape[1]
    g = kn // GROUP
    rows = qa.gather(2, _swizzle(m, qa.device).expand(steps, m, GROUP)).transpose(0, 1)  # [M, steps, 128]
    q = torch.empty((m, g, GROUP), dtype=torch.int8, device=qa.device)
    q[:, :, slot_of_byte(qa.device)] = e4m3_values(rows[:, :g]) if sm90_e4m3(m) else rows[:, :g]
    scale = sm90_entries(sa, m)[0]
    oscale = scale[g] if n_outliers else torch.zeros(m, dtype=torch.float32, device=qa.device)
    return QuantizedActivation(q.flatten(1), scale[:g].T, rows[:, g, :n_outliers] if n_outliers
                               else qa.new_zeros((m, 0)), oscale)


def prepack_sm90(qweight: torch.Tensor, w_scale: torch.Tensor, w_outlier: torch.Tensor,
                 w_outlier_scale: torch.Tensor) -> torch.Tensor:
    """Checkpoint tensors of one shard (`vllm_atom.format` layout) -> wpack uint8 [Np/64, slab]."""
    n, half = qweight.shape
    g, o = 2 * half // GROUP, w_outlier.shape[1]
    npad = (n + N_ALIGN - 1) // N_ALIGN * N_ALIGN
    s = npad // SLAB_ROWS

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((npad - n, *t.shape[1:]))]) if npad > n else t

    # (slab, warp, h, g8, group, kc, t, byte) -> (slab, group, warp, h, g8, t, kc, byte)
    w = padded(qweight).view(s, 4, 2, 8, g, 4, 4, 4).permute(0, 4, 1, 2, 3, 6, 5, 7).reshape(s, g, 4096)
    sc = padded(w_scale).view(s, SLAB_ROWS, g).transpose(1, 2).contiguous().view(torch.uint8)  # [s, g, 128]
    parts = [torch.cat([w, sc], 2).reshape(s, g * CHUNK4)]
    if o:
        wo = torch.zeros((npad, GROUP), dtype=torch.int8, device=qweight.device)
        wo[:n, :o] = w_outlier
        # (slab, warp, h, g8, kc, rh, t, byte) -> (slab, warp, kc, g8, t, rh, h, byte)
        wo = wo.view(s, 4, 2, 8, 4, 2, 4, 4).permute(0, 1, 4, 3, 6, 5, 2, 7).reshape(s, 8192)
        so = padded(w_outlier_scale.reshape(n, 1)).reshape(s, SLAB_ROWS).contiguous().view(torch.uint8)
        parts.append(torch.cat([wo.view(torch.uint8), so], 1))
    return torch.cat(parts, 1).contiguous()


def unprepack_sm90(wpack: torch.Tensor, n: int, n_outliers: int) -> dict[str, torch.Tensor]:
    """Inverse of `prepack_sm90` for N rows with ``n_outliers`` outlier columns."""
    s, slab = wpack.shape
    g = (slab - (CHUNK8 if n_outliers else 0)) // CHUNK4
    npad = s * SLAB_ROWS
    chunks = wpack[:, :g * CHUNK4].reshape(s, g, CHUNK4)
    w = chunks[:, :, :4096].reshape(s, g, 4, 2, 8, 4, 4, 4).permute(0, 2, 3, 4, 1, 6, 5, 7)
    out = {"qweight": w.reshape(npad, g * 64)[:n].contiguous(),
           "w_scale": chunks[:, :, 4096:].contiguous().view(torch.float16).transpose(1, 2).reshape(npad, g)[:n]
           .contiguous()}
    if n_outliers:
        oc = wpack[:, g * CHUNK4:]
        wo = oc[:, :8192].contiguous().view(torch.int8).reshape(s, 4, 4, 8, 4, 2, 2, 4)
        wo = wo.permute(0, 1, 6, 3, 2, 5, 4, 7).reshape(npad, GROUP)
        out["w_outlier"] = wo[:n, :n_outliers].contiguous()
        out["w_outlier_scale"] = oc[:, 8192:].contiguous().view(torch.float16).reshape(npad, 1)[:n].contiguous()
    else:
        out["w_outlier"] = torch.zeros((n, 0), dtype=torch.int8, device=wpack.device)
        out["w_outlier_scale"] = torch.zeros((n, 1), dtype=torch.float16, device=wpack.device)
    return out
