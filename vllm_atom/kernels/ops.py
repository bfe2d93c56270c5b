"""Torch custom ops of vllm_atom (namespace ``vllm_atom``), the only entry points the
model code calls. Each op has a fake implementation (shapes only) for torch.compile, a
CPU implementation that is the pure-torch reference, and a CUDA implementation
registered by `vllm_atom.kernels.cuda_ops` (CuPy RawKernels).
"""

from __future__ import annotations

import torch

from vllm_atom import reference


@torch.library.custom_op("vllm_atom::atom_linear", mutates_args=(), device_types="cpu")
def atom_linear(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor,
                w_outlier: torch.Tensor, w_outlier_scale: torch.Tensor,
                reorder_index: torch.Tensor, bias: torch.Tensor | None, a_clip: float) -> torch.Tensor:
    """y = Atom W4A4 linear of x, in x.dtype.

    x: [M, K] fp16/bf16; qweight: uint8 [N, (K-O)/2]; w_scale: fp16 [N, (K-O)/G];
    w_outlier: int8 [N, O]; w_outlier_scale: fp16 [N, 1]; reorder_index: int32 [K];
    bias: [N] or None. Returns [M, N]. (Layouts of `vllm_atom.format`, one shard.)
    """
    w = reference.QuantizedWeight.from_packed(
        {"qweight": qweight, "w_scale": w_scale, "w_outlier": w_outlier,
         "w_outlier_scale": w_outlier_scale})
    kn = w.q.shape[1]
    return reference.atom_linear(x, w, reorder_index, w_outlier.shape[1], bias,
                                 group_size=kn // w_scale.shape[1], a_clip=a_clip)


@atom_linear.register_fake
def _(x, qweight, w_scale, w_outlier, w_outlier_scale, reorder_index, bias, a_clip):
    return x.new_empty((x.shape[0], qweight.shape[0]))
