"""Torch custom ops of vllm_atom (namespace ``vllm_atom``), the only entry points the
model code calls. Each op has a fake implementation (shapes only) for torch.compile, a
CPU implementation that is the pure-torch reference, and a CUDA implementation, the function
of the same name in `vllm_atom.kernels.cuda_ops` (CuPy RawKernels), registered at the end of
this module.
"""

from __future__ import annotations

import torch

from vllm_atom import reference
from vllm_atom.kernels import layout


@torch.library.custom_op("vllm_atom::atom_linear", mutates_args=(), device_types="cpu")
def atom_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                w_outlier: torch.Tensor, w_outlier_scale: torch.Tensor,
                reorder_index: torch.Tensor, bias: torch.Tensor | None, a_clip: float) -> torch.Tensor:
    """y = Atom W4A4 linear of x, in x.dtype.

    x: [M, K] fp16/bf16; qweight: uint8 [N, (K-O)/2]; w_scale: fp16 [N, (K-O)/G];
    w_outlier: int8 [N, O]; w_outlier_scale: fp16 [N, 1]; reorder_index: int32 [K];
    bias: [N] or None. Returns [M, N]. (Layouts of `vllm_atom.format`, one shard.)
    """
    return _reference_linear(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip,
                             exact=False)


@atom_linear.register_fake
def _(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("vllm_atom::atom_linear_reference", mutates_args=())
def atom_linear_reference(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                          w_outlier: torch.Tensor, w_outlier_scale: torch.Tensor,
                          reorder_index: torch.Tensor, bias: torch.Tensor | None, a_clip: float) -> torch.Tensor:
    """`atom_linear` by the pure-torch reference on any device, with the integer-exact GEMM
    (`reference.w4a4_linear_exact`, float64 products): the kernels' quantized integers, exact
    integer sums and group order; only the fp32 fold rounds differently (the kernels fold with
    two FMAs). Slow; for checking the kernels inside vLLM, where everything but
    the linears is then identical (`AtomLinearMethod` with VLLM_ATOM_REFERENCE_LINEAR=1).
    Captures in CUDA graphs (no host synchronisation)."""
    return _reference_linear(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip,
                             exact=True)


@atom_linear_reference.register_fake
def _(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _reference_linear(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip, exact):
    w = reference.QuantizedWeight.from_packed(
        {"qweight": qweight, "w_scale": w_scale, "w_outlier": w_outlier,
         "w_outlier_scale": w_outlier_scale})
    kn = w.q.shape[1]
    return reference.atom_linear(x, w, reorder_index, w_outlier.shape[1], bias,
                                 group_size=kn // w_scale.shape[1], a_clip=a_clip, exact=exact)


# ---- Kernel-level ops: activation quantization (plain, fused with RMSNorm, fused with SiLU·up)
# into the GEMM's layout (`vllm_atom.kernels.layout`), and the GEMM on quantized activations.

def _quantized(x: torch.Tensor, reorder_index: torch.Tensor, n_outliers: int, a_clip: float, sm90: bool):
    a = reference.quantize_activation(x, reorder_index, n_outliers, layout.GROUP, a_clip)
    return layout.pack_activation_sm90(a) if sm90 else layout.pack_activation(a)


def _quantized_fake(x: torch.Tensor, k: int, n_outliers: int, sm90: bool):
    _, ka, steps = layout.sizes(k, n_outliers)
    m = x.shape[0]
    if sm90:
        return (x.new_empty((steps, m, layout.GROUP), dtype=torch.int8),
                x.new_empty((steps, 2 * layout.padded_tokens(m)), dtype=torch.float32))
    return x.new_empty((m, ka), dtype=torch.int8), x.new_empty((steps, m), dtype=torch.float32)


# The producers the fusion pass (`vllm_atom.serve.fusion`) replaces, as vLLM's *compiled* model
# computes them: Inductor keeps fp32 between the fused pointwise ops (it elides the downcast /
# upcast pairs of eager PyTorch), so each output is rounded to the 16-bit dtype once.

def _rms_norm_f32(xf: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """vLLM's RMSNorm compiled: x * rsqrt(mean(x^2) + eps) * weight in fp32, rounded once to x.dtype."""
    return _rms_norm_f32(x.float(), weight, eps, x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused add + RMSNorm compiled: s = x + residual in fp32; returns (`rms_norm` of the
    unrounded s, s rounded to x.dtype: the next residual)."""
    s = x.float() + residual.float()
    return _rms_norm_f32(s, weight, eps, x.dtype), s.to(x.dtype)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul compiled: silu(x[:, :d]) * x[:, d:] in fp32, rounded once to x.dtype."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


@torch.library.custom_op("vllm_atom::quantize_act", mutates_args=(), device_types="cpu")
def quantize_act(x: torch.Tensor, reorder_index: torch.Tensor, n_outliers: int,
                 a_clip: float, sm90: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (qa, sa) in the mma.sync layout (int8 [M, KA], fp32 [steps, M]) or, with
    ``sm90``, the wgmma layout (int8 [steps, M, 128], fp32 [steps, 2*Mp]; e4m3 bytes from
    `gemm_plan.SM90_E4M3_MIN_M` tokens on); see `layout`."""
    return _quantized(x, reorder_index, n_outliers, a_clip, sm90)


@quantize_act.register_fake
def _(x, reorder_index, n_outliers, a_clip, sm90=False):
    return _quantized_fake(x, x.shape[1], n_outliers, sm90)


@torch.library.custom_op("vllm_atom::rmsnorm_quantize_act", mutates_args=(), device_types="cpu")
def rmsnorm_quantize_act(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, reorder_index: torch.Tensor,
                         n_outliers: int, a_clip: float, sm90: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act(rms_norm(x, norm_weight, eps), ...)."""
    return _quantized(rms_norm(x, norm_weight, eps), reorder_index, n_outliers, a_clip, sm90)


@rmsnorm_quantize_act.register_fake
def _(x, norm_weight, eps, reorder_index, n_outliers, a_clip, sm90=False):
    return _quantized_fake(x, x.shape[1], n_outliers, sm90)


@torch.library.custom_op("vllm_atom::fused_add_rmsnorm_quantize_act", mutates_args=(), device_types="cpu")
def fused_add_rmsnorm_quantize_act(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                   reorder_index: torch.Tensor, n_outliers: int, a_clip: float,
                                   sm90: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qa, sa) = quantize_act(y, ...) and the new residual, for (y, residual) =
    `fused_add_rms_norm`(x, residual, norm_weight, eps); x, residual [M, K]."""
    y, res = fused_add_rms_norm(x, residual, norm_weight, eps)
    return (*_quantized(y, reorder_index, n_outliers, a_clip, sm90), res)


@fused_add_rmsnorm_quantize_act.register_fake
def _(x, residual, norm_weight, eps, reorder_index, n_outliers, a_clip, sm90=False):
    return (*_quantized_fake(x, x.shape[1], n_outliers, sm90), torch.empty_like(x))


@torch.library.custom_op("vllm_atom::silu_mul_quantize_act", mutates_args=(), device_types="cpu")
def silu_mul_quantize_act(x: torch.Tensor, reorder_index: torch.Tensor, n_outliers: int,
                          a_clip: float, sm90: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_act(silu_mul(x), ...) for x = [gate | up] of shape [M, 2K]."""
    return _quantized(silu_mul(x), reorder_index, n_outliers, a_clip, sm90)


@silu_mul_quantize_act.register_fake
def _(x, reorder_index, n_outliers, a_clip, sm90=False):
    return _quantized_fake(x, x.shape[1] // 2, n_outliers, sm90)


@torch.library.custom_op("vllm_atom::w4a4_gemm", mutates_args=(), device_types="cpu")
def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
              w_outlier: torch.Tensor, w_outlier_scale: torch.Tensor, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] = the Atom GEMM of kernel-layout activations (from the quantize ops) and packed weights."""
    o = w_outlier.shape[1]
    a = layout.unpack_activation(qa, sa, 2 * qweight.shape[1] + o, o)
    w = reference.QuantizedWeight.from_packed(
        {"qweight": qweight, "w_scale": w_scale, "w_outlier": w_outlier, "w_outlier_scale": w_outlier_scale})
    return reference.w4a4_linear_exact(a, w, bias, out_dtype)


@w4a4_gemm.register_fake
def _(qa, sa, qweight, w_scale, w_outlier, w_outlier_scale, bias, out_dtype):
    return qa.new_empty((qa.shape[0], qweight.shape[0]), dtype=out_dtype)


# ---- The wgmma path (sm_90a): prepacked weights (`layout.prepack_sm90`), activations in the
# sm90 layout. Same numerics as the ops above.

def _unprepack(wpack: torch.Tensor, n: int, n_outliers: int) -> reference.QuantizedWeight:
    return reference.QuantizedWeight.from_packed(layout.unprepack_sm90(wpack, n, n_outliers))


def _outliers_of(wpack: torch.Tensor, steps: int) -> int:
    """The outlier block's width as the kernel sees it (zero-padded to 128), from the slab size."""
    return layout.GROUP if wpack.shape[1] != steps * layout.CHUNK4 else 0


@torch.library.custom_op("vllm_atom::w4a4_gemm_sm90", mutates_args=(), device_types="cpu")
def w4a4_gemm_sm90(qa: torch.Tensor, sa: torch.Tensor, wpack: torch.Tensor, bias: torch.Tensor | None,
                   n: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, N] = the Atom GEMM of sm90-layout activations (qa [steps, M, 128], sa [steps, 2*Mp])
    and prepacked weights wpack [Np/64, slab]."""
    steps = qa.shape[0]
    o = _outliers_of(wpack, steps)
    a = layout.unpack_activation_sm90(qa, sa, layout.GROUP * steps, o)
    return reference.w4a4_linear_exact(a, _unprepack(wpack, n, o), bias, out_dtype)


@w4a4_gemm_sm90.register_fake
def _(qa, sa, wpack, bias, n, out_dtype):
    return qa.new_empty((qa.shape[1], n), dtype=out_dtype)


@torch.library.custom_op("vllm_atom::atom_linear_sm90", mutates_args=(), device_types="cpu")
def atom_linear_sm90(x: torch.Tensor, wpack: torch.Tensor, reorder_index: torch.Tensor, bias: torch.Tensor | None,
                     n: int, n_outliers: int, a_clip: float) -> torch.Tensor:
    """`atom_linear` with prepacked weights: x [M, K] -> [M, N] in x.dtype."""
    w = _unprepack(wpack, n, n_outliers)
    kn = w.q.shape[1]
    return reference.atom_linear(x, w, reorder_index, n_outliers, bias, group_size=kn // w.scale.shape[1],
                                 a_clip=a_clip)


@atom_linear_sm90.register_fake
def _(x, wpack, reorder_index, bias, n, n_outliers, a_clip):
    return x.new_empty((x.shape[0], n))


GEMM_ENV = "VLLM_ATOM_GEMM"  # "mma": the mma.sync kernel even on sm_90 (for comparisons)


def use_sm90(device: torch.device) -> bool:
    """Whether linears on ``device`` run the wgmma path (prepacked weights): a compute
    capability 9.0 GPU, unless VLLM_ATOM_GEMM=mma."""
    import os

    return (device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
            and os.environ.get(GEMM_ENV, "") != "mma")


def prepare_atom_linear_sm90(wpack: torch.Tensor, n: int, reorder_index: torch.Tensor, dtype: torch.dtype) -> None:
    """`prepare_atom_linear` for prepacked weights (compiles every wgmma config the layer can use)."""
    if wpack.is_cuda:
        from vllm_atom.kernels import cuda_ops

        cuda_ops.prepare_sm90(wpack, n, reorder_index, dtype)


def prepare_atom_linear(qweight: torch.Tensor, w_scale: torch.Tensor, w_outlier: torch.Tensor,
                        w_outlier_scale: torch.Tensor, reorder_index: torch.Tensor, dtype: torch.dtype) -> None:
    """Check one linear's tensors against what the kernels support and, on a GPU, compile its
    kernels now (before any CUDA-graph capture). Raises ValueError when unsupported."""
    if qweight.is_cuda:
        from vllm_atom.kernels import cuda_ops

        cuda_ops.prepare(qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, dtype)


if torch.cuda.is_available():
    from vllm_atom.kernels import cuda_ops  # noqa: E402

    for _op, _kernel in ((atom_linear, cuda_ops.atom_linear), (quantize_act, cuda_ops.quantize_act),
                         (rmsnorm_quantize_act, cuda_ops.rmsnorm_quantize_act),
                         (fused_add_rmsnorm_quantize_act, cuda_ops.fused_add_rmsnorm_quantize_act),
                         (silu_mul_quantize_act, cuda_ops.silu_mul_quantize_act), (w4a4_gemm, cuda_ops.w4a4_gemm),
                         (w4a4_gemm_sm90, cuda_ops.w4a4_gemm_sm90), (atom_linear_sm90, cuda_ops.atom_linear_sm90)):
        _op.register_kernel("cuda")(_kernel)
