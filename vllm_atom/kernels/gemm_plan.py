"""Which GEMM kernel and tile configuration runs a given (M, N, K): pure Python, no imports of
torch or CuPy, so tests and benchmarks read the same table the ops use.

Two kernels:
- ``cuda/w4a4_gemm.cu`` (mma.sync, sm_80 and newer): `GEMM_CONFIGS` picked by M, split-K by
  `gemm_plan`.
- ``cuda/w4a4_sm90.cu`` (wgmma, sm_90a): `Sm90Config` picked by M (tokens are the wgmma N
  side, so the tile is as wide as the batch), with a cluster split of the K steps chosen by
  `sm90_plan`: the measured entries of `SM90_TUNED` (per width) and `SM90_MID_TUNED` (per M
  bucket, 65-1024 tokens, which may pick a narrower tile) first, else from `SM90_LARGE_MIN_M`
  tokens on tiles of `SM90_LARGE_TILE` (96 tokens x 192 rows), else a wave model; from
  `SM90_E4M3_MIN_M` tokens on (off by default), the INT4 groups run on e4m3 wgmma (`sm90_e4m3`),
  which the activation quantization must know too (it writes e4m3 bytes then).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

# ---- mma.sync kernel (cuda/w4a4_gemm.cu) ----

# name: (BM, BN, WARPS_M, WARPS_N, STAGES, MIN_BLOCKS)
GEMM_CONFIGS = {
    "small": (16, 128, 1, 4, 8, 2),
    "medium": (64, 128, 2, 4, 4, 1),
    "large": (128, 128, 2, 4, 4, 1),
}
N_COUNTERS = 1 << 14  # split-K tile counters the wrapper allocates per device


def gemm_config(m: int) -> str:
    return "small" if m <= 16 else "medium" if m <= 64 else "large"


def gemm_plan(m: int, n: int, groups: int, sms: int) -> tuple[str, int, int]:
    """(config, splits, groups per split): the tile config for M, and a split-K factor that
    brings the CTA count up to about one wave when the tiles alone are fewer, with at least
    two groups per split."""
    cfg = gemm_config(m)
    bm, bn, *_, min_blocks = GEMM_CONFIGS[cfg]
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    target = sms * min_blocks
    splits = 1
    if tiles < target and tiles <= N_COUNTERS:
        splits = max(1, min(target // tiles, groups // 2, 32))
    per_split = math.ceil(groups / splits)
    return cfg, math.ceil(groups / per_split), per_split


# ---- wgmma kernel (cuda/w4a4_sm90.cu) ----

SM90_SMEM = 227 * 1024  # shared memory per block on sm_90 (opt-in)
SM90_CHUNK8 = 8320      # bytes of the largest step chunk of one 64-row slab (layout.CHUNK8)


class Sm90Config(NamedTuple):
    """bn: tokens per CTA (the wgmma N); wgc: consumer warpgroups; stages: shared-memory pipeline
    depth; cs: CTAs per cluster splitting the K steps; ks: consumer warpgroups per 64-row slab
    (2: they take alternate steps, a K split inside the CTA). A tile is wgc / ks slabs.
    e4m3: the INT4 groups on e4m3 wgmma (activations quantized with e4m3 bytes, `sm90_e4m3`).
    pipe: each warpgroup keeps a step's MMAs in flight while it folds the previous step (two
    accumulator sets; ks = 1, s8 only; up to `SM90_PIPE_MAX_WGC`).
    lean: the consumers' step loop on shared addresses kept in registers, the outlier step peeled
    off (define LEAN; ks = 1, s8, no pipe; `SM90_LEAN`).
    qin: the kernel quantizes the activations itself (define QIN: the whole Atom linear in one
    launch, `sm90_qin`; s8 only). Only `atom_linear_sm90` launches it."""

    bn: int
    wgc: int
    stages: int
    cs: int
    ks: int = 1
    e4m3: int = 0
    pipe: int = 0
    lean: int = 0
    qin: int = 0

    @property
    def slabs(self) -> int:
        return self.wgc // self.ks

    @property
    def rows(self) -> int:
        return 64 * self.slabs

    @property
    def threads(self) -> int:
        return 128 * self.wgc + 128

    def defines(self) -> tuple[tuple[str, int], ...]:
        return (("BN", self.bn), ("WGC", self.wgc), ("STAGES", self.stages), ("CS", self.cs), ("KS", self.ks),
                ("E4M3", self.e4m3)) + ((("PIPE", 1),) if self.pipe else ()) + ((("LEAN", 1),) if self.lean else ()) \
            + ((("QIN", 1),) if self.qin else ())

    @property
    def stage_bytes(self) -> int:
        raw = self.bn * 128 + self.slabs * SM90_CHUNK8 + self.bn * 8  # activations, weights, scales
        return (raw + 1023) // 1024 * 1024

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of one CTA (stages, 1024 for alignment, the mbarriers)."""
        return self.stages * self.stage_bytes + 1024 + 16 * self.stages


SM90_WIDTHS = (8, 16, 32, 64, 128)  # the narrowest one holding M is M's width (`sm90_width`)
# Tile widths that only a table entry, the large-M rule or a benchmark sweep picks (`--sweep-width 96`):
# 96 tokens x 192 rows (three warpgroups) has 13 % fewer instructions per MAC in its step loop than
# 64 x 256 (228 per warp for 64 x 96 x 128 against 176 for 64 x 64 x 128; cuda/NOTES.md v3.11).
SM90_TILE_WIDTHS = (96,)
SM90_ALL_WIDTHS = SM90_WIDTHS + SM90_TILE_WIDTHS  # every width the kernel compiles for
# From this many tokens on, the sm90 GEMM computes the INT4 groups with e4m3 wgmma on the same
# integers (exact, cuda/NOTES.md v3.7): the fold is then 2 FFMA per accumulator instead of 3
# instructions. Both `cuda_ops._quantize` (which then writes e4m3 activation bytes) and the GEMM
# read this rule. Off by default: measured 8-11 % slower than s8 at every M >= 128 on an H200.
# VLLM_ATOM_E4M3_MIN_M sets it (0: always).
SM90_E4M3_OFF = 1 << 62
SM90_E4M3_MIN_M = int(os.environ.get("VLLM_ATOM_E4M3_MIN_M", str(SM90_E4M3_OFF)))
# VLLM_ATOM_BATCH_INVARIANT=1: every token's output is the same bits whatever the batch it runs in
# (M): the sm90 GEMM keeps one K split per layer (the cluster split of its M = 1 pick, no intra-CTA
# split) at every M, and the INT4-KV attention does not split decode rows (`kv_int4`). Costs speed
# where the splits helped (decode of the N = 4096 layers, long-context decode attention); what
# preemption / recompute or a changing batch needs for identical greedy outputs.
BATCH_INVARIANT = os.environ.get("VLLM_ATOM_BATCH_INVARIANT", "0") == "1"
SM90_SPLITS = (1, 2, 4, 8)
# Consumer warpgroups a width can have: the accumulators of a warpgroup grow with the width and
# more warpgroups leave fewer registers each (cuda/w4a4_sm90.cu, CONSUMER_REGS); past these ptxas
# spills inside the step loop (nvcc 13.0, sm_90a): one warpgroup per slab, two per slab, and with
# PIPE (two accumulator sets and two steps' weight fragments per thread).
SM90_MAX_WGC = {8: 4, 16: 4, 32: 4, 64: 4, 96: 3, 128: 2}
SM90_KS2_MAX_WGC = {8: 4, 16: 4, 32: 4, 64: 2}
SM90_PIPE_MAX_WGC = {8: 4, 16: 3, 32: 3, 64: 2}


def sm90_wgcs(bn: int) -> tuple[int, ...]:
    """The consumer warpgroup counts (64 weight rows each) the kernel compiles for width ``bn``;
    one is only for the decode widths (a 64-row tile of 128 tokens leaves the tensor cores idle)."""
    return tuple(range(1 if bn <= 64 else 2, SM90_MAX_WGC[bn] + 1))


def sm90_shapes(bn: int) -> tuple[tuple[int, int], ...]:
    """(wgc, ks) pairs the kernel compiles for width ``bn``: every warpgroup count of `sm90_wgcs`
    with one warpgroup per slab, and the even ones up to `SM90_KS2_MAX_WGC` also with two per slab."""
    return tuple((wgc, ks) for wgc in sm90_wgcs(bn) for ks in (1, 2)
                 if ks == 1 or (wgc % 2 == 0 and wgc <= SM90_KS2_MAX_WGC.get(bn, 0)))


def sm90_pipe_wgcs(bn: int) -> tuple[int, ...]:
    """The warpgroup counts (one per slab) the kernel also compiles with PIPE for width ``bn``."""
    return tuple(w for w in sm90_wgcs(bn) if w <= SM90_PIPE_MAX_WGC.get(bn, 0))


def sm90_e4m3(m: int) -> bool:
    """Whether M tokens run the e4m3 variant (activation layout and GEMM)."""
    return m >= SM90_E4M3_MIN_M


# Up to this many tokens the Atom linear on sm90 is one kernel: the GEMM's producer warpgroup
# gathers and quantizes the activations itself (`Sm90Config.qin`, cuda/w4a4_sm90.cu QIN), so no
# quantization launch and no wait for one precede the weight stream. The gather reads x through
# the reorder index once per CTA, which is cheap only for a token or two (cuda/NOTES.md v3.13).
# 0: off (the default until measured); VLLM_ATOM_SM90_QIN_MAX_M sets it.
SM90_QIN_MAX_M = int(os.environ.get("VLLM_ATOM_SM90_QIN_MAX_M", "0"))


def sm90_qin(m: int) -> bool:
    """Whether the Atom linear of M tokens quantizes inside the GEMM (never with e4m3)."""
    return 0 < m <= SM90_QIN_MAX_M and not sm90_e4m3(m)


def sm90_width(m: int) -> int:
    """The wgmma N (tokens per CTA) for M tokens."""
    return next((w for w in SM90_WIDTHS if m <= w), SM90_WIDTHS[-1])


# The LEAN step loop (`Sm90Config.lean`) wherever it applies: measured as fast or faster at every
# M on the four sm90_variants shapes (cuda/NOTES.md v3.10); VLLM_ATOM_SM90_LEAN=0 gives the old loop.
SM90_LEAN = int(os.environ.get("VLLM_ATOM_SM90_LEAN", "1"))

# From this many tokens on (with no table entry), tiles of SM90_LARGE_TILE = (tokens, consumer
# warpgroups of 64 rows) instead of the widest width's 128 x 128: 96 tokens x 192 rows, measured
# 1.14x (M = 2048) and 1.29x (M = 8192) the 64 x 256 tiles of v3.8 on every Llama-2-7B / Llama-3-8B /
# Llama-2-70B layer (cuda/NOTES.md v3.11), which were faster than 128 x 128 from M = 2048 (v3.8).
# VLLM_ATOM_SM90_LARGE_MIN_M sets the cut (2^62: off), VLLM_ATOM_SM90_LARGE_TILE the tile ("64x4": v3.8's).
SM90_LARGE_TILE = tuple(int(v) for v in os.environ.get("VLLM_ATOM_SM90_LARGE_TILE", "96x3").split("x"))
SM90_LARGE_MIN_M = int(os.environ.get("VLLM_ATOM_SM90_LARGE_MIN_M", "2048"))

SM90_MAX_STAGES: int | None = None  # a cap for every config instead of 12 / 16 (bench_gemm --sweep-stages)


def sm90_stages(bn: int, wgc: int = 2, ks: int = 1) -> int:
    """As many stages as fit in shared memory (at most 12 with two warpgroups on two slabs, else 16)."""
    cap = SM90_MAX_STAGES or (12 if (wgc, ks) == (2, 1) else 16)
    for stages in range(cap, 1, -1):
        if Sm90Config(bn, wgc, stages, 1, ks).smem_bytes <= SM90_SMEM:
            return stages
    raise ValueError(f"no sm90 pipeline fits for BN={bn}")


# Measured best (wgc, cluster split) for (M bucket = wgmma N, N, K) on an H200: per entry the config
# with the least geometric mean time over two `examples/benchmarks/bench_gemm.py --sweep-splits
# --m-list 1,16,32,64` runs of every (WGC 1-4, CS) (2026-12-02, results/gemm-sweep-wgc-h200-{a,b}.json:
# the kernel of this table but for its producer loop, see cuda/NOTES.md v3.4); the 3-tuples (two
# warpgroups per slab, KS = 2) where one `--sweep-splits --sweep-ks 2` run had them >= 3 % faster than
# that pick (results/gemm-sweep-ks2-h200.json, v3.5). Llama-2-7B / Llama-3-8B / Llama-2-70B layers at
# TP=1; other shapes and widths use the model below.
SM90_TUNED: dict[tuple[int, int, int], tuple[int, ...]] = {  # (bn, N, K): (wgc, cs[, ks[, pipe]])
    (8, 4096, 4096): (2, 2, 2), (8, 4096, 11008): (1, 2), (8, 4096, 14336): (1, 2), (8, 6144, 4096): (4, 4),
    (8, 8192, 8192): (2, 2), (8, 8192, 28672): (2, 2), (8, 10240, 8192): (3, 2), (8, 12288, 4096): (3, 2),
    (8, 22016, 4096): (3, 1), (8, 28672, 4096): (4, 1), (8, 57344, 8192): (4, 1),
    (16, 4096, 4096): (2, 2, 2), (16, 4096, 11008): (1, 2), (16, 4096, 14336): (1, 2), (16, 6144, 4096): (4, 4),
    (16, 8192, 8192): (2, 2), (16, 8192, 28672): (2, 2), (16, 10240, 8192): (3, 2), (16, 12288, 4096): (3, 2),
    (16, 22016, 4096): (3, 1), (16, 28672, 4096): (4, 1), (16, 57344, 8192): (4, 1),
    (32, 4096, 4096): (2, 2, 2), (32, 4096, 11008): (2, 2, 2), (32, 4096, 14336): (2, 2, 2), (32, 6144, 4096): (2, 1, 2),
    (32, 8192, 8192): (2, 2), (32, 8192, 28672): (2, 2), (32, 10240, 8192): (3, 2), (32, 12288, 4096): (3, 2),
    (32, 22016, 4096): (3, 1), (32, 28672, 4096): (4, 1), (32, 57344, 8192): (4, 1),
    (64, 4096, 4096): (2, 2, 2), (64, 4096, 11008): (2, 2, 2), (64, 4096, 14336): (2, 2, 2), (64, 6144, 4096): (2, 1, 2),
    (64, 8192, 8192): (2, 2), (64, 8192, 28672): (2, 2), (64, 10240, 8192): (3, 2), (64, 12288, 4096): (3, 2),
    (64, 22016, 4096): (3, 1), (64, 28672, 4096): (2, 1), (64, 57344, 8192): (2, 1),
}

# Measured best (bn, wgc, cs, ks) for the mid sizes (M bucket, N, K), bucket 128 / 256 / 512 / 1024
# holding M in (bucket / 2, bucket] (`sm90_mid_bucket`): there the widest width's 128-token tiles
# leave the plan a choice the wave model does not make well (a 64-token tile with more CTAs, or a
# cluster split the model counts as a second wave). From `bench_gemm.py --m-list 128,256,512
# --sweep-splits --sweep-width 64` (rows atom_gemm_w*, atom_gemm_b64*), the entries at least 3 %
# faster than the model's pick (`examples/benchmarks/sm90_table.py`); Llama-2-7B / Llama-3-8B /
# Llama-2-70B layers at TP=1. SM90_TUNED (per width, M <= 128) comes first.
SM90_MID_MAX_M = 1024
# H100 at 14f2a69 (results/gemm-sweep-mid-h100.json; the comments: the model's pick / this entry, GEMM alone).
SM90_MID_TUNED: dict[tuple[int, int, int], tuple[int, int, int, int]] = {  # (bucket, N, K): (bn, wgc, cs, ks)
    (128, 4096, 4096): (64, 2, 1, 2),  # 1.54x
    (128, 4096, 11008): (64, 2, 2, 1),  # 1.75x
    (128, 4096, 14336): (64, 2, 2, 1),  # 1.60x
    (128, 6144, 4096): (64, 3, 2, 1),  # 1.15x
    (128, 10240, 8192): (64, 3, 1, 1),  # 1.25x
    (128, 12288, 4096): (64, 3, 1, 1),  # 1.25x
    (128, 22016, 4096): (64, 3, 1, 1),  # 1.25x
    (256, 4096, 4096): (64, 2, 1, 1),  # 1.11x
    (256, 4096, 14336): (128, 2, 2, 1),  # 1.05x
    (256, 6144, 4096): (64, 3, 1, 1),  # 1.30x
    (256, 8192, 8192): (128, 2, 1, 1),  # 1.07x
    (256, 8192, 28672): (64, 4, 1, 1),  # 1.13x
    (256, 10240, 8192): (64, 3, 1, 1),  # 1.24x
    (256, 12288, 4096): (64, 3, 1, 1),  # 1.35x
    (256, 22016, 4096): (64, 4, 1, 1),  # 1.05x
    (256, 28672, 4096): (64, 4, 1, 1),  # 1.10x
    (256, 57344, 8192): (64, 4, 1, 1),  # 1.14x
    (512, 4096, 4096): (64, 4, 1, 1),  # 1.06x
    (512, 4096, 11008): (64, 4, 1, 1),  # 1.11x
    (512, 4096, 14336): (128, 2, 1, 1),  # 1.04x
    (512, 6144, 4096): (64, 3, 1, 1),  # 1.33x
    (512, 8192, 8192): (64, 4, 1, 1),  # 1.19x
    (512, 8192, 28672): (64, 4, 1, 1),  # 1.28x
    (512, 10240, 8192): (64, 2, 1, 1),  # 1.18x
    (512, 12288, 4096): (64, 4, 1, 1),  # 1.17x
    (512, 22016, 4096): (64, 3, 1, 1),  # 1.29x
    (512, 28672, 4096): (64, 4, 1, 1),  # 1.26x
    (512, 57344, 8192): (64, 4, 1, 1),  # 1.38x
}


def sm90_mid_bucket(m: int) -> int | None:
    """The mid-size bucket of M (the power of two >= M) for 64 < M <= SM90_MID_MAX_M, else None."""
    return 1 << (m - 1).bit_length() if SM90_WIDTHS[-2] < m <= SM90_MID_MAX_M else None


# The wave model: a CTA streams its steps at up to SM_GBPS; all CTAs together at up to HBM_GBPS;
# each wave also pays CTA_US (launch, pipeline fill, epilogue, cluster barriers).
_SM_GBPS, _HBM_GBPS, _CTA_US = 45.0, 3600.0, 2.0
_OPS_PER_US = 1.0e9  # INT8 tensor throughput the kernel reaches on the whole GPU, ops per us


def sm90_cost(m: int, n: int, steps: int, cfg: "Sm90Config", slots: int) -> float:
    """Modelled microseconds of the wgmma GEMM with config ``cfg`` (``slots``: CTAs resident at
    once for its cluster size)."""
    tiles = math.ceil(m / cfg.bn) * math.ceil(n / cfg.rows)
    ctas = tiles * cfg.cs
    waves = math.ceil(ctas / max(slots, 1))
    per_split = math.ceil(steps / cfg.cs)
    cta_bytes = per_split * (cfg.rows * 66 + cfg.bn * 132)
    stream = max(ctas * cta_bytes / (_HBM_GBPS * 1e3), waves * cta_bytes / (_SM_GBPS * 1e3))
    compute = 2 * tiles * cfg.rows * cfg.bn * 128 * steps / _OPS_PER_US
    return max(stream, compute) + waves * _CTA_US


def sm90_candidates(m: int, pipe: bool = False) -> list[Sm90Config]:
    """Every config of M's width (with ``pipe``, also the PIPE ones after them)."""
    bn = sm90_width(m)
    out = [Sm90Config(bn, wgc, sm90_stages(bn, wgc, ks), cs, ks) for wgc, ks in sm90_shapes(bn)
           for cs in SM90_SPLITS]
    if pipe:
        out += [Sm90Config(bn, wgc, sm90_stages(bn, wgc), cs, pipe=1) for wgc in sm90_pipe_wgcs(bn) for cs in SM90_SPLITS]
    return out


def sm90_plan(m: int, n: int, k: int, steps: int, sms: int,
              slots: dict[int, int] | None = None) -> tuple[Sm90Config, int]:
    """(config, steps per split) for the wgmma kernel: N = rows, K = input channels of the shard
    (for the table lookup), steps = INT4 groups + 1 if there are outliers; ``slots[cs]``: CTAs of
    cluster size cs the GPU holds at once (default: one per SM)."""
    bn = sm90_width(m)
    slots = slots or {cs: sms for cs in SM90_SPLITS}
    tuned = SM90_TUNED.get((bn, n, k))
    if tuned:
        wgc, cs, ks, pipe = tuned + (1, 0)[len(tuned) - 2:]
        cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc, ks), cs, ks, pipe=pipe)
    elif mid := SM90_MID_TUNED.get((sm90_mid_bucket(m), n, k)):
        bn, wgc, cs, ks = mid
        cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc, ks), cs, ks)
    elif bn == SM90_WIDTHS[-1] and m >= SM90_LARGE_MIN_M:
        bn, wgc = SM90_LARGE_TILE
        cfg = Sm90Config(bn, wgc, sm90_stages(bn, wgc), 1)
    else:
        # (the model was fitted to one and two warpgroups, one per slab; the rest only from the table)
        ok = [c for c in sm90_candidates(m) if c.wgc <= 2 and c.ks == 1 and (c.cs == 1 or steps >= 2 * c.cs)]
        cfg = min(ok, key=lambda c: (sm90_cost(m, n, steps, c, slots[c.cs]), c.cs, -c.wgc))
    while cfg.cs > 1 and steps < 2 * cfg.cs:
        cfg = cfg._replace(cs=cfg.cs // 2)
    if BATCH_INVARIANT:
        # the sum order depends only on (cs, ks): the M = 1 pick's cluster split, one warpgroup per slab
        cs = cfg.cs if m == 1 else sm90_plan(1, n, k, steps, sms, slots)[0].cs
        cfg = cfg._replace(cs=cs, ks=1, stages=sm90_stages(cfg.bn, cfg.wgc, 1))  # (pipe keeps the order)
    cfg = cfg._replace(e4m3=int(sm90_e4m3(m)))
    if cfg.e4m3:
        cfg = cfg._replace(pipe=0)  # (PIPE is written for the s8 steps only)
    if SM90_LEAN and cfg.ks == 1 and not cfg.pipe and not cfg.e4m3:
        cfg = cfg._replace(lean=1)
    return cfg, math.ceil(steps / cfg.cs)


def sm90_configs(n: int, k: int, steps: int, sms: int, slots: dict[int, int] | None = None,
                 max_m: int = 1 << 16) -> set[Sm90Config]:
    """Every config `sm90_plan` can pick for this layer at M <= max_m (to compile them up front),
    with the `qin` ones `atom_linear_sm90` launches at M <= SM90_QIN_MAX_M."""
    bn = SM90_WIDTHS[-1]
    ms = set(range(1, bn + 1)) | {SM90_E4M3_MIN_M, SM90_LARGE_MIN_M}  # (the rules may cut inside a tile count)
    for tiles_m in range(2, math.ceil(max_m / bn) + 1):
        ms |= {(tiles_m - 1) * bn + 1, tiles_m * bn}
    plans = {m: sm90_plan(m, n, k, steps, sms, slots)[0] for m in ms if 0 < m <= max(max_m, bn)}
    return set(plans.values()) | {cfg._replace(qin=1) for m, cfg in plans.items() if sm90_qin(m)}
