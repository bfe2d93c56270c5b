"""Every CUDA kernel compiles (NVRTC, to cubin, so ptxas runs too) for sm_80, sm_89 and sm_90
in every configuration the ops launch. Needs CuPy's NVRTC, no GPU and no driver."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.kernels import _loader, kv_int4  # noqa: E402

ARCHS = ["sm_80", "sm_89", "sm_90"]
GEMM_CONFIGS = {  # mirrors vllm_atom.kernels.cuda_ops.GEMM_CONFIGS (that module needs a GPU to import)
    "small": (16, 128, 1, 4, 8, 2),
    "medium": (64, 128, 2, 4, 4, 1),
    "large": (128, 128, 2, 4, 4, 1),
}


def gemm_defines(cfg: str, bf16: int):
    names = ("BM", "BN", "WARPS_M", "WARPS_N", "STAGES", "MIN_BLOCKS")
    return tuple(zip(names, GEMM_CONFIGS[cfg])) + (("DTYPE_BF16", bf16),)


def test_sources_found():
    assert {"act_quant.cu", "w4a4_gemm.cu", "kv_int4.cu"} <= set(_loader.sources())


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("arch", ARCHS)
def test_act_quant_compiles(arch, bf16):
    assert _loader.compile_cubin("act_quant.cu", (("DTYPE_BF16", bf16),), arch)


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("cfg", list(GEMM_CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_compiles(arch, cfg, bf16):
    assert _loader.compile_cubin("w4a4_gemm.cu", gemm_defines(cfg, bf16), arch)


def test_configs_match_cuda_ops():
    import ast

    src = (_loader.CUDA_DIR.parent / "vllm_atom" / "kernels" / "cuda_ops.py").read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "GEMM_CONFIGS":
            assert ast.literal_eval(node.value) == GEMM_CONFIGS
            return
    raise AssertionError("GEMM_CONFIGS not found in cuda_ops.py")


def test_compile_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text("extern \"C\" __global__ void k() { undefined_thing(); }\n")
    monkeypatch.setattr(_loader, "CUDA_DIR", tmp_path)
    with pytest.raises(_loader.KernelCompileError, match="undefined_thing"):
        _loader.compile_cubin.__wrapped__("bad.cu", (), "sm_90")


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_int4_compiles(arch, head_dim, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float16
    assert _loader.compile_cubin("kv_int4.cu", kv_int4._defines(head_dim, dtype), arch)
