"""The fusion pass (`vllm_atom.serve.fusion`) on CPU: graphs built by torch.compile with AOTAutograd
and Inductor's decompositions (the post-grad form the pass sees inside vLLM, token dim dynamic),
vLLM's own IR norm ops and SiluAndMul.forward_native, the ops' pure-torch CPU implementations. The
fused graph must equal, bit for bit, the same producers computed as the fused kernels do followed by
the unfused quantization and GEMM (so every input, output and residual is wired right), and each
producer / consumer form must be matched or left alone as documented. That the fused kernels round
as vLLM's compiled graph does is checked on the GPU (tests/gpu/test_vllm_e2e.py)."""

import types

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._inductor.decomposition import select_decomp_table

pytest.importorskip("vllm")
import vllm.ir.ops as ir  # noqa: E402
from vllm.model_executor.layers.activation import SiluAndMul  # noqa: E402

from vllm_atom.kernels import layout, ops  # noqa: E402
from vllm_atom.serve import fusion  # noqa: E402

O, CLIP = 128, 0.9


def _weights(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    kn = k - O
    qw = torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, generator=g)
    ws = (torch.rand(n, kn // 128, generator=g) * 0.01 + 1e-3).half()
    wo = torch.randint(-127, 128, (n, O), dtype=torch.int8, generator=g)
    wos = (torch.rand(n, 1, generator=g) * 0.01 + 1e-3).half()
    reorder = torch.randperm(k, generator=g).to(torch.int32)
    return dict(wpack=layout.prepack_sm90(qw, ws, wo, wos), packed=(qw, ws, wo, wos), reorder=reorder, n=n)


K, I = 256, 384
W = {"qkv": _weights(K, 512, 1), "gate_up": _weights(K, 2 * I, 2), "down": _weights(I, K, 3)}


def linear(x, name, sm90, composed=False):
    """The Atom linear op, or (``composed``) quantize_act + the GEMM op: what the fused graph runs,
    with the quantization unfused (the linear op's CPU reference folds in another order)."""
    w = W[name]
    if composed:
        qa, sa = torch.ops.vllm_atom.quantize_act(x, w["reorder"], O, CLIP, sm90)
        if sm90:
            return torch.ops.vllm_atom.w4a4_gemm_sm90(qa, sa, w["wpack"], None, w["n"], x.dtype)
        return torch.ops.vllm_atom.w4a4_gemm(qa, sa, *w["packed"], None, x.dtype)
    if sm90:
        return torch.ops.vllm_atom.atom_linear_sm90(x, w["wpack"], w["reorder"], None, w["n"], O, CLIP)
    return torch.ops.vllm_atom.atom_linear(x, *w["packed"], w["reorder"], None, CLIP)


def block(h, r, n1, n2, sm90=True, composed=False):
    """A decoder layer's linears as vLLM's Llama runs them (attention left out). ``composed``: the
    expected result of the fused graph, with the producers as the fused kernels compute them
    (`ops.rms_norm` etc.: vLLM's compiled numerics, one rounding) and the quantization unfused."""
    fadd, norm, act = ((ops.fused_add_rms_norm, ops.rms_norm, ops.silu_mul) if composed
                       else (ir.fused_add_rms_norm, ir.rms_norm, SiluAndMul.forward_native))
    x, r = fadd(h, r, n1, 1e-5)
    qkv = linear(x, "qkv", sm90, composed)
    x2, r = fadd(qkv[:, :K], r, n2, 1e-5)
    down = linear(act(linear(x2, "gate_up", sm90, composed)), "down", sm90, composed)
    first = linear(norm(down, n1, 1e-6), "qkv", sm90, composed)  # a first layer's norm: no residual
    return first, r


def compiled(fn, decompose=True):
    """fn through Dynamo + AOTAutograd (+ Inductor's decompositions), the fusion pass run on the
    forward graph as vLLM's pass manager would; returns (compiled fn, the graphs after the pass)."""
    graphs = []

    def backend(gm, example_inputs):
        def fw(g, _):
            fusion.AtomFusionPass()(g.graph)
            g.recompile()
            graphs.append(g.graph)
            return g

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw,
                                     decompositions=select_decomp_table() if decompose else None)

    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), graphs


def inputs(m, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, r = (torch.randn(m, K, generator=g).to(dtype) for _ in range(2))
    n1, n2 = ((1 + 0.2 * torch.randn(K, generator=g)).to(dtype) for _ in range(2))
    torch._dynamo.mark_dynamic(h, 0)
    torch._dynamo.mark_dynamic(r, 0)
    return h, r, n1, n2


def targets(graph):
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("decompose", [True, False], ids=["inductor-decomp", "aten-silu"])
@pytest.mark.parametrize("sm90", [True, False], ids=["sm90", "mma"])
def test_block_fused_and_bit_identical(sm90, decompose):
    fusion.REPLACED.clear()
    fn, graphs = compiled(lambda *a: block(*a, sm90=sm90), decompose)
    for m in (5, 9, 17):  # one graph for every token count (dynamic dim)
        args = inputs(m, seed=m)
        got, want = fn(*args), block(*args, sm90=sm90, composed=True)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert len(graphs) == 1
    assert fusion.REPLACED == {"fused_add_rms_norm": 2, "silu_mul": 1, "rms_norm": 1, "unfused": 0}
    t = targets(graphs[0])
    gemm = torch.ops.vllm_atom.w4a4_gemm_sm90.default if sm90 else torch.ops.vllm_atom.w4a4_gemm.default
    assert t.count(gemm) == 4
    assert not {torch.ops.vllm_atom.atom_linear_sm90.default, torch.ops.vllm_atom.atom_linear.default,
                torch.ops.vllm_ir.rms_norm.default, torch.ops.vllm_ir.fused_add_rms_norm.default,
                torch.ops.aten.exp.default, torch.ops.aten.silu.default} & set(t)


def test_shared_or_unusual_producers_are_left_alone():
    """A norm output used twice, a norm weight in fp32, a norm over part of the row, and a SiLU of
    a slice that is not the first half: each still one quantize inside atom_linear, same result."""

    def fn(h, r, n1, n2):
        x = ir.rms_norm(h, n1, 1e-6)
        a = linear(x, "qkv", True) + 0 * x.sum()  # x has a second user
        b = linear(ir.rms_norm(h, n2.float(), 1e-6), "qkv", True)
        c = linear(ir.rms_norm(h, n1, 1e-6, 128), "qkv", True)
        gu = torch.cat([h, h, h], 1)  # [M, 2I]
        d = linear(torch.nn.functional.silu(gu[:, 1:I + 1]) * gu[:, I:], "down", True)
        return a, b, c, d

    fusion.REPLACED.clear()
    cfn, graphs = compiled(fn)
    args = inputs(6)
    for a, b in zip(cfn(*args), fn(*args)):
        assert torch.equal(a, b)
    assert fusion.REPLACED["unfused"] == 4 and sum(fusion.REPLACED.values()) == 4
    assert targets(graphs[0]).count(torch.ops.vllm_atom.atom_linear_sm90.default) == 4


def _config(mode=None, backend="inductor", **icc):
    from vllm.config.compilation import CompilationMode

    cc = types.SimpleNamespace(mode=CompilationMode.VLLM_COMPILE if mode is None else mode, backend=backend,
                               inductor_compile_config=dict(icc))
    return types.SimpleNamespace(compilation_config=cc)


def test_install(monkeypatch):
    from vllm.config.compilation import CompilationMode

    cfg = _config()
    assert fusion.install(cfg) and fusion.install(cfg)
    assert isinstance(cfg.compilation_config.inductor_compile_config[fusion.PASS_KEY], fusion.AtomFusionPass)
    assert not fusion.install(_config(CompilationMode.NONE))       # --enforce-eager: nothing compiled
    assert not fusion.install(_config(backend="eager"))
    assert not fusion.install(None)
    from vllm.compilation.passes.inductor_pass import CallableInductorPass

    other = CallableInductorPass(lambda graph: None, uuid="user")
    cfg = _config(**{fusion.PASS_KEY: other})
    assert not fusion.install(cfg) and cfg.compilation_config.inductor_compile_config[fusion.PASS_KEY] is other
    monkeypatch.setenv(fusion.FUSION_ENV, "0")
    assert not fusion.install(_config())
