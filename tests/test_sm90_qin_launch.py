"""The one-launch Atom linear on sm90 (QIN, `gemm_plan.sm90_qin`) without a GPU: the op picks it
only up to SM90_QIN_MAX_M tokens, and its launch passes what the kernel's QIN signature takes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.kernels import _loader, cuda_ops, gemm_plan, layout  # noqa: E402

SRC = Path(_loader.CUDA_DIR) / "w4a4_sm90.cu"


def kernel_params(qin: bool) -> list[str]:
    """The parameter names of w4a4_sm90 as compiled with QIN = qin."""
    text = SRC.read_text()
    sig = text[text.index("w4a4_sm90(const"):]
    sig = sig[:sig.index(") {")]
    sig = re.sub(r"#if QIN\n(.*?)#endif\n", lambda g: g.group(1) if qin else "", sig, flags=re.S)
    return [p.split()[-1].strip("*") for p in sig[len("w4a4_sm90("):].replace("\n", " ").split(",") if p.strip()]


@pytest.fixture
def launches(monkeypatch):
    """Every _loader.launch of the sm90 ops, on CPU tensors (device checks stubbed)."""
    seen = []
    monkeypatch.setattr(cuda_ops, "_check_device", lambda dev: 132)
    monkeypatch.setattr(cuda_ops, "_check_sm90", lambda dev: None)
    monkeypatch.setattr(cuda_ops, "_cluster_slots", lambda dev: {cs: 132 for cs in gemm_plan.SM90_SPLITS})
    monkeypatch.setattr(_loader, "kernel", lambda file, name, defines, dev: (file, name, defines))
    monkeypatch.setattr(_loader, "launch", lambda fn, grid, block, args, smem, dev, dependent=0:
                        seen.append(dict(fn=fn, grid=grid, block=block, args=args, smem=smem, dependent=dependent)))
    return seen


def wpack_for(n: int, k: int, o: int) -> torch.Tensor:
    kn = k - o
    return layout.prepack_sm90(torch.zeros(n, kn // 2, dtype=torch.uint8), torch.ones(n, kn // 128, dtype=torch.float16),
                               torch.zeros(n, o, dtype=torch.int8), torch.ones(n, 1, dtype=torch.float16))


@pytest.mark.parametrize("m", [1, 2, 3])
def test_qin_launch_matches_the_kernel_signature(m, launches, monkeypatch):
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 2)
    n, k, o = 256, 1152, 128
    x = torch.randn(m, k).to(torch.bfloat16)
    idx = torch.randperm(k).to(torch.int32)
    y = cuda_ops.atom_linear_sm90(x, wpack_for(n, k, o), idx, None, n, o, 0.9)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    gemm = launches[-1]
    assert gemm["fn"][0] == "w4a4_sm90.cu" and gemm["dependent"] == 1
    qin = ("QIN", 1) in gemm["fn"][2]
    assert qin == (m <= 2) and len(launches) == (1 if qin else 2)  # QIN: no quantization launch
    names = kernel_params(qin)
    assert len(gemm["args"]) == len(names)
    args = dict(zip(names, gemm["args"]))
    assert args["M"] == m and args["N"] == n and args["G"] == (k - o) // 128 and args["has_outliers"] == 1
    if qin:
        assert args["qa"] == 0 and args["sa"] == 0
        assert args["x"] == x.data_ptr() and args["reorder"] == idx.data_ptr()
        assert (args["K"], args["O"]) == (k, o) and isinstance(args["clip"], np.float32) and args["clip"] == np.float32(0.9)
    else:
        assert launches[0]["fn"][:2] == ("act_quant.cu", "act_quant") and args["qa"] != 0


def test_the_gemm_op_never_launches_qin(launches, monkeypatch):
    """w4a4_gemm_sm90 takes quantized activations: its plan has no QIN at any M."""
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 8)
    n, k, o = 256, 1152, 128
    steps = layout.sizes(k, o)[2]
    qa = torch.zeros(steps, 1, 128, dtype=torch.int8)
    sa = torch.zeros(steps, 2 * layout.padded_tokens(1), dtype=torch.float32)
    cuda_ops.w4a4_gemm_sm90(qa, sa, wpack_for(n, k, o), None, n, torch.bfloat16)
    assert ("QIN", 1) not in launches[-1]["fn"][2] and len(launches[-1]["args"]) == len(kernel_params(False))


def test_qin_bad_reorder_index_is_a_value_error(launches, monkeypatch):
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 2)
    n, k, o = 256, 1152, 128
    with pytest.raises(ValueError, match="reorder_index must be int32"):
        cuda_ops.atom_linear_sm90(torch.randn(1, k).half(), wpack_for(n, k, o), torch.arange(k), None, n, o, 0.9)
    assert not launches
