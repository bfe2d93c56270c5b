"""The INT4 KV cache kernels (``cuda/kv_int4.cu``): cache write and paged attention.

Cache: uint8 ``[num_blocks, H, block_size, 2 * (D/2 + 4)]``, vLLM's ``int4_per_token_head``
shape, any strides (vLLM hands the logical shape with its physical strides); one record per
(block, KV head, slot) as documented in `vllm_atom.reference.write_kv_cache`. D is 64 or 128.
``rotate_k`` (the checkpoint's ``AtomConfig.kv_rotate_k``): keys are stored in a per-head Hadamard
basis (`vllm_atom.reference.hadamard_rotate`) and queries rotated the same way in the attention; a
cache must be written and read with the same setting.

These run inside vLLM's attention custom ops (``unified_kv_cache_update`` and
``unified_attention_with_output``, opaque to torch.compile), so they are plain functions, not
custom ops of their own. They allocate with ``torch.empty`` and launch on torch's current
stream, so they can be captured in CUDA graphs once compiled (`prepare`). On CPU tensors they
run the reference (`vllm_atom.reference`), which is also their test oracle.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from vllm_atom import reference
from vllm_atom.kernels.gemm_plan import BATCH_INVARIANT  # decode rows are not split then

HEAD_DIMS = (64, 128)
# Passed to cuda/kv_int4.cu as -D defines (`_defines`); the kernels take them from here only.
TILE = 16  # tokens per attention tile; block_size must be a multiple
WARPS = 4
STAGES = 4  # cp.async ring depth per warp
MAX_SPLITS = 64
# The contiguous-tile attention kernel can merge the WARPS decode splits of each CTA in shared
# memory (one partial per CTA, so the reduce reads a quarter; none and no reduce launch with WARPS
# splits). It does so from MERGE_MIN_SPLITS splits on: it pays where the splits are many and
# short (small batches; measured, cuda/NOTES.md), and costs a little at 12 and 4 splits.
# VLLM_ATOM_KV_MERGE=0 never merges.
MERGE_SPLITS = os.environ.get("VLLM_ATOM_KV_MERGE", "1") == "1"
MERGE_MIN_SPLITS = 32
_DTYPES = (torch.bfloat16, torch.float16)


def _check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"Atom INT4 KV cache supports head_dim in {HEAD_DIMS}, got {head_dim}")


def check_cache(kv_cache: torch.Tensor, head_dim: int) -> None:
    """ValueError unless kv_cache is a uint8 [num_blocks, H, block, 2*(D/2+4)] the kernels can read."""
    _check_head_dim(head_dim)
    rec = reference.kv_record_bytes(head_dim)
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[3] != rec:
        raise ValueError(f"INT4 KV cache must be uint8 [num_blocks, heads, block_size, {rec}] "
                         f"for head_dim {head_dim}, got {kv_cache.dtype} {list(kv_cache.shape)}")
    if kv_cache.shape[2] % TILE:
        raise ValueError(f"INT4 KV cache block_size must be a multiple of {TILE}, got {kv_cache.shape[2]}")
    if kv_cache.stride(3) != 1 or any(s % 8 for s in kv_cache.stride()[:3]) or kv_cache.data_ptr() % 16:
        raise ValueError(f"INT4 KV cache records must be contiguous with 8-byte aligned strides, "
                         f"got strides {kv_cache.stride()}")


def _same_device(kv_cache: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if x.device != kv_cache.device:
            raise ValueError(f"{name} is on {x.device} but the KV cache is on {kv_cache.device}")


def decode_splits(num_reqs: int, num_kv_heads: int, cta_slots: int, m_tiles: int = 1) -> int:
    """Split-K factor for a decode batch, from the batch shape only (CUDA-graph safe: the real
    sequence lengths are read on the device). A CTA runs WARPS consecutive splits of one
    (request, KV head) and m_tiles row tiles, so the factor is a multiple of WARPS: the largest
    one whose CTAs all fit on the GPU at once (``cta_slots``, from `cta_slots`), at least WARPS
    and at most MAX_SPLITS.
    Measured on an H100 (Llama-3-8B heads): 16 requests run 1.08x faster with 12 splits (one
    wave) than with 16, and 64 or 256 requests slow down with 8-12 splits instead of 4 (more
    reduce traffic, shorter splits, no gain from a fuller last wave)."""
    pairs = max(1, num_reqs * num_kv_heads)
    per_pair = max(1, cta_slots // pairs)  # CTAs one (request, head) may have in a single wave
    return max(WARPS, min(MAX_SPLITS, per_pair * WARPS // m_tiles // WARPS * WARPS))


@functools.cache
def cta_slots(head_dim: int, dtype: torch.dtype, device_index: int, rotate_k: bool = False) -> int:
    """How many CTAs of the cp.async attention kernel the GPU holds at once (occupancy x SMs)."""
    from cupy_backends.cuda.api import driver

    fn = _kernel("kv_int4_attention", head_dim, dtype, torch.device("cuda", device_index), rotate_k)
    smem = WARPS * STAGES * TILE * reference.kv_record_bytes(head_dim)
    per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, 32 * WARPS, smem)
    return max(1, per_sm) * torch.cuda.get_device_properties(device_index).multi_processor_count


def _defines(head_dim: int, dtype: torch.dtype, rotate_k: bool = False) -> tuple[tuple[str, int], ...]:
    if dtype not in _DTYPES:
        raise ValueError(f"INT4 KV cache kernels take bfloat16 or float16, got {dtype}")
    return (("HEAD_DIM", head_dim), ("DTYPE_BF16", int(dtype == torch.bfloat16)),
            ("TILE", TILE), ("WARPS", WARPS), ("STAGES", STAGES), ("ROTATE_K", int(rotate_k)))


def _kernel(name: str, head_dim: int, dtype: torch.dtype, device: torch.device, rotate_k: bool = False):
    from vllm_atom.kernels import _loader

    return _loader.kernel("kv_int4.cu", name, _defines(head_dim, dtype, rotate_k), device.index)


def prepare(head_dim: int, dtype: torch.dtype, device: torch.device, rotate_k: bool = False) -> None:
    """Compile and load every kernel for (head_dim, dtype, rotate_k) before any CUDA-graph capture."""
    _check_head_dim(head_dim)
    if device.type == "cuda":
        for name in ("kv_int4_write", "kv_int4_attention", "kv_int4_attention_strided", "kv_int4_reduce"):
            _kernel(name, head_dim, dtype, device, rotate_k)
        cta_slots(head_dim, dtype, device.index, rotate_k)


def write_kv_int4(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, rotate_k: bool = False,
                  k_center: torch.Tensor | None = None) -> None:
    """Quantize key/value [T, H, D] (bf16/fp16, last dim contiguous) and store token i at slot
    ``slot_mapping[i]`` (int64); only ``len(slot_mapping)`` tokens are written, slots < 0 skipped.
    rotate_k: store the keys Hadamard-rotated (module doc). k_center: fp32 [H, D] (contiguous) or
    None; the keys are stored minus it (`AtomConfig.kv_center_k`, `reference.write_kv_cache`)."""
    n, h, d = slot_mapping.shape[0], kv_cache.shape[1], key.shape[-1]
    check_cache(kv_cache, d)
    if k_center is not None and (k_center.shape != (h, d) or k_center.dtype != torch.float32
                                 or not k_center.is_contiguous()):
        raise ValueError(f"k_center must be contiguous fp32 [{h}, {d}] (kv heads, head_dim), got "
                         f"{k_center.dtype} {list(k_center.shape)}")
    for name, x in (("key", key), ("value", value)):
        if x.dim() != 3 or x.shape[1:] != (h, d) or x.shape[0] < n or x.stride(2) != 1 or x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be bf16/fp16 [>= {n}, {h}, {d}] with a contiguous last dim, "
                             f"got {x.dtype} {list(x.shape)} strides {x.stride()}")
    _same_device(kv_cache, key=key, value=value, slot_mapping=slot_mapping,
                 **({} if k_center is None else {"k_center": k_center}))
    if value.dtype != key.dtype or slot_mapping.dtype != torch.int64:
        raise ValueError(f"key/value dtypes must match and slot_mapping must be int64, got "
                         f"{key.dtype}/{value.dtype}/{slot_mapping.dtype}")
    if kv_cache.device.type != "cuda":
        reference.write_kv_cache(key, value, kv_cache, slot_mapping, rotate_k, k_center)
        return
    if n == 0:
        return
    from vllm_atom.kernels import _loader

    s = kv_cache.stride()
    fn = _kernel("kv_int4_write", d, key.dtype, kv_cache.device, rotate_k)
    _loader.launch(fn, (math.ceil(2 * n * h / WARPS), 1, 1), (32 * WARPS, 1, 1),
                   (key.data_ptr(), value.data_ptr(), kv_cache.data_ptr(), slot_mapping.data_ptr(),
                    0 if k_center is None else k_center.data_ptr(), np.int32(n),
                    np.int32(h), np.int64(key.stride(0)), np.int64(key.stride(1)), np.int64(value.stride(0)),
                    np.int64(value.stride(1)), np.int64(s[0]), np.int64(s[1]), np.int64(s[2]),
                    np.int32(kv_cache.shape[2])), 0, kv_cache.device.index)


def attention_int4(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                   seq_lens: torch.Tensor, block_table: torch.Tensor, max_query_len: int,
                   softmax_scale: float, out: torch.Tensor | None = None,
                   num_splits: int | None = None, rotate_k: bool = False) -> torch.Tensor:
    """Causal attention of query [T, Hq, D] over the INT4 paged cache (see
    `vllm_atom.reference.paged_attention` for the exact semantics).

    query_start_loc int32 [B+1], seq_lens int32 [B], block_table int32 [B, max_blocks] (rows may
    be padding requests with no query tokens). ``max_query_len`` (a host int) sizes the grid; when
    it is 1 the tokens are split ``num_splits`` ways (default `decode_splits`) and reduced.
    Returns out [T, Hq, D] in query.dtype (rows no request owns are left untouched).
    rotate_k: the cache was written with rotated keys (module doc); the query is rotated to match.
    """
    t, hq, d = query.shape
    h = kv_cache.shape[1]
    check_cache(kv_cache, d)
    if query.dtype not in _DTYPES or query.stride(2) != 1 or hq % h:
        raise ValueError(f"query must be bf16/fp16 [T, Hq, {d}] with a contiguous last dim and Hq a multiple "
                         f"of {h} KV heads, got {query.dtype} {list(query.shape)}")
    b = seq_lens.shape[0]
    if (query_start_loc.dtype, seq_lens.dtype, block_table.dtype) != (torch.int32,) * 3 or \
            query_start_loc.shape[0] < b + 1 or block_table.shape[0] < b or block_table.stride(1) != 1:
        raise ValueError("query_start_loc [B+1], seq_lens [B], block_table [B, n] must be int32 "
                         "(block_table rows contiguous)")
    if out is None:
        out = torch.empty_like(query)
    _same_device(kv_cache, query=query, query_start_loc=query_start_loc, seq_lens=seq_lens,
                 block_table=block_table, out=out)
    if out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1 or \
            out.stride(1) % 8 or out.stride(0) % 8 or out.data_ptr() % 16:
        raise ValueError(f"out must be {query.dtype} {list(query.shape)} with 16-byte aligned rows, "
                         f"got {out.dtype} {list(out.shape)} strides {out.stride()}")
    if query.stride(0) % 8 or query.stride(1) % 8 or query.data_ptr() % 16:
        query = query.clone(memory_format=torch.contiguous_format)  # fresh, aligned, dense
    if query.device.type != "cuda":
        ref = reference.paged_attention(query, kv_cache, query_start_loc, seq_lens, block_table, softmax_scale,
                                        rotate_k)
        rows = torch.zeros(t, dtype=torch.bool)
        for q0, q1 in zip(query_start_loc[:b].tolist(), query_start_loc[1:b + 1].tolist()):
            rows[q0:q1] = True
        out[rows] = ref[rows].to(out.dtype)
        return out
    if b == 0 or t == 0:
        return out
    from vllm_atom.kernels import _loader

    g = hq // h
    m_tiles = math.ceil(max(1, max_query_len) * g / 16)
    if num_splits is None:
        num_splits = decode_splits(b, h, cta_slots(d, query.dtype, query.device.index, rotate_k), m_tiles) \
            if max_query_len <= 1 and not BATCH_INVARIANT else 1
    dev = query.device
    s = kv_cache.stride()
    rec = reference.kv_record_bytes(d)
    # vLLM's HND layout keeps each 16-token (block, head) tile contiguous: staged by cp.async.
    tiles = s[2] == rec and s[1] % 16 == 0 and s[0] % 16 == 0 and kv_cache.data_ptr() % 16 == 0
    # That kernel can merge the WARPS splits of each CTA itself (MERGE_SPLITS).
    merge = MERGE_SPLITS and tiles and num_splits >= max(MERGE_MIN_SPLITS, 2) and num_splits % WARPS == 0
    parts = num_splits // WARPS if merge else num_splits
    if parts > 1:
        part_o = torch.empty((t, hq, parts, d), dtype=torch.float32, device=dev)
        part_ml = torch.empty((t, hq, parts, 2), dtype=torch.float32, device=dev)
        po, pml = part_o.data_ptr(), part_ml.data_ptr()
    else:
        po = pml = 0
    name, smem = ("kv_int4_attention", WARPS * STAGES * TILE * rec) if tiles else ("kv_int4_attention_strided", 0)
    fn = _kernel(name, d, query.dtype, dev, rotate_k)
    _loader.launch(fn, (math.ceil(m_tiles * num_splits / WARPS), h, b), (32 * WARPS, 1, 1),
                   (query.data_ptr(), out.data_ptr(), po, pml, kv_cache.data_ptr(), query_start_loc.data_ptr(),
                    seq_lens.data_ptr(), block_table.data_ptr(), np.int32(block_table.stride(0)),
                    np.int64(query.stride(0)), np.int64(query.stride(1)), np.int64(out.stride(0)),
                    np.int64(out.stride(1)), np.int64(s[0]), np.int64(s[1]), np.int64(s[2]),
                    np.int32(kv_cache.shape[2]), np.int32(g), np.int32(num_splits), np.int32(merge),
                    np.float32(softmax_scale * math.log2(math.e))), smem, dev.index)
    if parts > 1:
        fn = _kernel("kv_int4_reduce", d, query.dtype, dev, rotate_k)
        _loader.launch(fn, (b, hq, 1), (d, 1, 1),
                       (po, pml, out.data_ptr(), query_start_loc.data_ptr(), np.int64(out.stride(0)),
                        np.int64(out.stride(1)), np.int32(parts)), 0, dev.index)
    return out
