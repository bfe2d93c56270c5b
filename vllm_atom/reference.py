"""Pure-torch reference of Atom's numerics: the oracle for every kernel and for simulation.

Runs on CPU or GPU. Layouts follow `vllm_atom.format`; every function works on ONE shard
(the whole K for column-parallel layers). Rounding is round-half-to-even (``torch.round``),
as CUDA's ``rintf`` / ``__float2int_rn``; scales are computed in fp32 as
``absmax * clip / 7`` (multiply, then divide), and quantized values as ``round(x / scale)``
(IEEE division), so a kernel that does the same operations in the same order matches
these integers exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_atom.format import pack_int4, pack_weight, unpack_int4, unpack_weight

INT4_MAX = 7
INT8_MAX = 127
KV_LEVELS = 15


class QuantizedActivation(NamedTuple):
    """Per-token activation quantization of one shard.

    q: int8 [M, Kn] INT4 values in [-8, 7] (unpacked), slot order.
    scale: float32 [M, Kn/G], one per (token, group).
    q_outlier: int8 [M, O] in [-128, 127].
    outlier_scale: float32 [M].
    """

    q: torch.Tensor
    scale: torch.Tensor
    q_outlier: torch.Tensor
    outlier_scale: torch.Tensor


class QuantizedWeight(NamedTuple):
    """Weights of one shard, unpacked.

    q: int8 [N, Kn] in [-8, 7]; scale: float16 [N, Kn/G];
    q_outlier: int8 [N, O]; outlier_scale: float16 [N].
    """

    q: torch.Tensor
    scale: torch.Tensor
    q_outlier: torch.Tensor
    outlier_scale: torch.Tensor

    def packed(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (one shard) in `vllm_atom.format` layout, keyed by suffix."""
        return pack_weight(*self)

    @classmethod
    def from_packed(cls, t: dict[str, torch.Tensor]) -> "QuantizedWeight":
        return cls(*unpack_weight(t))


def ieee_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b with IEEE division on every device (torch's CUDA kernel turns division by a
    Python scalar into multiplication by its reciprocal, which differs in the last bit)."""
    return a / torch.full_like(a, b)


def sym_scale(absmax: torch.Tensor, clip: float, qmax: int) -> torch.Tensor:
    """fp32 scale of a symmetric grid: ``absmax * clip / qmax``."""
    return ieee_div(absmax.float() * torch.tensor(clip, dtype=torch.float32), float(qmax))


def quantize_sym(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """round(x / scale) clamped to [-qmax-1, qmax] as int8; 0 where scale is 0.

    ``scale`` broadcasts against ``x``; both are used in fp32.
    """
    x, scale = x.float(), scale.float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp_(-qmax - 1, qmax)
    return torch.where(scale > 0, q, torch.zeros_like(q)).to(torch.int8)


def _group_absmax(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.abs().float().unflatten(-1, (-1, group_size)).amax(-1)


def quantize_activation(x: torch.Tensor, reorder_index: torch.Tensor, n_outliers: int,
                        group_size: int = 128, clip: float = 0.9) -> QuantizedActivation:
    """Atom's dynamic activation quantization of one shard.

    x: [M, K] float (fp16/bf16/fp32; used in fp32); reorder_index: int [K] slot -> channel.
    Slots [0, K-O) are INT4 in groups of ``group_size`` with scale ``clip*absmax/7``;
    slots [K-O, K) are INT8 with scale ``absmax/127`` per token.
    """
    m, k = x.shape
    kn = k - n_outliers
    if kn <= 0 or kn % group_size:
        raise ValueError(f"K={k} minus {n_outliers} outliers is not a positive multiple of {group_size}")
    xr = x.float().index_select(1, reorder_index.to(x.device, torch.long))
    xn, xo = xr[:, :kn], xr[:, kn:]
    scale = sym_scale(_group_absmax(xn, group_size), clip, INT4_MAX)
    q = quantize_sym(xn.unflatten(1, (-1, group_size)), scale[..., None], INT4_MAX).flatten(1)
    if n_outliers:
        oscale = sym_scale(xo.abs().amax(1), 1.0, INT8_MAX)
    else:
        oscale = torch.zeros(m, dtype=torch.float32, device=x.device)
    qo = quantize_sym(xo, oscale[:, None], INT8_MAX)
    return QuantizedActivation(q, scale, qo, oscale)


def weight_group_scale(w: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """fp16 group scales ``fp16(clip * absmax / 7)`` of w [N, Kn] -> [N, Kn/G]."""
    return sym_scale(_group_absmax(w, group_size), clip, INT4_MAX).to(torch.float16)


def quantize_weight_groups(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT4 values of w [N, Kn] given fp16 group scales [N, Kn/G] -> int8 [N, Kn]."""
    g = w.shape[1] // scale.shape[1]
    return quantize_sym(w.float().unflatten(1, (-1, g)), scale.float()[..., None], INT4_MAX).flatten(1)


def dequantize_weight_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [N, Kn] of INT4 values q [N, Kn] and fp16 group scales [N, Kn/G]."""
    g = q.shape[1] // scale.shape[1]
    return (q.float().unflatten(1, (-1, g)) * scale.float()[..., None]).flatten(1)


def quantize_outlier_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per-row quantization of outlier columns w [N, O] -> (int8 [N, O], fp16 scale [N])."""
    if w.shape[1] == 0:
        return w.to(torch.int8), torch.zeros(w.shape[0], dtype=torch.float16, device=w.device)
    scale = sym_scale(w.abs().float().amax(1), 1.0, INT8_MAX).to(torch.float16)
    return quantize_sym(w, scale[:, None], INT8_MAX), scale


def quantize_weight(w: torch.Tensor, reorder_index: torch.Tensor, n_outliers: int,
                    group_size: int = 128, clip: float = 0.85, scale: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest Atom weight quantization of one shard (no GPTQ).

    w: [N, K] float in original channel order; reorder_index: int [K]; ``scale``: fp16 group
    scales [N, (K-O)/G] to round on instead of ``clip * absmax / 7``.
    """
    wr = w.float().index_select(1, reorder_index.to(w.device, torch.long))
    kn = w.shape[1] - n_outliers
    if scale is None:
        scale = weight_group_scale(wr[:, :kn], group_size, clip)
    q = quantize_weight_groups(wr[:, :kn], scale)
    qo, oscale = quantize_outlier_weight(wr[:, kn:])
    return QuantizedWeight(q, scale, qo, oscale)


def dequantize_activation(a: QuantizedActivation) -> torch.Tensor:
    """fp32 [M, K] in slot order."""
    g = a.q.shape[1] // max(a.scale.shape[1], 1) if a.scale.shape[1] else 1
    xn = (a.q.float().unflatten(1, (-1, g)) * a.scale[..., None]).flatten(1)
    return torch.cat([xn, a.q_outlier.float() * a.outlier_scale[:, None]], 1)


def dequantize_weight(w: QuantizedWeight) -> torch.Tensor:
    """fp32 [N, K] in slot order."""
    outliers = w.q_outlier.float() * w.outlier_scale.float()[:, None]
    return torch.cat([dequantize_weight_groups(w.q, w.scale), outliers], 1)


def w4a4_linear_exact(a: QuantizedActivation, w: QuantizedWeight, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The GEMM as the kernels compute it: [M, N] in ``out_dtype``.

    For each group g: an exact integer dot product over its 128 slots, then
    ``acc += float(isum) * (sa[m, g] * sw[n, g])`` in fp32, groups in order; then the
    INT8 outlier block the same way with the per-token and per-row scales; then bias.
    Integer sums are exact (float64 holds them exactly).
    """
    g = a.q.shape[1] // a.scale.shape[1]
    qa = a.q.double().unflatten(1, (-1, g))
    qw = w.q.double().unflatten(1, (-1, g))
    sw = w.scale.float()
    acc = torch.zeros(a.q.shape[0], w.q.shape[0], dtype=torch.float32, device=a.q.device)
    for j in range(qa.shape[1]):
        isum = (qa[:, j] @ qw[:, j].T).float()
        acc += isum * (a.scale[:, j, None] * sw[None, :, j])
    if a.q_outlier.shape[1]:
        isum = (a.q_outlier.double() @ w.q_outlier.double().T).float()
        acc += isum * (a.outlier_scale[:, None] * w.outlier_scale.float()[None, :])
    if bias is not None:
        acc += bias.float()
    return acc.to(out_dtype)


def w4a4_linear_dequant(a: QuantizedActivation, w: QuantizedWeight, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Same result as `w4a4_linear_exact` up to fp32 rounding: dequantize, then one fp32 matmul."""
    y = dequantize_activation(a) @ dequantize_weight(w).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def atom_linear(x: torch.Tensor, w: QuantizedWeight, reorder_index: torch.Tensor, n_outliers: int,
                bias: torch.Tensor | None = None, group_size: int = 128, a_clip: float = 0.9,
                exact: bool = False) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype: quantize the activation, then the W4A4 GEMM."""
    a = quantize_activation(x, reorder_index, n_outliers, group_size, a_clip)
    fn = w4a4_linear_exact if exact else w4a4_linear_dequant
    return fn(a, w, bias, x.dtype)


# ---- INT4 KV cache (per token and head, asymmetric, fp16 scale and zero) ----

class QuantizedKV(NamedTuple):
    """q: uint8 [..., D] in [0, 15] (unpacked); scale, zero: float16 [...].

    Dequantized value = q * scale + zero.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def quantize_kv(x: torch.Tensor) -> QuantizedKV:
    """Quantize x [..., D] per leading index over the last dim (one (token, head) per row).

    zero = fp16(min), scale = fp16((max - min) / 15), q = clamp(round((x - zero) / scale), 0, 15),
    all in fp32 with the fp16-rounded scale and zero; q = 0 where scale is 0.
    """
    xf = x.float()
    mn, mx = xf.amin(-1), xf.amax(-1)
    scale = ieee_div(mx - mn, float(KV_LEVELS)).to(torch.float16)
    zero = mn.to(torch.float16)
    s = scale.float()[..., None]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((xf - zero.float()[..., None]) / safe).clamp_(0, KV_LEVELS)
    q = torch.where(s > 0, q, torch.zeros_like(q)).to(torch.uint8)
    return QuantizedKV(q, scale, zero)


def dequantize_kv(kv: QuantizedKV) -> torch.Tensor:
    """fp32 [..., D]."""
    return kv.q.float() * kv.scale.float()[..., None] + kv.zero.float()[..., None]


def fake_quantize_kv(x: torch.Tensor, rotate: bool = False, center: torch.Tensor | None = None) -> torch.Tensor:
    """x -> dequantize_kv(quantize_kv(x)) in x.dtype.

    rotate: quantize in the Hadamard basis and rotate back, ``hadamard_rotate(dq(q(hadamard_rotate(x))))``:
    what attention computes over a key cache written with ``rotate_k`` (where the query is rotated
    instead, and rounded to its 16-bit dtype, which this form leaves out).
    center: a key center broadcastable to x ([..., D], `AtomConfig.kv_center_k`): x - center
    (fp32) is what is quantized (and rotated), and center is added back after dequantizing. A
    cache of keys minus a per-(head, channel) constant gives every key of a query the same
    extra logit -q . center, which softmax removes: attention over fq(x - c) + c is attention
    over a cache that stores fq(x - c) alone.
    """
    if center is None:
        y = x.float()
    else:
        c = center.float()
        y = x.float() - c
    y = hadamard_rotate(dequantize_kv(quantize_kv(hadamard_rotate(y)))) if rotate else dequantize_kv(quantize_kv(y))
    return (y if center is None else y + c).to(x.dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ H / sqrt(D)`` over the last dim (D a power of two), H the Sylvester Hadamard
    matrix (H[i, j] = (-1)^popcount(i & j)); orthogonal and its own inverse.

    Computed as the kernels do, so their results match bit for bit: butterflies over index bit
    0, 1, ..., log2(D) - 1 in turn (low = a + b, high = a - b for the pair (a, b) differing in that
    bit, fp32), then one fp32 multiply by fp32(1 / sqrt(D)).
    """
    d = x.shape[-1]
    if d & (d - 1) or d < 2:
        raise ValueError(f"hadamard_rotate needs a power-of-two last dim, got {d}")
    y = x.float()
    lead = y.shape[:-1]
    h = 1
    while h < d:
        y = y.reshape(*lead, d // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), -2)
        h *= 2
    return y.reshape(*lead, d) * torch.tensor(1.0 / d ** 0.5, dtype=torch.float32)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of x against ref, in dB."""
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))


# ---- The paged INT4 KV cache (vLLM's int4_per_token_head page budget, Atom's numerics) ----
#
# kv_cache: uint8 [num_blocks, H, block_size, 2 * (D/2 + 4)]; one record per (block, KV head,
# slot in block): [K nibbles (D/2 B) | K scale fp16 | K zero fp16 | V nibbles | V scale | V zero],
# nibbles in `pack_int4` order, fp16 values little-endian. See docs/kv_int4_design.md.

def kv_record_bytes(head_dim: int) -> int:
    """Bytes of one (token, KV head) record for K and V together: 2 * (head_dim/2 + 4)."""
    return 2 * (head_dim // 2 + 4)


def _kv_half(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> uint8 [T, H, D/2 + 4]: packed nibbles, then fp16 scale and zero."""
    kv = quantize_kv(x)
    sz = torch.stack((kv.scale, kv.zero), -1).contiguous().view(torch.uint8)  # [T, H, 4]
    return torch.cat((pack_int4(kv.q), sz), -1)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, rotate_k: bool = False,
                   k_center: torch.Tensor | None = None) -> None:
    """Quantize key/value [T, H, D] and store token i at slot ``slot_mapping[i]``
    (= block * block_size + offset) of ``kv_cache``; slots < 0 (padding) are skipped. Only
    ``len(slot_mapping)`` tokens are written, as in vLLM. rotate_k: the keys are quantized as
    ``hadamard_rotate(key)`` (fp32), i.e. the cache holds rotated keys. k_center (fp32 [H, D] or
    None): the keys are stored minus it, ``key.float() - k_center`` (before the rotation), the
    centering of `fake_quantize_kv` (attention over the cache needs nothing else: see there)."""
    n = slot_mapping.shape[0]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k = key[:n][keep]
    if k_center is not None:
        k = k.float() - k_center.float()
    rec = torch.cat((_kv_half(hadamard_rotate(k) if rotate_k else k), _kv_half(value[:n][keep])), -1)
    block_size = kv_cache.shape[2]
    kv_cache[slots // block_size, :, slots % block_size] = rec


def read_kv_cache(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V (fp32 [seq_len, H, D]) of one sequence from its block table."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(seq_len, device=kv_cache.device)
    rec = kv_cache[block_table[pos // block_size].long(), :, pos % block_size]  # [S, H, R]
    half = head_dim // 2 + 4

    def dequant(part: torch.Tensor) -> torch.Tensor:
        q = unpack_int4(part[..., :head_dim // 2].contiguous(), signed=False).to(torch.uint8)
        sz = part[..., head_dim // 2:].contiguous().view(torch.float16)  # [S, H, 2]
        return dequantize_kv(QuantizedKV(q, sz[..., 0], sz[..., 1]))

    return dequant(rec[..., :half]), dequant(rec[..., half:])


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, softmax_scale: float,
                    rotate_k: bool = False) -> torch.Tensor:
    """Causal attention of query [T, Hq, D] over the INT4 paged cache, in fp32: the oracle of the
    CUDA attention kernel.

    Request b owns query rows [query_start_loc[b], query_start_loc[b+1]) (its last q_len tokens)
    and the first seq_lens[b] cache slots listed by block_table[b]; query row i sits at absolute
    position seq_len - q_len + i and sees keys 0..that position. Query head h reads KV head
    h // (Hq / H) (GQA). Returns fp32 [T, Hq, D]; rows no request owns are zero.
    rotate_k: the cache holds rotated keys (`write_kv_cache`), so the query is rotated the same
    way, ``hadamard_rotate(query)`` rounded to query.dtype as the kernel's mma operand is
    (q . k is unchanged by the rotation; V is not rotated, so neither is the output).
    """
    if rotate_k:
        query = hadamard_rotate(query).to(query.dtype)
    t, hq, d = query.shape
    h = kv_cache.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()[:len(qsl) - 1]):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 == q0:
            continue
        k, v = read_kv_cache(kv_cache, block_table[b], seq_len, d)  # [S, H, D]
        k = k.repeat_interleave(hq // h, dim=1).transpose(0, 1)  # [Hq, S, D]
        v = v.repeat_interleave(hq // h, dim=1).transpose(0, 1)
        q = query[q0:q1].float().transpose(0, 1)  # [Hq, L, D]
        s = (q @ k.transpose(1, 2)) * softmax_scale  # [Hq, L, S]
        pos = torch.arange(seq_len - (q1 - q0), seq_len, device=query.device)[:, None]
        s = s.masked_fill(torch.arange(seq_len, device=query.device)[None, :] > pos, float("-inf"))
        out[q0:q1] = (s.softmax(-1) @ v).transpose(0, 1)
    return out
