"""Every CUDA kernel compiles (NVRTC, to cubin, so ptxas runs too) for sm_80, sm_89 and sm_90a
in every configuration the ops launch. Needs CuPy's NVRTC, no GPU and no driver."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.kernels import _loader, cuda_ops, kv_int4  # noqa: E402
from vllm_atom.kernels.gemm_plan import (GEMM_CONFIGS, SM90_ALL_WIDTHS, SM90_SPLITS, SM90_TUNED, SM90_WIDTHS,  # noqa: E402
                                         Sm90Config, sm90_pipe_wgcs, sm90_plan, sm90_shapes, sm90_stages)

ARCHS = ["sm_80", "sm_89", "sm_90a"]


def gemm_defines(cfg: str, bf16: int):
    names = ("BM", "BN", "WARPS_M", "WARPS_N", "STAGES", "MIN_BLOCKS")
    return tuple(zip(names, GEMM_CONFIGS[cfg])) + (("DTYPE_BF16", bf16),)


def test_sources_found():
    assert {"act_quant.cu", "w4a4_gemm.cu", "kv_int4.cu"} <= set(_loader.sources())


@pytest.mark.parametrize("threads", cuda_ops._ACT_BLOCKS)
@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("arch", ARCHS)
def test_act_quant_compiles(arch, bf16, threads):
    assert _loader.compile_cubin("act_quant.cu", (("DTYPE_BF16", bf16),) + threads, arch)


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("cfg", list(GEMM_CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_compiles(arch, cfg, bf16):
    assert _loader.compile_cubin("w4a4_gemm.cu", gemm_defines(cfg, bf16), arch)


@pytest.mark.parametrize("e4m3", [0, 1])
@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("cs", SM90_SPLITS)
@pytest.mark.parametrize("bn,wgc,ks", [(bn, *shape) for bn in SM90_ALL_WIDTHS for shape in sm90_shapes(bn)])
def test_sm90_gemm_compiles(bn, wgc, ks, cs, bf16, e4m3):
    """Every width x warpgroups x cluster split `gemm_plan.sm90_plan` can pick, for sm_90a (wgmma),
    with s8 or e4m3 groups (VLLM_ATOM_E4M3_MIN_M moves the cut to any width)."""
    cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc, ks), cs, ks, e4m3)
    assert cfg.smem_bytes <= 227 * 1024
    assert _loader.compile_cubin("w4a4_sm90.cu", cfg.defines() + (("DTYPE_BF16", bf16),), "sm_90a")


@pytest.mark.parametrize("cs", SM90_SPLITS)
@pytest.mark.parametrize("bn,wgc", [(bn, wgc) for bn in SM90_WIDTHS for wgc in sm90_pipe_wgcs(bn)])
def test_sm90_pipe_gemm_compiles(bn, wgc, cs):
    """The PIPE configs (two accumulator sets per warpgroup), bf16 output."""
    cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc), cs, pipe=1)
    assert _loader.compile_cubin("w4a4_sm90.cu", cfg.defines() + (("DTYPE_BF16", 1),), "sm_90a")


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("cs", SM90_SPLITS)
@pytest.mark.parametrize("bn,wgc", [(bn, wgc) for bn in SM90_ALL_WIDTHS for wgc, ks in sm90_shapes(bn) if ks == 1])
def test_sm90_lean_gemm_compiles(bn, wgc, cs, bf16):
    """The LEAN step loop (32-bit shared addresses, the outlier step peeled off; what the plan
    picks wherever ks = 1, s8, no PIPE), bf16 and fp16 output."""
    cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc), cs, lean=1)
    assert ("LEAN", 1) in cfg.defines()
    assert _loader.compile_cubin("w4a4_sm90.cu", cfg.defines() + (("DTYPE_BF16", bf16),), "sm_90a")


# the configs the decode table gives M = 1 (table entries of width 8, as the plan adjusts them), with QIN
QIN_CONFIGS = sorted({sm90_plan(1, n, k, k // 128, 132)[0]._replace(qin=1) for bn, n, k in SM90_TUNED if bn == 8})


@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("cfg", QIN_CONFIGS, ids=lambda c: f"{c.bn}-w{c.wgc}c{c.cs}k{c.ks}l{c.lean}")
def test_sm90_qin_gemm_compiles(cfg, bf16):
    """The one-launch Atom linear (QIN: the producer warpgroup quantizes x) on the decode table's
    configs, the four-warpgroup one (its producer registers raised from 24 to 56) among them."""
    assert ("QIN", 1) in cfg.defines()
    assert _loader.compile_cubin("w4a4_sm90.cu", cfg.defines() + (("DTYPE_BF16", bf16),), "sm_90a")


def test_qin_configs_cover_four_warpgroups():
    assert {c.wgc for c in QIN_CONFIGS} >= {1, 2, 3, 4} and any(c.ks == 2 for c in QIN_CONFIGS)


@pytest.mark.parametrize("threads", cuda_ops._ACT_BLOCKS)
@pytest.mark.parametrize("e4m3", [0, 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_act_quant_sm90_layout_compiles(arch, e4m3, threads):
    e4m3_define = (("E4M3", 1),) if e4m3 else ()  # (as cuda_ops._act_defines spells them: the cache key)
    assert _loader.compile_cubin("act_quant.cu", (("DTYPE_BF16", 1), ("SM90_LAYOUT", 1)) + e4m3_define + threads, arch)


def test_compile_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "bad.cu").write_text("extern \"C\" __global__ void k() { undefined_thing(); }\n")
    monkeypatch.setattr(_loader, "CUDA_DIR", tmp_path)
    with pytest.raises(_loader.KernelCompileError, match="undefined_thing"):
        _loader.compile_cubin.__wrapped__("bad.cu", (), "sm_90")


@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("bf16", [1, 0])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_int4_compiles(arch, head_dim, bf16, rotate_k):
    dtype = torch.bfloat16 if bf16 else torch.float16
    assert _loader.compile_cubin("kv_int4.cu", kv_int4._defines(head_dim, dtype, rotate_k), arch)


def test_wgmma_rate_probe_compiles(tmp_path, monkeypatch):
    """examples/benchmarks/wgmma_rate.py's generated kernels (s8 / e4m3, RS / SS) compile for sm_90a."""
    import shutil
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    sys.modules.pop("wgmma_rate", None)
    wr = pytest.importorskip("wgmma_rate")
    for h in ("sm90.cuh", "common.cuh"):
        shutil.copy(_loader.CUDA_DIR / h, tmp_path / h)
    monkeypatch.setattr(_loader, "CUDA_DIR", tmp_path)
    for kind in ("s8", "e4m3"):
        for form in ("rs", "ss"):
            (tmp_path / f"rate_{kind}_{form}.cu").write_text(wr.source(kind, form))
            assert _loader.compile_cubin.__wrapped__(f"rate_{kind}_{form}.cu", (("WGS", 2), ("INFLIGHT", 2)), "sm_90a")
