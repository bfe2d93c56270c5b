"""CUDA implementations of the ``vllm_atom`` ops: the kernels in ``cuda/`` via `_loader`.

Every wrapper validates its inputs, allocates outputs with ``torch.empty`` and launches on
torch's current stream, so the ops can be captured in CUDA graphs once `prepare` (or a first
call) has compiled the kernels. The public functions have the signatures of the ops of the same
name; `vllm_atom.kernels.ops` registers them as the ops' CUDA kernels (imports run ops ->
cuda_ops, never back).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from vllm_atom.kernels import _loader, layout
from vllm_atom.kernels.gemm_plan import (GEMM_CONFIGS, N_COUNTERS, SM90_SPLITS, Sm90Config, gemm_plan, sm90_configs,
                                         sm90_e4m3, sm90_plan, sm90_qin, sm90_stages)

ACT_THREADS = 256
# act_split: the shared-memory staging, all CTAs of a quantization together, above which wide rows
# go to fewer CTAs of ACT_WIDE_THREADS; None: never (8 MiB: the A/B of cuda/NOTES.md v3.12)
ACT_STAGE_BYTES: int | None = 8 << 20
ACT_WIDE_THREADS = 1024


def _block_define(threads: int) -> tuple[tuple[str, int], ...]:
    """act_quant.cu's block-size define (none for the default: the kernel cache key)."""
    return (("THREADS", threads),) if threads != ACT_THREADS else ()


_ACT_BLOCKS = (_block_define(ACT_THREADS), _block_define(ACT_WIDE_THREADS))  # what act_split can pick


def _act_blocks() -> tuple[tuple[tuple[str, int], ...], ...]:
    """The block-size defines act_split picks from with the current ACT_STAGE_BYTES."""
    return _ACT_BLOCKS if ACT_STAGE_BYTES is not None else _ACT_BLOCKS[:1]


# act_quant.cu's kernels: plain, and fused with the producers of `vllm_atom.serve.fusion`
ACT_KERNELS = ("act_quant", "rmsnorm_act_quant", "fused_add_rmsnorm_act_quant", "silu_mul_act_quant")
_DTYPES = (torch.bfloat16, torch.float16)


def _version_problem() -> str | None:
    import cupy

    cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    torch_major = int((torch.version.cuda or "0").split(".")[0])
    if cupy_major != torch_major:
        return (f"CuPy is built for CUDA {cupy_major} but torch for CUDA {torch.version.cuda}: "
                f"install cupy-cuda{torch_major}x")
    return None


@functools.cache
def _check_device(index: int) -> int:
    """Multiprocessor count of device ``index``; raises when the kernels cannot run there."""
    problem = _version_problem()
    if problem:
        raise RuntimeError(problem)
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        raise ValueError(f"Atom kernels need compute capability 8.0 or newer, device {index} is {major}.{minor}")
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _counters(index: int) -> torch.Tensor:
    return torch.zeros(N_COUNTERS, dtype=torch.int32, device=f"cuda:{index}")


def _dtype_define(dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    if dtype not in _DTYPES:
        raise ValueError(f"Atom kernels take bfloat16 or float16 activations, got {dtype}")
    return (("DTYPE_BF16", int(dtype == torch.bfloat16)),)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# ---- activation quantization ----

def _check_reorder(name: str, reorder_index: torch.Tensor, k: int) -> None:
    if reorder_index.shape != (k,) or reorder_index.dtype != torch.int32:
        raise ValueError(f"{name}: reorder_index must be int32 [{k}], got {reorder_index.dtype} {list(reorder_index.shape)}")


def _quantize(name: str, x: torch.Tensor, k: int, reorder_index: torch.Tensor, n_outliers: int,
              a_clip: float, extra: tuple = (), sm90: bool = False, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D, got {list(x.shape)}")
    _check_reorder(name, reorder_index, k)
    kn, ka, steps = layout.sizes(k, n_outliers)
    dev = x.device.index
    sms = _check_device(dev)
    m = x.shape[0]
    e4m3 = sm90 and sm90_e4m3(m)  # the GEMM reads the same rule
    if sm90:
        _check_sm90(dev)
        ld = 2 * layout.padded_tokens(m)
        qa = torch.empty((steps, m, layout.GROUP), dtype=torch.int8, device=x.device)
    else:
        ld = m
        qa = torch.empty((m, ka), dtype=torch.int8, device=x.device)
    sa = torch.empty((steps, ld), dtype=torch.float32, device=x.device)
    if m == 0:
        return qa, sa
    threads, ctas = act_split(m, k, steps, sms)
    per_cta = math.ceil(steps / ctas)
    smem = 2 * k * rows  # the staged 16-bit rows
    fn = _loader.kernel("act_quant.cu", name, _act_defines(x.dtype, sm90, e4m3) + _block_define(threads), dev)
    x = _aligned(x)  # alive until the launch
    _loader.launch(fn, (m, math.ceil(steps / per_cta), 1), (threads, 1, 1),
                   (x.data_ptr(), *extra, reorder_index.contiguous().data_ptr(), np.int32(k),
                    np.int32(kn), np.int32(n_outliers), np.float32(a_clip), qa.data_ptr(), sa.data_ptr(),
                    np.int32(ld), np.int32(per_cta)), smem, dev,
                   dependent=2 if sm90 else 0)  # VLLM_ATOM_PDL=2: starts while the GEMM before it ends
    return qa, sa


def act_split(m: int, k: int, steps: int, sms: int) -> tuple[int, int]:
    """(threads per CTA, CTAs per row) of the quantization of ``m`` rows of ``k`` channels.

    Each CTA stages its whole row in shared memory and quantizes a share of the row's ``steps``,
    one warp per step at a time. Few rows: the steps of a row are spread over several CTAs so that
    the chip is used. When that would stage more than `ACT_STAGE_BYTES` in all (wide rows: every
    CTA of a row reads all of it), fewer CTAs of `ACT_WIDE_THREADS` threads share a row instead
    (``ACT_STAGE_BYTES = None``: never)."""
    threads = ACT_THREADS
    ctas = max(1, min(math.ceil(2 * sms / m), math.ceil(steps / (threads // 32))))
    row_bytes = 2 * k * m
    if ACT_STAGE_BYTES is not None and ctas > 1 and row_bytes * ctas > ACT_STAGE_BYTES:
        threads = ACT_WIDE_THREADS
        ctas = max(1, min(ctas, ACT_STAGE_BYTES // row_bytes, math.ceil(steps / (threads // 32))))
    return threads, ctas


def _act_defines(dtype: torch.dtype, sm90: bool, e4m3: bool = False) -> tuple[tuple[str, int], ...]:
    return _dtype_define(dtype) + ((("SM90_LAYOUT", 1),) if sm90 else ()) + ((("E4M3", 1),) if e4m3 else ())


def quantize_act(x, reorder_index, n_outliers, a_clip, sm90=False):
    return _quantize("act_quant", x, x.shape[-1], reorder_index, n_outliers, a_clip, sm90=sm90)


def rmsnorm_quantize_act(x, norm_weight, eps, reorder_index, n_outliers, a_clip, sm90=False):
    k = x.shape[-1]
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"rmsnorm_quantize_act: norm_weight must be {x.dtype} [{k}]")
    norm_weight = _aligned(norm_weight)  # alive until the launch
    return _quantize("rmsnorm_act_quant", x, k, reorder_index, n_outliers, a_clip,
                     (norm_weight.data_ptr(), np.float32(eps)), sm90=sm90)


def fused_add_rmsnorm_quantize_act(x, residual, norm_weight, eps, reorder_index, n_outliers, a_clip, sm90=False):
    k = x.shape[-1]
    if norm_weight.shape != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"fused_add_rmsnorm_quantize_act: norm_weight must be {x.dtype} [{k}]")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rmsnorm_quantize_act: residual must be {x.dtype} {list(x.shape)}, "
                         f"got {residual.dtype} {list(residual.shape)}")
    residual, norm_weight = _aligned(residual), _aligned(norm_weight)  # alive until the launch
    residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    qa, sa = _quantize("fused_add_rmsnorm_act_quant", x, k, reorder_index, n_outliers, a_clip,
                       (residual.data_ptr(), residual_out.data_ptr(), norm_weight.data_ptr(), np.float32(eps)),
                       sm90=sm90, rows=2)
    return qa, sa, residual_out


def silu_mul_quantize_act(x, reorder_index, n_outliers, a_clip, sm90=False):
    return _quantize("silu_mul_act_quant", x, x.shape[-1] // 2, reorder_index, n_outliers, a_clip, sm90=sm90)


# ---- GEMM ----

def _check_weights(qweight, w_scale, w_outlier, w_outlier_scale) -> tuple[int, int, int]:
    """(N, Kn, O) of packed weights in `vllm_atom.format` layout; ValueError if not supported."""
    n, half_kn = qweight.shape
    kn = 2 * half_kn
    o = w_outlier.shape[1]
    layout.sizes(kn + o, o)
    want = {"qweight": (qweight, torch.uint8, (n, half_kn)),
            "w_scale": (w_scale, torch.float16, (n, kn // layout.GROUP)),
            "w_outlier": (w_outlier, torch.int8, (n, o)),
            "w_outlier_scale": (w_outlier_scale, torch.float16, (n, 1))}
    for name, (t, dtype, shape) in want.items():
        if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name}: expected contiguous 16-byte aligned {dtype} {list(shape)}, "
                             f"got {t.dtype} {list(t.shape)}")
    if n % 8:
        raise ValueError(f"Atom kernels need N a multiple of 8, got N={n}")
    return n, kn, o


def _gemm_defines(cfg: str, dtype: torch.dtype) -> tuple[tuple[str, int], ...]:
    names = ("BM", "BN", "WARPS_M", "WARPS_N", "STAGES", "MIN_BLOCKS")
    return tuple(zip(names, GEMM_CONFIGS[cfg])) + _dtype_define(dtype)


def _bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """bias as a contiguous [N] tensor of the output dtype (or None)."""
    if bias is None:
        return None
    if bias.shape != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    return bias.to(dtype).contiguous()


def _gemm(qa, sa, qweight, w_scale, w_outlier, w_outlier_scale, bias, out_dtype):
    n, kn, o = _check_weights(qweight, w_scale, w_outlier, w_outlier_scale)
    _, ka, steps = layout.sizes(kn + o, o)
    m = qa.shape[0]
    if qa.dtype != torch.int8 or qa.shape != (m, ka) or sa.shape != (steps, m) or sa.dtype != torch.float32:
        raise ValueError(f"w4a4_gemm: expected qa int8 [M, {ka}] and sa fp32 [{steps}, M], "
                         f"got {qa.dtype} {list(qa.shape)}, {sa.dtype} {list(sa.shape)}")
    dev = qa.device.index
    sms = _check_device(dev)
    out = torch.empty((m, n), dtype=out_dtype, device=qa.device)
    bias = _bias(bias, n, out_dtype)
    if m == 0:
        return out
    cfg, splits, per_split = gemm_plan(m, n, kn // layout.GROUP, sms)
    bm, bn, wm, wn, stages, _ = GEMM_CONFIGS[cfg]
    tiles_m, tiles_n = math.ceil(m / bm), math.ceil(n / bn)
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=qa.device) if splits > 1 else out
    smem = stages * (bm * 128 + bn * 64)
    defines = _gemm_defines(cfg, out_dtype)
    fn = _loader.kernel("w4a4_gemm.cu", "w4a4_gemm", defines, dev)
    _loader.launch(fn, (tiles_m * tiles_n, splits, 1), (32 * wm * wn, 1, 1),
                   (qa.contiguous().data_ptr(), sa.contiguous().data_ptr(), qweight.data_ptr(), w_scale.data_ptr(),
                    w_outlier.data_ptr(), w_outlier_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    out.data_ptr(), ws.data_ptr(), _counters(dev).data_ptr(), np.int32(m), np.int32(n),
                    np.int32(kn), np.int32(o), np.int32(tiles_m), np.int32(tiles_n), np.int32(per_split)),
                   smem, dev)
    return out


def w4a4_gemm(qa, sa, qweight, w_scale, w_outlier, w_outlier_scale, bias, out_dtype):
    return _gemm(qa, sa, qweight, w_scale, w_outlier, w_outlier_scale, bias, out_dtype)


def atom_linear(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip):
    o = w_outlier.shape[1]
    qa, sa = _quantize("act_quant", x, x.shape[-1], reorder_index, o, a_clip)
    return _gemm(qa, sa, qweight, w_scale, w_outlier, w_outlier_scale, bias, x.dtype)


# ---- wgmma GEMM (sm_90a) ----

@functools.cache
def _check_sm90(index: int) -> None:
    if torch.cuda.get_device_capability(index) != (9, 0):
        major, minor = torch.cuda.get_device_capability(index)
        raise ValueError(f"the sm90 Atom GEMM needs compute capability 9.0 (H100/H200), device {index} is "
                         f"{major}.{minor}")


@functools.cache
def _cluster_slots(index: int) -> dict[int, int]:
    """{cluster size: CTAs resident at once} for the sm90 GEMM (one CTA per SM; clusters must fit
    in one GPC, so sizes 4 and 8 may leave SMs idle)."""
    slots = {1: _check_device(index)}  # no cluster: the occupancy query does not apply
    for cs in SM90_SPLITS[1:]:
        cfg = Sm90Config(8, 1, sm90_stages(8, 1), cs)
        fn = _loader.kernel("w4a4_sm90.cu", "w4a4_sm90", cfg.defines() + _dtype_define(torch.bfloat16), index)
        slots[cs] = cs * _loader.max_active_clusters(fn, (_check_device(index), cs, 1), cfg.threads,
                                                     cfg.smem_bytes, index)
    return slots


def _check_wpack(wpack: torch.Tensor, n: int, steps: int | None = None) -> tuple[int, bool]:
    """(G, has outliers) of prepacked weights for N rows; ValueError if malformed."""
    if wpack.dtype != torch.uint8 or wpack.dim() != 2 or not wpack.is_contiguous() or wpack.data_ptr() % 16:
        raise ValueError(f"wpack: expected contiguous 16-byte aligned uint8 [Np/64, slab], got "
                         f"{wpack.dtype} {list(wpack.shape)}")
    slabs, slab = wpack.shape
    if n <= 0 or n % 8 or slabs * layout.SLAB_ROWS < n or (slabs * layout.SLAB_ROWS) % layout.N_ALIGN:
        raise ValueError(f"wpack: {slabs} slabs of 64 rows do not hold N={n} (N a multiple of 8, "
                         f"rows padded to {layout.N_ALIGN})")
    has_o = slab % layout.CHUNK4 != 0
    g = (slab - (layout.CHUNK8 if has_o else 0)) // layout.CHUNK4
    if g <= 0 or g * layout.CHUNK4 + (layout.CHUNK8 if has_o else 0) != slab:
        raise ValueError(f"wpack: slab of {slab} bytes is not G*{layout.CHUNK4} (+{layout.CHUNK8})")
    if steps is not None and steps != g + has_o:
        raise ValueError(f"activations have {steps} steps but the weights {g + has_o}")
    return g, has_o


def _launch_sm90(m: int, steps: int, wpack: torch.Tensor, bias, n: int, out_dtype: torch.dtype, device,
                 acts: tuple, qin: bool) -> torch.Tensor:
    """Plan and launch the wgmma GEMM; ``acts``: (qa, sa) pointers, or with ``qin`` the QIN
    arguments (x, reorder, K, O, clip). Returns out [M, N]."""
    g, has_o = _check_wpack(wpack, n, steps)
    dev = device.index
    sms = _check_device(dev)
    _check_sm90(dev)
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    bias = _bias(bias, n, out_dtype)
    if m == 0:
        return out
    cfg, per_split = sm90_plan(m, n, layout.GROUP * steps, steps, sms, _cluster_slots(dev))
    if qin:
        cfg = cfg._replace(qin=1)
    slabs = wpack.shape[0]
    tiles_m, tiles_n = math.ceil(m / cfg.bn), math.ceil(slabs / cfg.slabs)
    fn = _loader.kernel("w4a4_sm90.cu", "w4a4_sm90", cfg.defines() + _dtype_define(out_dtype), dev)
    args = ((0, 0) if qin else acts) + (
        wpack.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), np.int32(m),
        np.int32(layout.padded_tokens(m)), np.int32(n), np.int32(g), np.int32(int(has_o)), np.int32(slabs),
        np.int32(tiles_m), np.int32(tiles_n), np.int32(per_split)) + (acts if qin else ())
    # a programmatic dependent: set up while the quantization (or, with QIN, any kernel before) runs
    _loader.launch(fn, (tiles_m * tiles_n, cfg.cs, 1), (cfg.threads, 1, 1), args, cfg.smem_bytes, dev, dependent=1)
    return out


def _gemm_sm90(qa, sa, wpack, bias, n, out_dtype):
    if qa.dtype != torch.int8 or qa.dim() != 3 or qa.shape[2] != layout.GROUP or not qa.is_contiguous():
        raise ValueError(f"w4a4_gemm_sm90: qa must be contiguous int8 [steps, M, 128], got {qa.dtype} "
                         f"{list(qa.shape)}")
    steps, m, _ = qa.shape
    mp = layout.padded_tokens(m)
    if sa.dtype != torch.float32 or tuple(sa.shape) != (steps, 2 * mp) or not sa.is_contiguous():
        raise ValueError(f"w4a4_gemm_sm90: sa must be contiguous fp32 [{steps}, {2 * mp}], got {sa.dtype} "
                         f"{list(sa.shape)}")
    return _launch_sm90(m, steps, wpack, bias, n, out_dtype, qa.device, (qa.data_ptr(), sa.data_ptr()), False)


def _linear_sm90_qin(x, wpack, reorder_index, bias, n, n_outliers, a_clip):
    """The Atom linear as one QIN launch (`gemm_plan.sm90_qin`): the GEMM quantizes x itself."""
    k = x.shape[-1]
    _check_reorder("atom_linear_sm90", reorder_index, k)
    _dtype_define(x.dtype)
    steps = layout.sizes(k, n_outliers)[2]
    x, reorder_index = x.contiguous(), reorder_index.contiguous()  # alive until the launch
    return _launch_sm90(x.shape[0], steps, wpack, bias, n, x.dtype, x.device,
                        (x.data_ptr(), reorder_index.data_ptr(), np.int32(k), np.int32(n_outliers),
                         np.float32(a_clip)), True)


def w4a4_gemm_sm90(qa, sa, wpack, bias, n, out_dtype):
    return _gemm_sm90(qa, sa, wpack, bias, n, out_dtype)


def atom_linear_sm90(x, wpack, reorder_index, bias, n, n_outliers, a_clip):
    if x.dim() == 2 and sm90_qin(x.shape[0]):  # a token or two: one launch (size dispatch inside the op)
        return _linear_sm90_qin(x, wpack, reorder_index, bias, n, n_outliers, a_clip)
    qa, sa = _quantize("act_quant", x, x.shape[-1], reorder_index, n_outliers, a_clip, sm90=True)
    return _gemm_sm90(qa, sa, wpack, bias, n, x.dtype)


def prepare_sm90(wpack: torch.Tensor, n: int, reorder_index: torch.Tensor, dtype: torch.dtype) -> None:
    """Validate one prepacked linear and compile every kernel it can launch (all M)."""
    g, has_o = _check_wpack(wpack, n)
    dev = wpack.device.index
    _check_device(dev)
    _check_sm90(dev)
    _compile_sm90(dev, n, g + has_o, dtype)


@functools.cache
def _compile_sm90(dev: int, n: int, steps: int, dtype: torch.dtype) -> None:
    """Compile every kernel a prepacked linear of this shape can launch (once per shape: the
    layers of a model share a few)."""
    cfgs = sm90_configs(n, layout.GROUP * steps, steps, _check_device(dev), _cluster_slots(dev))
    for name in ACT_KERNELS:
        for e4m3 in sorted({bool(c.e4m3) for c in cfgs}):  # (e4m3 only where the cut is in range)
            for threads in _act_blocks():
                _loader.kernel("act_quant.cu", name, _act_defines(dtype, True, e4m3) + threads, dev)
    for cfg in cfgs:
        _loader.kernel("w4a4_sm90.cu", "w4a4_sm90", cfg.defines() + _dtype_define(dtype), dev)


def prepare(qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, dtype) -> None:
    """Validate one linear for the kernels and compile everything it can launch (all M)."""
    n, kn, o = _check_weights(qweight, w_scale, w_outlier, w_outlier_scale)
    if reorder_index.shape != (kn + o,) or reorder_index.dtype != torch.int32:
        raise ValueError(f"reorder_index must be int32 [{kn + o}], got {reorder_index.dtype} {list(reorder_index.shape)}")
    dev = qweight.device.index
    _check_device(dev)
    _counters(dev)
    for name in ACT_KERNELS:
        for threads in _act_blocks():
            _loader.kernel("act_quant.cu", name, _dtype_define(dtype) + threads, dev)
    for cfg in GEMM_CONFIGS:
        defines = _gemm_defines(cfg, dtype)
        _loader.kernel("w4a4_gemm.cu", "w4a4_gemm", defines, dev)
