"""The GEMM dispatch table (`vllm_atom.kernels.gemm_plan`): every pick is a config the kernels
support (CPU only: no CUDA needed)."""

from __future__ import annotations

import math

import pytest

from vllm_atom.kernels import gemm_plan as gp

LAYERS = [(4096, 4096), (22016, 4096), (12288, 4096), (4096, 11008), (57344, 8192), (8192, 28672), (960, 576),
          (8, 144), (136, 256)]


@pytest.mark.parametrize("n,k", LAYERS)
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 33, 64, 65, 128, 129, 256, 1000, 4096, 8193])
def test_sm90_plan_is_valid(m, n, k):
    steps = (k - 128) // 128 + 1 if k > 256 else k // 128
    cfg, per_split = gp.sm90_plan(m, n, k, steps, 132)
    assert cfg.bn in gp.SM90_ALL_WIDTHS and cfg.cs in gp.SM90_SPLITS
    if m >= gp.SM90_LARGE_MIN_M and (gp.sm90_width(m), n, k) not in gp.SM90_TUNED:  # the large-M rule
        assert (cfg.bn, cfg.wgc) == gp.SM90_LARGE_TILE
    elif (gp.sm90_mid_bucket(m), n, k) in gp.SM90_MID_TUNED and (gp.sm90_width(m), n, k) not in gp.SM90_TUNED:
        assert cfg[:2] == gp.SM90_MID_TUNED[(gp.sm90_mid_bucket(m), n, k)][:2]  # a measured mid-size pick
    else:  # the narrowest width that holds M
        assert cfg.bn >= min(m, 128) and (cfg.bn == 8 or cfg.bn // 2 < m)
    assert cfg.rows % (2 * cfg.cs) == 0 and cfg.smem_bytes <= gp.SM90_SMEM
    assert per_split * cfg.cs >= steps and per_split * (cfg.cs - 1) < steps  # every rank has work
    assert cfg in gp.sm90_configs(n, k, steps, 132, max_m=max(m, 128))


def test_tuned_entry_wins(monkeypatch):
    monkeypatch.setitem(gp.SM90_TUNED, (8, 4096, 4096), (1, 8))
    cfg = gp.sm90_plan(1, 4096, 4096, 32, 132)[0]
    assert (cfg.wgc, cfg.cs) == (1, 8)
    assert gp.sm90_plan(1, 4096, 4096, 3, 132)[0].cs == 1  # never more splits than steps allow


def test_model_spreads_small_layers_over_the_gpu():
    # Llama-2-7B o_proj at M=1: 32 tiles of 128 rows alone leave 100 SMs idle
    cfg = gp.sm90_plan(1, 4096, 4096, 32, 132, {1: 132, 2: 132, 4: 120, 8: 120})[0]
    assert cfg.cs * 4096 // cfg.rows >= 64
    # a big GEMM needs no split
    assert gp.sm90_plan(8192, 57344, 8192, 64, 132)[0].cs == 1


def test_cluster_slots_limit_the_split():
    """With room for only 30 clusters of 4, 128 CTAs of size-4 clusters would take two waves."""
    slots = {1: 132, 2: 132, 4: 120, 8: 120}
    m, n, steps = 1, 4096, 32
    c4 = gp.Sm90Config(8, 2, gp.sm90_stages(8), 4)
    c2 = c4._replace(cs=2)
    assert gp.sm90_cost(m, n, steps, c4, slots[4]) > gp.sm90_cost(m, n, steps, c4, 132)
    assert gp.sm90_cost(m, n, steps, c2, slots[2]) > 0


def test_wide_tiles_come_from_the_table(monkeypatch):
    """Three and four warpgroups (192- and 256-row tiles) only where the sweep measured them."""
    assert gp.sm90_plan(1, 22016, 4096, 33, 132)[0].wgc == gp.SM90_TUNED[(8, 22016, 4096)][0] == 3
    monkeypatch.delitem(gp.SM90_TUNED, (8, 22016, 4096))
    assert gp.sm90_plan(1, 22016, 4096, 33, 132)[0].wgc <= 2
    assert all((v[0], (*v, 1)[2]) in gp.sm90_shapes(bn) for (bn, _, _), v in gp.SM90_TUNED.items())
    assert gp.sm90_wgcs(128) == (2,) and gp.sm90_wgcs(8) == (1, 2, 3, 4)


def test_two_warpgroups_per_slab(monkeypatch):
    """A table entry (wgc, cs, ks): ks = 2 halves the tile's rows and keeps the threads."""
    monkeypatch.setitem(gp.SM90_TUNED, (8, 4096, 4096), (4, 2, 2))
    cfg, per_split = gp.sm90_plan(1, 4096, 4096, 33, 132)
    assert (cfg.wgc, cfg.cs, cfg.ks, cfg.slabs, cfg.rows, cfg.threads) == (4, 2, 2, 2, 128, 640)
    assert ("KS", 2) in cfg.defines() and per_split == 17
    assert cfg.stage_bytes == gp.Sm90Config(8, 2, cfg.stages, 2).stage_bytes  # stages hold 2 slabs
    assert (2, 2) in gp.sm90_shapes(8) and (4, 2) in gp.sm90_shapes(32) and (4, 2) not in gp.sm90_shapes(64)
    assert gp.sm90_shapes(128) == ((2, 1),)


def test_mma_plan_unchanged():
    cfg, splits, per = gp.gemm_plan(1, 4096, 32, 132)
    assert cfg == "small" and splits * per >= 32 and math.ceil(32 / per) == splits


@pytest.mark.parametrize("n,k", sorted({(n, k) for _, n, k in gp.SM90_TUNED}))
def test_batch_invariant_mode_keeps_one_k_split(n, k, monkeypatch):
    """VLLM_ATOM_BATCH_INVARIANT: the sum order (cluster split, warpgroups per slab) is the same at
    every M, and each config is one the kernel compiles."""
    monkeypatch.setattr(gp, "BATCH_INVARIANT", True)
    steps = k // 128 + 1
    cfgs = [gp.sm90_plan(m, n, k, steps, 132)[0] for m in (1, 7, 16, 33, 64, 100, 128, 300, 1024, 8192)]
    assert {(c.cs, c.ks) for c in cfgs} == {(cfgs[0].cs, 1)}
    assert all((c.wgc, c.ks) in gp.sm90_shapes(c.bn) and c.smem_bytes <= gp.SM90_SMEM for c in cfgs)


def test_pipe_entries(monkeypatch):
    """A 4-tuple table entry (wgc, cs, ks, pipe) turns on PIPE (a define only when on, so the other
    configs keep their kernel-cache keys); e4m3 steps drop it; candidates list it only when asked."""
    monkeypatch.setitem(gp.SM90_TUNED, (64, 4096, 4096), (2, 1, 1, 1))
    cfg = gp.sm90_plan(64, 4096, 4096, 33, 132)[0]
    assert (cfg.bn, cfg.wgc, cfg.cs, cfg.ks, cfg.pipe) == (64, 2, 1, 1, 1) and ("PIPE", 1) in cfg.defines()
    assert all(name != "PIPE" for name, _ in gp.Sm90Config(64, 2, 6, 1).defines())
    monkeypatch.setattr(gp, "SM90_E4M3_MIN_M", 0)
    assert gp.sm90_plan(64, 4096, 4096, 33, 132)[0].pipe == 0
    assert gp.sm90_pipe_wgcs(64) == (1, 2) and gp.sm90_pipe_wgcs(128) == ()
    assert not any(c.pipe for c in gp.sm90_candidates(64))
    piped = [c for c in gp.sm90_candidates(64, pipe=True) if c.pipe]
    assert {(c.wgc, c.ks) for c in piped} == {(1, 1), (2, 1)} and all(c.smem_bytes <= gp.SM90_SMEM for c in piped)


def test_large_tiles_from_the_large_m_rule(monkeypatch):
    """From SM90_LARGE_MIN_M tokens on (no table entry) the plan takes SM90_LARGE_TILE (96 tokens x
    192 rows), one cluster rank; below it the widest width or a mid-size entry; sm90_configs lists
    it for compiling up front; VLLM_ATOM_SM90_LARGE_TILE's other tile (64 x 256) works the same."""
    cut = gp.SM90_LARGE_MIN_M
    below = gp.sm90_plan(cut - 1, 4096, 4096, 33, 132)[0]
    at = gp.sm90_plan(cut, 4096, 4096, 33, 132)[0]
    assert below.bn == 128 and (at.bn, at.wgc, at.cs, at.ks, at.rows) == (96, 3, 1, 1, 192)
    assert at.smem_bytes <= gp.SM90_SMEM and at in gp.sm90_configs(4096, 4096, 33, 132, max_m=2 * cut)
    monkeypatch.setattr(gp, "SM90_LARGE_TILE", (64, 4))
    assert gp.sm90_plan(cut, 4096, 4096, 33, 132)[0][:2] == (64, 4)
    monkeypatch.setitem(gp.SM90_TUNED, (128, 4096, 4096), (2, 1))
    assert gp.sm90_plan(cut, 4096, 4096, 33, 132)[0].bn == 128


def test_mid_table_picks_a_narrower_tile(monkeypatch):
    """An SM90_MID_TUNED entry (bn, wgc, cs, ks) holds for M in its bucket (bucket / 2, bucket] only:
    here 64-token tiles (two of them at M = 100) under the widest width's 128; SM90_TUNED (M <= 64)
    and the large-M rule are untouched; sm90_configs lists the pick for compiling up front."""
    monkeypatch.setattr(gp, "SM90_MID_TUNED", {(128, 4096, 4096): (64, 2, 2, 1), (1024, 4096, 4096): (64, 4, 1, 2)})
    assert [gp.sm90_mid_bucket(m) for m in (1, 64, 65, 128, 129, 1024, 1025)] == [None, None, 128, 128, 256, 1024, None]
    for m in (65, 100, 128):
        cfg, per_split = gp.sm90_plan(m, 4096, 4096, 33, 132)
        assert (cfg.bn, cfg.wgc, cfg.cs, cfg.ks, cfg.lean) == (64, 2, 2, 1, gp.SM90_LEAN) and per_split == 17
        assert cfg in gp.sm90_configs(4096, 4096, 33, 132, max_m=m)
    assert gp.sm90_plan(129, 4096, 4096, 33, 132)[0].bn == 128  # bucket 256: no entry, the model
    assert gp.sm90_plan(64, 4096, 4096, 33, 132)[0][:4] == (64, *gp.SM90_TUNED[(64, 4096, 4096)][:1],
                                                          gp.sm90_stages(64, 2, 2), 2)
    cfg = gp.sm90_plan(1000, 4096, 4096, 33, 132)[0]
    assert (cfg.bn, cfg.wgc, cfg.cs, cfg.ks, cfg.slabs) == (64, 4, 1, 2, 2) and cfg.smem_bytes <= gp.SM90_SMEM
    assert gp.sm90_plan(3, 4096, 4096, 2, 132)[0].cs == 1  # (the split still bounded by the steps)
    assert gp.sm90_plan(100, 4096, 4096, 3, 132)[0].cs == 1
    monkeypatch.setattr(gp, "BATCH_INVARIANT", True)  # one K split at every M, entries or not
    assert {gp.sm90_plan(m, 4096, 4096, 33, 132)[0][3:5] for m in (1, 100, 1000)} == {
        (gp.sm90_plan(1, 4096, 4096, 33, 132)[0].cs, 1)}


def test_mid_table_entries_are_compiled_configs():
    """Every shipped mid-size entry is a (wgc, ks) the kernel compiles for its width and fits."""
    for (bucket, n, k), (bn, wgc, cs, ks) in gp.SM90_MID_TUNED.items():
        assert bucket in (128, 256, 512, 1024) and bn in gp.SM90_ALL_WIDTHS and cs in gp.SM90_SPLITS
        assert (wgc, ks) in gp.sm90_shapes(bn)
        assert gp.Sm90Config(bn, wgc, gp.sm90_stages(bn, wgc, ks), cs, ks).smem_bytes <= gp.SM90_SMEM


def test_qin_rule_and_its_compiled_configs(monkeypatch):
    """QIN (the GEMM quantizes x itself) only up to SM90_QIN_MAX_M, never with e4m3; the configs
    compiled up front then include the QIN twin of each plan it applies to, and no others."""
    assert not any(gp.sm90_qin(m) for m in (0, 1, 2, 100))  # off by default
    monkeypatch.setattr(gp, "SM90_QIN_MAX_M", 2)
    assert [gp.sm90_qin(m) for m in (0, 1, 2, 3)] == [False, True, True, False]
    cfgs = gp.sm90_configs(4096, 4096, 32, 132)
    qin = {c for c in cfgs if c.qin}
    assert qin == {gp.sm90_plan(m, 4096, 4096, 32, 132)[0]._replace(qin=1) for m in (1, 2)}
    assert all(("QIN", 1) in c.defines() for c in qin) and not any(("QIN", 1) in c.defines() for c in cfgs - qin)
    assert all(not c.qin for c in (gp.sm90_plan(m, 4096, 4096, 32, 132)[0] for m in (1, 2)))  # the GEMM op's plan
    monkeypatch.setattr(gp, "SM90_E4M3_MIN_M", 0)
    assert not gp.sm90_qin(1)
