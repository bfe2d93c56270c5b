"""CUDA kernels against `vllm_atom.reference` (run on the GPU machine; skipped without CUDA).

Activation quantization must reproduce the reference integers and scales bit for bit. The GEMM
must match `reference.w4a4_linear_exact` up to fp32 rounding: its integer dot products are
exact, and each group term isum*sa*sw is formed with two roundings (the reference's too) and
added with one, in a possibly different order (split-K): the standard bound for summing
`steps` terms, (steps + 2*2 + splits) * 2^-24 * sum|terms|, plus one rounding of the output
dtype (2^-8 relative for bf16, 2^-11 for fp16; we allow a full ulp).
Every output is poisoned (its memory pre-filled with two different garbage patterns) before
a run; inputs are fresh random data with injected outlier channels.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.config import AtomConfig
from vllm_atom.kernels import cuda_ops, layout, ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

M_LIST = [1, 2, 3, 7, 16, 33, 128, 255, 1024, 4097]
# (N, K) of real layers (qkv, o, gate_up, down) plus awkward ones.
SHAPES = {
    "smollm2-qkv": (960, 576), "smollm2-gate_up": (3072, 576), "smollm2-down": (576, 1536),
    "qwen2.5-1.5b-qkv": (2048, 1536), "qwen2.5-1.5b-down": (1536, 8960),
    "llama2-7b-o": (4096, 4096), "llama2-7b-gate_up": (22016, 4096), "llama2-7b-down": (4096, 11008),
    "llama3-8b-qkv": (6144, 4096), "llama3-8b-down": (4096, 14336),
    "llama2-70b-qkv": (10240, 8192), "llama2-70b-down": (8192, 28672),
    "odd-144": (8, 144), "odd-no-outliers": (136, 256), "odd-432": (200, 432), "odd-640": (1000, 640),
}
ACT_K = sorted({k for _, k in SHAPES.values()})
CFG = AtomConfig()
DEV = "cuda"


def outliers(k: int) -> int:
    return 0 if k == 256 else CFG.outliers_for(k)


def make_input(m: int, k: int, dtype=torch.bfloat16, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] ~ N(0, 1) with ~3% outlier channels scaled up 10-50x; reorder sorts channels
    by magnitude ascending (what calibration would do), so outliers land in the last slots."""
    x = torch.randn(m, k, device=DEV, generator=gen)
    hot = torch.randperm(k, device=DEV, generator=gen)[: max(1, k // 32)]
    x[:, hot] *= 10 + 40 * torch.rand(hot.numel(), device=DEV, generator=gen)
    mag = x.abs().mean(0) + 1e-3 * torch.rand(k, device=DEV, generator=gen)
    return x.to(dtype), mag.argsort().to(torch.int32)


def ref_quantize(x: torch.Tensor, reorder: torch.Tensor, n_outliers: int) -> R.QuantizedActivation:
    """The oracle, evaluated on the CPU: on CUDA, torch turns `t / 7.0` (a Python scalar divisor)
    into `t * (1/7)`, which is not the IEEE division the reference specifies."""
    a = R.quantize_activation(x.cpu(), reorder.cpu(), n_outliers, 128, CFG.a_clip)
    return R.QuantizedActivation(*(t.to(DEV) for t in a))


def make_weight(n: int, k: int, reorder: torch.Tensor, gen=None) -> R.QuantizedWeight:
    w = torch.randn(n, k, device=DEV, generator=gen) / math.sqrt(k)
    return R.quantize_weight(w, reorder, outliers(k), 128, CFG.w_clip)


def poison(shapes_dtypes, value: int) -> None:
    """Fill freed blocks of the sizes about to be allocated with byte ``value``."""
    bufs = [torch.full((s,), 0, dtype=torch.uint8, device=DEV) for s in
            (math.prod(sh) * torch.empty((), dtype=dt).element_size() for sh, dt in shapes_dtypes)]
    for b in bufs:
        b.fill_(value)
    del bufs


def exact_gemm(a: R.QuantizedActivation, w: R.QuantizedWeight, bias, out_dtype, absolute=False):
    """fp32 acc of reference.w4a4_linear_exact (fp32 matmuls are exact: integer sums < 2^24).
    With ``absolute``, the same sum over |terms| (for the error bound)."""
    f = (lambda t: t.abs()) if absolute else (lambda t: t)
    qa, qw, sw = f(a.q.float()), f(w.q.float()), w.scale.float()
    acc = torch.zeros(a.q.shape[0], w.q.shape[0], device=DEV)
    for j in range(a.scale.shape[1]):
        sl = slice(128 * j, 128 * j + 128)
        acc += (qa[:, sl] @ qw[:, sl].T) * (a.scale[:, j, None] * sw[None, :, j])
    if a.q_outlier.shape[1]:
        isum = f(a.q_outlier.float()) @ f(w.q_outlier.float()).T
        acc += isum * (a.outlier_scale[:, None] * w.outlier_scale.float()[None, :])
    if bias is not None:
        acc += f(bias.float())
    return acc


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_exact_gemm_is_the_reference():
    x, idx = make_input(9, 576)
    w = make_weight(40, 576, idx)
    a = ref_quantize(x, idx, 64)
    bias = torch.randn(40, device=DEV)
    assert torch.equal(exact_gemm(a, w, bias, torch.float32), R.w4a4_linear_exact(a, w, bias, torch.float32))


def check_act(qa, sa, ref: R.QuantizedActivation, k, o):
    want_qa, want_sa = layout.pack_activation(ref)
    assert torch.equal(qa, want_qa), f"{(qa != want_qa).sum().item()} of {qa.numel()} bytes differ"
    assert torch.equal(sa, want_sa), f"{(sa != want_sa).sum().item()} of {sa.numel()} scales differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", ACT_K)
@pytest.mark.parametrize("m", M_LIST)
def test_quantize_act_exact(m, k, dtype):
    o = outliers(k)
    x, idx = make_input(m, k, dtype)
    ref = ref_quantize(x, idx, o)
    _, ka, steps = layout.sizes(k, o)
    for value in (0xFF, 0x7F):
        poison([((m, ka), torch.int8), ((steps, m), torch.float32)], value)
        qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, o, CFG.a_clip)
        check_act(qa, sa, ref, k, o)


@pytest.mark.parametrize("case", ["ties", "tiny", "zeros"])
def test_quantize_act_edge_cases(case):
    """Exact half-integer quotients (round half to even), subnormal scales, all-zero rows."""
    m, k, o = 64, 1152, 128
    idx = torch.randperm(k, device=DEV).to(torch.int32)
    if case == "ties":  # a_clip 7/8 and amax 16 give scale 2; amax 254 gives outlier scale 2
        x = torch.randint(-16, 17, (m, k), device=DEV).float()
        x[:, idx[:-o].long()[::128]] = 16.0
        x[:, idx[-o:].long()] = torch.randint(-254, 255, (m, o), device=DEV).float()
        x[:, idx[-1].long()] = 254.0
        clip = 0.875
    elif case == "tiny":
        x, clip = torch.randn(m, k, device=DEV) * 1e-38, CFG.a_clip
    else:
        x, clip = torch.zeros(m, k, device=DEV), CFG.a_clip
    x = x.to(torch.bfloat16)
    a = R.quantize_activation(x.cpu(), idx.cpu(), o, 128, clip)
    want_qa, want_sa = layout.pack_activation(R.QuantizedActivation(*(t.to(DEV) for t in a)))
    qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, o, clip)
    assert torch.equal(qa, want_qa) and torch.equal(sa, want_sa)


@pytest.mark.parametrize("sm90", [False, True])
@pytest.mark.parametrize("m,k", [(1, 28672), (7, 28672), (33, 8192), (64, 11008), (64, 28672), (300, 28672)])
def test_quantize_act_block_sizes_agree(m, k, sm90, monkeypatch):
    """Every row split of cuda_ops.act_split (wide rows on fewer CTAs of 1024 threads, or the
    256-thread split at any size) writes the same bytes: the reference's."""
    if sm90 and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 layout needs sm_90")
    o = outliers(k)
    x, idx = make_input(m, k)
    ref = ref_quantize(x, idx, o)
    want = layout.pack_activation_sm90(ref) if sm90 else layout.pack_activation(ref)
    for cap in (None, 0, 1 << 20, 4 << 20):
        monkeypatch.setattr(cuda_ops, "ACT_STAGE_BYTES", cap)
        qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, o, CFG.a_clip, sm90)
        assert torch.equal(qa, want[0]), f"cap {cap}: {(qa != want[0]).sum().item()} bytes differ"
        if sm90:
            assert torch.equal(layout.sm90_entries(sa, m)[0], layout.sm90_entries(want[1], m)[0]), f"cap {cap}"
        else:
            assert torch.equal(sa, want[1]), f"cap {cap}"


def close_act(qa, sa, ref: R.QuantizedActivation, what: str):
    """Fused norm/activation: rsqrt/exp may differ from torch's by an ulp, which can move a
    16-bit input across a rounding boundary: allow a few integers off by one."""
    want_qa, want_sa = layout.pack_activation(ref)
    diff = (qa.int() - want_qa.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, f"{what}: {(diff > 0).sum().item()} differ"
    torch.testing.assert_close(sa, want_sa, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("k", [576, 1536, 4096, 8192])
@pytest.mark.parametrize("m", [1, 7, 33, 1024])
def test_rmsnorm_quantize_act(m, k):
    o = outliers(k)
    x, idx = make_input(m, k)
    nw = (1 + 0.2 * torch.randn(k, device=DEV)).to(x.dtype)
    qa, sa = torch.ops.vllm_atom.rmsnorm_quantize_act(x, nw, 1e-6, idx, o, CFG.a_clip)
    close_act(qa, sa, ref_quantize(ops.rms_norm(x, nw, 1e-6), idx, o), "rmsnorm")


@pytest.mark.parametrize("sm90", [False, True])
@pytest.mark.parametrize("k", [576, 1536, 4096, 8192])
@pytest.mark.parametrize("m", [1, 7, 33, 1024])
def test_fused_add_rmsnorm_quantize_act(m, k, sm90):
    """vLLM's fused add + RMSNorm, then quantization (the fusion pass's qkv / gate_up producer):
    the new residual bit for bit, the integers as the other fused producers."""
    if sm90 and not ops.use_sm90(torch.device(DEV)):
        pytest.skip("sm90 layout needs compute capability 9.0")
    o = outliers(k)
    x, idx = make_input(m, k)
    r = (3 * torch.randn(m, k, device=DEV)).to(x.dtype)
    nw = (1 + 0.2 * torch.randn(k, device=DEV)).to(x.dtype)
    qa, sa, res = torch.ops.vllm_atom.fused_add_rmsnorm_quantize_act(x, r, nw, 1e-5, idx, o, CFG.a_clip, sm90)
    y, want_res = ops.fused_add_rms_norm(x, r, nw, 1e-5)
    assert torch.equal(res, want_res)
    if sm90:  # compare in the mma.sync layout
        qa, sa = layout.pack_activation(layout.unpack_activation_sm90(qa, sa, k, o))
    close_act(qa, sa, ref_quantize(y, idx, o), "fused_add_rmsnorm")


@pytest.mark.parametrize("k", [1536, 8960, 11008, 28672])
@pytest.mark.parametrize("m", [1, 7, 33, 1024])
def test_silu_mul_quantize_act(m, k):
    o = outliers(k)
    x, idx = make_input(m, 2 * k)
    x, idx = x, idx[idx < k].contiguous()
    qa, sa = torch.ops.vllm_atom.silu_mul_quantize_act(x, idx, o, CFG.a_clip)
    close_act(qa, sa, ref_quantize(ops.silu_mul(x), idx, o), "silu_mul")


def check_gemm(y, a, w, bias, steps, splits=32, extra=None):
    """y within the fold bound of the exact GEMM; ``extra``: [M, N] more fp32 rounding terms
    (2^-24 times their size is allowed on top: the e4m3 variant's C)."""
    ref = exact_gemm(a, w, bias, torch.float32)
    bound = exact_gemm(a, w, bias, torch.float32, absolute=True)
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    ulp = 2.0 ** -7 if y.dtype == torch.bfloat16 else 2.0 ** -10
    err = (y.float() - ref).abs()
    tol = (steps + 4 + splits) * 2.0 ** -24 * bound + ulp * ref.abs() + 1e-30
    if extra is not None:
        tol = tol + 2.0 ** -24 * extra
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"
    return torch.equal(y, ref.to(y.dtype))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", M_LIST)
def test_atom_linear(m, shape):
    n, k = SHAPES[shape]
    o = outliers(k)
    gen = torch.Generator(device=DEV).manual_seed(1000 * m + n + k)
    x, idx = make_input(m, k, gen=gen)
    w = make_weight(n, k, idx, gen=gen)
    p = w.packed()
    bias = torch.randn(n, device=DEV, generator=gen).to(x.dtype) if n % 3 == 0 else None
    ops.prepare_atom_linear(p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"], idx, x.dtype)
    a = ref_quantize(x, idx, o)
    _, ka, steps = layout.sizes(k, o)
    splits = plan(m, n, k - o)[1]
    for value in (0xFF, 0x7F):
        poison([((m, ka), torch.int8), ((steps, m), torch.float32), ((m, n), x.dtype)]
               + ([((splits, m, n), torch.float32)] if splits > 1 else []), value)
        y = torch.ops.vllm_atom.atom_linear(x, p["qweight"], p["w_scale"], p["w_outlier"],
                                            p["w_outlier_scale"], idx, bias, CFG.a_clip)
        check_gemm(y, a, w, bias, steps, splits)


def plan(m, n, kn):
    from vllm_atom.kernels import cuda_ops

    return cuda_ops.gemm_plan(m, n, kn // 128, torch.cuda.get_device_properties(0).multi_processor_count)


@pytest.mark.parametrize("m", [1, 16, 33, 300, 2000])
def test_w4a4_gemm_fp16(m):
    n, k = 1000, 640
    x, idx = make_input(m, k, torch.float16)
    w = make_weight(n, k, idx)
    p = w.packed()
    qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, 128, CFG.a_clip)
    bias = torch.randn(n, device=DEV).half()
    y = torch.ops.vllm_atom.w4a4_gemm(qa, sa, p["qweight"], p["w_scale"], p["w_outlier"],
                                      p["w_outlier_scale"], bias, torch.float16)
    a = layout.unpack_activation(qa, sa, k, 128)
    check_gemm(y, a, w, bias, 5)


@pytest.mark.parametrize("m,shape", [(1, "llama2-7b-o"), (16, "llama3-8b-down"), (33, "qwen2.5-1.5b-qkv"),
                                     (300, "smollm2-gate_up")])
def test_cuda_graph_replay(m, shape):
    n, k = SHAPES[shape]
    x, idx = make_input(m, k)
    p = make_weight(n, k, idx).packed()
    args = (p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"], idx, None, CFG.a_clip)
    ops.prepare_atom_linear(*args[:5], x.dtype)
    check_graph_replay(lambda x: torch.ops.vllm_atom.atom_linear(x, *args), x, lambda: make_input(m, k)[0])


def check_graph_replay(fn, x, new_input) -> None:
    """fn captured in a CUDA graph on a static copy of x gives, on replay over fresh inputs, what
    an eager call gives."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = fn(static_x)
    for _ in range(3):
        x2 = new_input()
        static_x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, fn(x2))


def test_torch_compile_fullgraph():
    n, k = 2048, 1536
    x, idx = make_input(7, k)
    p = make_weight(n, k, idx).packed()

    def f(x):
        y = torch.ops.vllm_atom.atom_linear(x, p["qweight"], p["w_scale"], p["w_outlier"],
                                            p["w_outlier_scale"], idx, None, CFG.a_clip)
        return y * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (7, 19):
        xm, _ = make_input(m, k)
        assert torch.equal(cf(xm), f(xm))


def test_opcheck():
    x, idx = make_input(5, 576)
    p = make_weight(64, 576, idx).packed()
    torch.library.opcheck(torch.ops.vllm_atom.atom_linear.default,
                          (x, p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"], idx, None, 0.9),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.vllm_atom.quantize_act.default, (x, idx, 64, 0.9),
                          test_utils=("test_schema", "test_faketensor"))


def test_unsupported_shapes_raise_value_error():
    x, idx = make_input(4, 576)
    p = make_weight(64, 576, idx).packed()
    with pytest.raises(ValueError):
        ops.prepare_atom_linear(p["qweight"][:60], p["w_scale"][:60], p["w_outlier"][:60],
                                p["w_outlier_scale"][:60], idx, torch.bfloat16)  # N % 8
    with pytest.raises(ValueError):
        torch.ops.vllm_atom.quantize_act(x.float(), idx, 64, 0.9)
