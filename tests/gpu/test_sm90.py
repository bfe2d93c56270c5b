"""The wgmma GEMM (`cuda/w4a4_sm90.cu`) and the sm90 activation layout against the reference
(run on an H100/H200; skipped elsewhere).

Same oracle and bound as test_kernels.py: activation integers and scales bit for bit
(`layout.pack_activation_sm90` of `reference.quantize_activation`); the GEMM within
(steps + 4 + splits) * 2^-24 * sum|terms| plus one rounding of the output dtype of
`reference.w4a4_linear_exact`, over the real layer shapes, odd M, every cluster split,
poisoned outputs, graph replay and torch.compile. The e4m3 variant (M >= SM90_E4M3_MIN_M, or
forced to any M here) gets 2^-24 * sum_g |8 X_g sa sw| more (its C term); its sums must be exact,
which extreme integers test (a 1-unit error would be ~100x the bound).
"""

from __future__ import annotations

import pytest
import torch

from test_kernels import (CFG, DEV, SHAPES, check_gemm, check_graph_replay, make_input, make_weight, outliers, poison,
                          ref_quantize)
from vllm_atom import reference as R
from vllm_atom.kernels import gemm_plan, layout, ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                 reason="needs an sm_90 GPU")]

M_LIST = [1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33, 64, 65, 127, 128, 255, 256, 1024, 4097]
# the TP=2 shards (row_shards 2) of Llama-2-7B o / down and of a 64-outlier K
SHARD_SHAPES = {"llama2-7b-o/2": (4096, 2048), "llama2-7b-down/2": (4096, 5504), "k576-64-outliers": (384, 576)}
ALL_SHAPES = {**SHAPES, **SHARD_SHAPES}


def e4m3_extra(a, w):
    """[M, N] sum over groups of |8 X_g sa_g sw_g| (X_g the group's integer sum) for the e4m3 fold."""
    x = a.q.float().unflatten(1, (-1, 128)).sum(2).abs()  # [M, G]
    return 8 * (x * a.scale.float()) @ w.scale.float().abs().T


def check90(y, a, w, bias, steps, splits):
    """check_gemm with the e4m3 term where the rule picks e4m3 for this M."""
    return check_gemm(y, a, w, bias, steps, splits, e4m3_extra(a, w) if gemm_plan.sm90_e4m3(y.shape[0]) else None)


@pytest.fixture(params=["default", "e4m3"])
def variant(request, monkeypatch):
    """default: the rule as shipped; e4m3: forced for every M."""
    if request.param == "e4m3":
        monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", 0)
    return request.param


def prepacked(w):
    p = w.packed()
    return layout.prepack_sm90(p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", sorted({k for _, k in ALL_SHAPES.values()}))
@pytest.mark.parametrize("m", [1, 7, 33, 1024])
def test_quantize_act_sm90_exact(m, k, dtype, variant):
    o = outliers(k)
    x, idx = make_input(m, k, dtype)
    want_qa, want_sa = layout.pack_activation_sm90(ref_quantize(x, idx, o))
    _, _, steps = layout.sizes(k, o)
    for value in (0xFF, 0x7F):
        poison([((steps, m, 128), torch.int8), ((steps, 2 * layout.padded_tokens(m)), torch.float32)], value)
        qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, o, CFG.a_clip, True)
        assert torch.equal(qa, want_qa), f"{(qa != want_qa).sum().item()} of {qa.numel()} bytes differ"
        got, want = layout.sm90_entries(sa, m), layout.sm90_entries(want_sa, m)
        assert torch.equal(got[0], want[0])
        if layout.sm90_e4m3(m):  # C is written for the e4m3 GEMM only
            assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("shape", list(ALL_SHAPES))
@pytest.mark.parametrize("m", M_LIST)
def test_atom_linear_sm90(m, shape, variant):
    n, k = ALL_SHAPES[shape]
    o = outliers(k)
    gen = torch.Generator(device=DEV).manual_seed(1000 * m + n + k)
    x, idx = make_input(m, k, gen=gen)
    w = make_weight(n, k, idx, gen=gen)
    wpack = prepacked(w)
    bias = torch.randn(n, device=DEV, generator=gen).to(x.dtype) if n % 3 == 0 else None
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    a = ref_quantize(x, idx, o)
    _, _, steps = layout.sizes(k, o)
    for value in (0xFF, 0x7F):
        poison([((m, n), x.dtype)], value)
        y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, bias, n, o, CFG.a_clip)
        check90(y, a, w, bias, steps, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(ALL_SHAPES))
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_qin_equals_two_launches(m, shape, dtype, monkeypatch):
    """QIN (M <= SM90_QIN_MAX_M: the GEMM's producer warpgroup quantizes x, one launch) gives the
    bits of the quantization launch + GEMM, poisoned outputs, and so the reference's bound."""
    n, k = ALL_SHAPES[shape]
    o = outliers(k)
    gen = torch.Generator(device=DEV).manual_seed(7 * m + n + k)
    x, idx = make_input(m, k, dtype, gen=gen)
    w = make_weight(n, k, idx, gen=gen)
    wpack = prepacked(w)
    bias = torch.randn(n, device=DEV, generator=gen).to(dtype) if n % 3 == 0 else None
    steps = layout.sizes(k, o)[2]
    two = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, bias, n, o, CFG.a_clip)
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 8)
    assert gemm_plan.sm90_qin(m)
    for value in (0xFF, 0x7F):
        poison([((m, n), dtype)], value)
        one = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, bias, n, o, CFG.a_clip)
        assert torch.equal(one, two), f"{(one != two).sum().item()} of {one.numel()} outputs differ"
    check90(one, ref_quantize(x, idx, o), w, bias, steps, 8)


@pytest.mark.parametrize("cs", gemm_plan.SM90_SPLITS)
@pytest.mark.parametrize("m,wgc,ks", [(m, *shape) for m in (1, 2) for shape in gemm_plan.sm90_shapes(8)])
def test_qin_every_cluster_split(m, wgc, ks, cs, monkeypatch):
    """QIN on every decode config (table entry forced): 1-4 consumer warpgroups, one or two per
    slab, the cluster split of 1-8 CTAs (each CTA's quantizing warps take its own K range)."""
    n, k = SHAPES["llama2-7b-down"]
    o = outliers(k)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    monkeypatch.setitem(gemm_plan.SM90_TUNED, (8, n, k), (wgc, cs, ks))
    two = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 2)
    one = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    assert torch.equal(one, two)
    check90(one, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], cs * ks)


@pytest.mark.parametrize("shape", ["llama2-7b-o", "llama3-8b-down"])
def test_cuda_graph_replay_qin(shape, monkeypatch):
    monkeypatch.setattr(gemm_plan, "SM90_QIN_MAX_M", 1)
    n, k = SHAPES[shape]
    o = outliers(k)
    x, idx = make_input(1, k)
    wpack = prepacked(make_weight(n, k, idx))
    args = (wpack, idx, None, n, o, CFG.a_clip)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    check_graph_replay(lambda x: torch.ops.vllm_atom.atom_linear_sm90(x, *args), x, lambda: make_input(1, k)[0])


@pytest.mark.parametrize("signs", ["same", "opposite", "random"])
@pytest.mark.parametrize("m", [1, 8, 200])
def test_e4m3_extreme_integers_sum_exactly(m, signs, monkeypatch):
    """Every activation integer -8 and every weight 7 (u = w + 8 = 15: the largest e4m3 group sum,
    128 * 15 * 8 = 15,360 units of 2^-9), or weights -8 (u = 0, the products' offset alone), or
    random signs at full magnitude, through both variants: the same result within the bound."""
    n, k = 256, 1152
    o = outliers(k)
    idx = torch.arange(k, device=DEV, dtype=torch.int32)
    gen = torch.Generator(device=DEV).manual_seed(m)
    x = -torch.ones(m, k, device=DEV)
    wt = torch.ones(n, k, device=DEV)
    if signs == "opposite":
        wt = -wt
    elif signs == "random":
        x = x * torch.randint(0, 2, (m, k), device=DEV, generator=gen).mul(2).sub(1)
        wt = wt * torch.randint(0, 2, (n, k), device=DEV, generator=gen).mul(2).sub(1)
    w = R.quantize_weight(wt * torch.rand(n, 1, device=DEV, generator=gen), idx, o, 128, CFG.w_clip)
    x = (x * (1 + torch.rand(m, 1, device=DEV, generator=gen))).to(torch.bfloat16)
    a = ref_quantize(x, idx, o)
    assert a.q.abs().max() == 8 and w.q.abs().max() >= 7
    wpack = prepacked(w)
    steps = layout.sizes(k, o)[2]
    for cut in (0, gemm_plan.SM90_E4M3_OFF):
        monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", cut)
        ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
        y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
        check90(y, a, w, None, steps, 8)


@pytest.mark.parametrize("cs", gemm_plan.SM90_SPLITS)
@pytest.mark.parametrize("m,wgc,ks", [(m, *shape) for m in (1, 16, 33, 64, 200)
                                      for shape in gemm_plan.sm90_shapes(gemm_plan.sm90_width(m))])
def test_every_cluster_split(m, wgc, ks, cs, monkeypatch, variant):
    """The config is a table entry: force each (warpgroups, split, warpgroups per slab): the DSMEM
    reduction of 1, 2, 4, 8 partials, tiles of 64 to 256 rows (N = 4096 is 64 slabs: with 3
    warpgroups the last tile holds one slab), two warpgroups per slab adding their halves."""
    n, k = SHAPES["llama2-7b-down"]
    o = outliers(k)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    monkeypatch.setitem(gemm_plan.SM90_TUNED, (gemm_plan.sm90_width(m), n, k), (wgc, cs, ks))
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], cs * ks)


@pytest.mark.parametrize("cs", gemm_plan.SM90_SPLITS)
@pytest.mark.parametrize("m,wgc", [(m, wgc) for m in (1, 16, 33, 64)
                                   for wgc in gemm_plan.sm90_pipe_wgcs(gemm_plan.sm90_width(m))])
def test_pipe_configs(m, wgc, cs, monkeypatch, variant):
    """PIPE (two accumulator sets, a step's MMAs in flight while the one before is folded) for
    every warpgroup count and cluster split it compiles for: the same sums as without it."""
    n, k = SHAPES["llama2-7b-down"]
    o = outliers(k)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    monkeypatch.setitem(gemm_plan.SM90_TUNED, (gemm_plan.sm90_width(m), n, k), (wgc, cs, 1, 1))
    assert gemm_plan.sm90_plan(m, n, k, layout.sizes(k, o)[2], 132)[0].pipe == int(variant != "e4m3")
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], cs)


@pytest.mark.parametrize("m", [129, 1100])
@pytest.mark.parametrize("shape", ["llama2-7b-o", "odd-144", "qwen2.5-1.5b-down"])
@pytest.mark.parametrize("tile", [(96, 3), (64, 4)])
def test_large_tiles_at_large_m(m, shape, tile, monkeypatch, variant):
    """The large-M rule's tiles (96 tokens x 192 rows, and v3.8's 64 x 256 that
    VLLM_ATOM_SM90_LARGE_TILE=64x4 gives), forced from M = 1: partial last tiles in both directions
    (odd-144: N = 8, a part of one slab of three or four)."""
    monkeypatch.setattr(gemm_plan, "SM90_LARGE_MIN_M", 1)
    monkeypatch.setattr(gemm_plan, "SM90_LARGE_TILE", tile)
    monkeypatch.setattr(gemm_plan, "SM90_MID_TUNED", {})  # (the mid-size entries come first)
    n, k = SHAPES[shape]
    o = outliers(k)
    assert gemm_plan.sm90_plan(m, n, k, layout.sizes(k, o)[2], 132)[0][:2] == tile
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], 1)


@pytest.mark.parametrize("cs", (1, 2, 4))
@pytest.mark.parametrize("m,bn,wgc,ks", [(m, bn, *shape) for m in (100, 256, 777) for bn in (64, 96)
                                         for shape in gemm_plan.sm90_shapes(bn)])
def test_mid_table_tiles(m, bn, wgc, ks, cs, monkeypatch, variant):
    """An SM90_MID_TUNED entry: 64- or 96-token tiles at mid sizes (two to thirteen of them, the
    last one partial at M = 100 and 777) with every warpgroup shape and cluster split of the width
    (96 x 192-row tiles on N = 4096: the last tile one slab of three)."""
    n, k = SHAPES["llama2-7b-down"]
    o = outliers(k)
    monkeypatch.setitem(gemm_plan.SM90_MID_TUNED, (gemm_plan.sm90_mid_bucket(m), n, k), (bn, wgc, cs, ks))
    assert gemm_plan.sm90_plan(m, n, k, layout.sizes(k, o)[2], 132)[0][:2] == (bn, wgc)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], cs * ks)


@pytest.mark.parametrize("m", [2049, 4100])
@pytest.mark.parametrize("shape", ["llama2-7b-o", "odd-144", "qwen2.5-1.5b-down"])
def test_tile_width_96_at_large_m(m, shape, monkeypatch):
    """96-token x 192-row tiles as `bench_gemm.py --sweep-width 96` runs them at large M (the
    width forced, a table entry of three warpgroups): partial last tiles both ways."""
    n, k = SHAPES[shape]
    o = outliers(k)
    monkeypatch.setattr(gemm_plan, "sm90_width", lambda _m: 96)
    monkeypatch.setitem(gemm_plan.SM90_TUNED, (96, n, k), (3, 1))
    assert gemm_plan.sm90_plan(m, n, k, layout.sizes(k, o)[2], 132)[0][:2] == (96, 3)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], 1)


@pytest.mark.parametrize("shape", ["odd-144", "smollm2-qkv", "odd-no-outliers"])
@pytest.mark.parametrize("m,cfg", [(m, cfg) for m in (1, 9) for cfg in [(2, 1, 2), (2, 2, 2), (4, 2, 2), (4, 8, 2)]]
                         + [(m, cfg) for m in (1, 40) for cfg in [(1, 1, 1, 1), (2, 2, 1, 1), (2, 8, 1, 1)]])
def test_few_steps_per_rank(m, shape, cfg, monkeypatch, variant):
    """A cluster rank with few steps (K = 144, 256, 576: 2 to 5 steps): two warpgroups per slab
    (wgc, cs, 2) when a rank has one step or none for its second half; PIPE (wgc, cs, 1, 1) when
    a rank has no step, one (only the drain) or two."""
    n, k = SHAPES[shape]
    o = outliers(k)
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    monkeypatch.setitem(gemm_plan.SM90_TUNED, (gemm_plan.sm90_width(m), n, k), cfg)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, layout.sizes(k, o)[2], cfg[1] * cfg[2])


@pytest.mark.parametrize("shape", ["llama2-7b-down", "odd-144", "odd-no-outliers"])
@pytest.mark.parametrize("m,cfg", [(1, (1, 1)), (1, (2, 8)), (9, (4, 2)), (33, (3, 1)), (64, (2, 4)), (300, (2, 1)),
                                   (1100, "large")])
@pytest.mark.parametrize("lean", [1, 0])
def test_lean_configs(m, cfg, shape, lean, monkeypatch):
    """The LEAN step loop (the default: shared addresses in registers, the outlier step peeled off
    the loop) and the loop it replaced (VLLM_ATOM_SM90_LEAN=0) on table picks (wgc, cs) and the
    large-M rule's tiles: the same sums, also for short K (one group and the outlier block; two groups
    and none)."""
    monkeypatch.setattr(gemm_plan, "SM90_LEAN", lean)
    n, k = SHAPES[shape]
    o = outliers(k)
    steps = layout.sizes(k, o)[2]
    if cfg == "large":
        monkeypatch.setattr(gemm_plan, "SM90_LARGE_MIN_M", 1)
    else:
        monkeypatch.setitem(gemm_plan.SM90_TUNED, (gemm_plan.sm90_width(m), n, k), cfg)
    plan = gemm_plan.sm90_plan(m, n, k, steps, 132)[0]
    assert plan.lean == lean
    x, idx = make_input(m, k)
    w = make_weight(n, k, idx)
    wpack = prepacked(w)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    y = torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, o, CFG.a_clip)
    check90(y, ref_quantize(x, idx, o), w, None, steps, plan.cs)


@pytest.mark.parametrize("m", [1, 16, 33, 300, 2000])
def test_w4a4_gemm_sm90_fp16_bias(m, variant):
    n, k = 1000, 640
    x, idx = make_input(m, k, torch.float16)
    w = make_weight(n, k, idx)
    qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, 128, CFG.a_clip, True)
    bias = torch.randn(n, device=DEV).half()
    y = torch.ops.vllm_atom.w4a4_gemm_sm90(qa, sa, prepacked(w), bias, n, torch.float16)
    check90(y, layout.unpack_activation_sm90(qa, sa, k, 128), w, bias, 5, 8)


def test_same_result_as_mma_kernel_up_to_rounding():
    """Both kernels fold the same terms in the same order: they agree but for split order."""
    n, k = SHAPES["llama3-8b-qkv"]
    o = outliers(k)
    x, idx = make_input(300, k)
    w = make_weight(n, k, idx)
    p = w.packed()
    y90 = torch.ops.vllm_atom.atom_linear_sm90(x, prepacked(w), idx, None, n, o, CFG.a_clip)
    y80 = torch.ops.vllm_atom.atom_linear(x, p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"],
                                          idx, None, CFG.a_clip)
    assert (y90.float() - y80.float()).abs().max() <= 2 ** -6 * y80.float().abs().max()


@pytest.mark.parametrize("m,shape", [(1, "llama2-7b-o"), (16, "llama3-8b-down"), (33, "qwen2.5-1.5b-qkv"),
                                     (300, "smollm2-gate_up"), (1024, "llama2-7b-o")])
def test_cuda_graph_replay_sm90(m, shape, variant):
    n, k = SHAPES[shape]
    o = outliers(k)
    x, idx = make_input(m, k)
    wpack = prepacked(make_weight(n, k, idx))
    args = (wpack, idx, None, n, o, CFG.a_clip)
    ops.prepare_atom_linear_sm90(wpack, n, idx, x.dtype)
    check_graph_replay(lambda x: torch.ops.vllm_atom.atom_linear_sm90(x, *args), x, lambda: make_input(m, k)[0])


@pytest.mark.parametrize("cut", [gemm_plan.SM90_E4M3_OFF, 129])
def test_torch_compile_fullgraph_sm90(cut, monkeypatch):
    """Dynamic M through one compiled graph, with the e4m3 cut off and inside the M range."""
    monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", cut)
    n, k = 2048, 1536
    x, idx = make_input(7, k)
    wpack = prepacked(make_weight(n, k, idx))

    def f(x):
        return torch.ops.vllm_atom.atom_linear_sm90(x, wpack, idx, None, n, 128, CFG.a_clip) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for m in (7, 19, 300, 129):  # (both sides of the e4m3 cut)
        xm, _ = make_input(m, k)
        assert torch.equal(cf(xm), f(xm))


def test_opcheck_sm90():
    x, idx = make_input(5, 576)
    wpack = prepacked(make_weight(64, 576, idx))
    torch.library.opcheck(torch.ops.vllm_atom.atom_linear_sm90.default, (x, wpack, idx, None, 64, 64, 0.9),
                          test_utils=("test_schema", "test_faketensor"))
    qa, sa = torch.ops.vllm_atom.quantize_act(x, idx, 64, 0.9, True)
    torch.library.opcheck(torch.ops.vllm_atom.w4a4_gemm_sm90.default, (qa, sa, wpack, None, 64, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))


def test_malformed_wpack_raises_value_error():
    x, idx = make_input(4, 576)
    wpack = prepacked(make_weight(64, 576, idx))
    with pytest.raises(ValueError, match="slab"):
        ops.prepare_atom_linear_sm90(wpack[:, :-16].contiguous(), 64, idx, torch.bfloat16)
    with pytest.raises(ValueError, match="N="):
        ops.prepare_atom_linear_sm90(wpack, 300, idx, torch.bfloat16)
