"""Decode attention (one query token per sequence) over a paged KV cache, four ways on one GPU.

Impls, each called the way vLLM 0.26 calls it (decode, full CUDA graphs, the defaults):
  fa3-bf16     vllm_flash_attn.flash_attn_varlen_func (FA3 on sm_90, else FA2) over a bf16 cache,
               with the FA3 AOT scheduler metadata and num_splits=32 of a full-graph decode
               (v1/attention/backends/flash_attn.py, FlashAttentionImpl.forward).
  fa3-fp8      the same over an fp8_e4m3 cache (--kv-cache-dtype fp8 without checkpoint scales:
               q/k/v scales 1.0, q quantized to fp8 per tensor before the call, untimed, as the
               attention layer does in a fused op; descales expanded to (B, Hkv)).
  triton-int4  vLLM's in-tree int4_per_token_head path: TritonAttentionImpl.forward ->
               unified_attention(kv_quant_mode=INT4_PER_TOKEN_HEAD) (RHT of Q and O included).
  atom-int4    ours: vllm_atom.kernels.kv_int4.attention_int4 over Atom's INT4 cache (HND).
  atom-int4-rk the same with Hadamard-rotated keys (AtomConfig.kv_rotate_k: the query is rotated
               in the kernel's prologue; what rotation costs).
Caches: vLLM's logical (num_blocks, Hkv, 16, 2*D') with vLLM's default NHD physical layout for the
vLLM impls, filled from random bf16 K/V by each impl's own cache-write kernel; block tables are a
random permutation of the pages. Timing: each call captured in a CUDA graph (eager calls if capture
fails, "graph": false), L2 flushed before each replay, CUDA events, median of --iters replays after
--warmup. GB/s counts the KV bytes a call must read (K, V and their scales). A small cross-check
with ragged lengths reports each impl's max error vs fp32 attention on the unquantized K/V, and
atom-int4's vs fp32 attention on its dequantized cache (vllm_atom.reference.read_kv_cache).
Writes results/attention-<gpu>[-<shape>].json and .png.

    python examples/benchmarks/bench_attention.py [--shape llama3-8b] [--batches 1,16,64,256]
        [--contexts 1024,4096,16384] [--impls fa3-bf16,fa3-fp8,triton-int4,atom-int4] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHAPES = {"llama3-8b": (32, 8, 128), "llama2-7b": (32, 32, 128), "smollm2": (9, 3, 64)}  # Hq, Hkv, hd
IMPLS = ("fa3-bf16", "fa3-fp8", "triton-int4", "atom-int4", "atom-int4-rk")
BLOCK = 16
# vLLM defaults: capture sizes (config/vllm.py:1748) and FA3's split cap under full graphs
# (config/attention.py:42, used by flash_attn.py:418-419 and :499).
CAPTURE_SIZES = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
FA_MAX_SPLITS_CG = 32
FILL_ELEMS = 1 << 24  # K elements per cache-write call while filling (bounds the temporaries)
FLUSH_BYTES = 256 << 20  # zeroed before every timed call: 5x the H100's L2
FP8 = torch.float8_e4m3fn


def commit() -> str:
    if os.environ.get("ATOM_COMMIT"):
        return os.environ["ATOM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def kv_bytes_per_token_head(impl: str, hd: int) -> int:
    """Cache bytes of one (token, KV head), K and V together (scales included)."""
    return {"fa3-bf16": 4 * hd, "fa3-fp8": 2 * hd}.get(impl, 2 * (hd // 2 + 4))


class Batch:
    """Decode metadata for B sequences of the given lengths, pages scattered by a permutation."""

    def __init__(self, seq_lens: list[int], hq: int, hd: int, dev, gen: torch.Generator):
        b = len(seq_lens)
        nblk = [math.ceil(s / BLOCK) for s in seq_lens]
        self.num_blocks = sum(nblk)
        perm = torch.randperm(self.num_blocks, generator=gen, device=dev).to(torch.int32)
        self.block_table = torch.zeros(b, max(nblk), dtype=torch.int32, device=dev)
        starts = [0]
        for i, n in enumerate(nblk):
            self.block_table[i, :n] = perm[starts[-1]:starts[-1] + n]
            starts.append(starts[-1] + n)
        self.seq_lens_list = seq_lens
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self.max_seq = max(seq_lens)
        self.q = torch.randn(b, hq, hd, generator=gen, device=dev).to(torch.bfloat16)

    def slots(self) -> torch.Tensor:
        """int64 slot of every token, sequence after sequence."""
        out = []
        for i, s in enumerate(self.seq_lens_list):
            pos = torch.arange(s, device=self.q.device)
            out.append(self.block_table[i, pos // BLOCK].long() * BLOCK + pos % BLOCK)
        return torch.cat(out)


class FlashAttn:
    """vLLM's FlashAttentionImpl.forward decode call (flash_attn.py:877-1039), bf16 or fp8 cache."""

    def __init__(self, shape, num_blocks: int, dev, fp8: bool):
        from vllm.v1.attention.backends.fa_utils import (flash_attn_varlen_func, get_scheduler_metadata,
                                                         reshape_and_cache_flash)
        self.fns = flash_attn_varlen_func, get_scheduler_metadata, reshape_and_cache_flash
        self.hq, self.hkv, self.hd = shape
        self.fp8 = fp8
        self.fa_version = 3 if torch.cuda.get_device_capability()[0] == 9 else 2
        if fp8 and self.fa_version != 3:
            raise RuntimeError("vLLM's FlashAttention backend takes an fp8 KV cache only with FA3 on sm_90")
        # FlashAttentionBackend.get_kv_cache_shape (flash_attn.py:131-142) = logical (nb, Hkv, 16, 2*hd),
        # physical NHD (get_kv_cache_stride_order, :158-160), fp8 stored as uint8 (torch_utils.py:38).
        raw = torch.zeros(num_blocks, BLOCK, self.hkv, 2 * self.hd, device=dev,
                          dtype=torch.uint8 if fp8 else torch.bfloat16)
        self.kv_cache = raw.permute(0, 2, 1, 3)
        self.k, self.v = self.kv_cache.transpose(1, 2).split(self.hd, dim=-1)  # flash_attn.py:878, :1090
        self.one = torch.ones((), dtype=torch.float32, device=dev)  # layer._q/_k/_v_scale defaults

    def write(self, key, value, slots):  # FlashAttentionImpl.do_kv_cache_update (flash_attn.py:1096-1105)
        self.fns[2](key, value, self.k, self.v, slots, "fp8" if self.fp8 else "auto", self.one, self.one)

    def prepare(self, b: Batch):
        from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
        varlen, sched_fn, _ = self.fns
        k, v = canonicalize_singleton_dim_strides(self.k), canonicalize_singleton_dim_strides(self.v)
        q = b.q
        if self.fp8:  # QuantFP8(static, per tensor).forward_native with _q_scale = 1 (attention.py:523)
            k, v = k.view(FP8), v.view(FP8)
            q = (b.q.float() * self.one.reciprocal()).clamp(-448.0, 448.0).to(FP8)
        n = b.q.shape[0]
        out = torch.empty(b.q.shape, dtype=torch.bfloat16, device=q.device)
        descale = self.one.expand(n, self.hkv)  # flash_attn.py:910-918
        sched, splits = None, 0
        if self.fa_version == 3:  # builder with full graphs: aot schedule + split cap (flash_attn.py:489-529)
            splits = FA_MAX_SPLITS_CG
            sched = sched_fn(batch_size=n, max_seqlen_q=1, max_seqlen_k=b.max_seq, num_heads_q=self.hq,
                             num_heads_kv=self.hkv, headdim=self.hd, cache_seqlens=b.seq_lens,
                             qkv_dtype=FP8 if self.fp8 else torch.bfloat16, cu_seqlens_q=b.qsl,
                             page_size=BLOCK, causal=True, window_size=(-1, -1), num_splits=splits)

        def call():
            varlen(q=q, k=k, v=v, out=out, cu_seqlens_q=b.qsl, max_seqlen_q=1, seqused_k=b.seq_lens,
                   max_seqlen_k=b.max_seq, softmax_scale=self.hd ** -0.5, causal=True, alibi_slopes=None,
                   window_size=[-1, -1], block_table=b.block_table, softcap=0, scheduler_metadata=sched,
                   fa_version=self.fa_version, q_descale=descale, k_descale=descale, v_descale=descale,
                   num_splits=splits, s_aux=None)
            return out
        return call


class TritonInt4:
    """vLLM's TritonAttentionImpl with kv_cache_dtype int4_per_token_head, metadata as its builder makes."""

    def __init__(self, shape, num_blocks: int, dev):
        from vllm.v1.attention.backends import triton_attn as ta
        self.ta = ta
        self.hq, self.hkv, self.hd = shape
        nb, h, blk, c = ta.TritonAttentionBackend.get_kv_cache_shape(num_blocks, BLOCK, self.hkv, self.hd,
                                                                    "int4_per_token_head")
        self.kv_cache = torch.zeros(nb, blk, h, c, dtype=torch.uint8, device=dev).permute(0, 2, 1, 3)  # NHD
        self.impl = ta.TritonAttentionImpl(self.hq, self.hd, self.hd ** -0.5, self.hkv, None, None,
                                           "int4_per_token_head")
        self.layer = types.SimpleNamespace()  # forward only reads optional attributes of the layer
        # TritonAttentionMetadataBuilder.__init__ (triton_attn.py:131-176), decode graphs on
        thr = ta.MIN_LAUNCH_GRID_SIZE_2D // self.hkv
        self.thr = min(CAPTURE_SIZES, key=lambda x: abs(x - thr))
        seg = ta.NUM_PAR_SOFTMAX_SEGMENTS
        hdp = 1 << (self.hd - 1).bit_length()
        f32 = dict(dtype=torch.float32, device=dev)
        self.segm = (torch.empty(self.thr, self.hq, seg, hdp, **f32), torch.empty(self.thr, self.hq, seg, **f32),
                     torch.empty(self.thr, self.hq, seg, **f32))

    def write(self, key, value, slots):  # -> triton_reshape_and_cache_flash_per_token_head_quant
        self.impl.do_kv_cache_update(self.layer, key, value, self.kv_cache, slots)

    def prepare(self, b: Batch):
        n = b.q.shape[0]
        md = self.ta.TritonAttentionMetadata(
            num_actual_tokens=n, max_query_len=1, query_start_loc=b.qsl, max_seq_len=b.max_seq,
            seq_lens=b.seq_lens, block_table=b.block_table, slot_mapping=b.qsl[:0].long(),
            seq_threshold_3D=self.thr, num_par_softmax_segments=self.ta.NUM_PAR_SOFTMAX_SEGMENTS,
            softmax_segm_output=self.segm[0], softmax_segm_max=self.segm[1], softmax_segm_expsum=self.segm[2],
            causal=True, use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
            prefix_kv_lens=None, suffix_kv_lens=None)
        out = torch.empty_like(b.q)
        return lambda: self.impl.forward(self.layer, b.q, None, None, self.kv_cache, md, out)


class AtomInt4:
    def __init__(self, shape, num_blocks: int, dev, rotate_k: bool = False):
        from vllm_atom.kernels import kv_int4
        self.kv, self.rotate_k = kv_int4, rotate_k
        self.hq, self.hkv, self.hd = shape
        self.kv_cache = torch.zeros(num_blocks, self.hkv, BLOCK, 2 * (self.hd // 2 + 4), dtype=torch.uint8,
                                    device=dev)
        kv_int4.prepare(self.hd, torch.bfloat16, self.kv_cache.device, rotate_k)  # compile before any capture

    def write(self, key, value, slots):
        self.kv.write_kv_int4(key, value, self.kv_cache, slots, self.rotate_k)

    def prepare(self, b: Batch):
        out = torch.empty_like(b.q)
        return lambda: self.kv.attention_int4(b.q, self.kv_cache, b.qsl, b.seq_lens, b.block_table, 1,
                                              self.hd ** -0.5, out=out, rotate_k=self.rotate_k)


def make(impl: str, shape, num_blocks: int, dev):
    if impl.startswith("fa3"):
        return FlashAttn(shape, num_blocks, dev, fp8=impl == "fa3-fp8")
    if impl == "atom-int4-rk":
        return AtomInt4(shape, num_blocks, dev, rotate_k=True)
    return {"triton-int4": TritonInt4, "atom-int4": AtomInt4}[impl](shape, num_blocks, dev)


def fill(m, b: Batch, hkv: int, hd: int, gen, kv=None) -> None:
    """Write every token of b into m's cache, with m's own write kernel (random K/V unless kv given)."""
    slots, step = b.slots(), max(1, FILL_ELEMS // (hkv * hd))
    for s in range(0, slots.numel(), step):
        e = min(s + step, slots.numel())
        if kv is None:
            k, v = (torch.randn(e - s, hkv, hd, generator=gen, device=slots.device).to(torch.bfloat16)
                    for _ in range(2))
        else:
            k, v = kv[0][s:e], kv[1][s:e]
        m.write(k, v, slots[s:e])


def time_us(fn, warmup: int, iters: int, flush: torch.Tensor) -> tuple[float, bool]:
    """Median us of one call: graph replays (or eager calls if capture fails), L2 flushed before each."""
    fn()
    torch.cuda.synchronize()
    run, graph = fn, True
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    except Exception as e:  # noqa: BLE001
        print(f"    graph capture failed ({type(e).__name__}: {str(e)[:120]}); timing eager calls")
        torch.cuda.synchronize()
        graph = False
    for _ in range(warmup):
        run()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in ev:
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1000 for s, e in ev), graph


def ref_attention(q, k, v, scale):
    """q [Hq, D], k/v [S, Hkv, D], fp32 -> [Hq, D]; query head h reads KV head h // (Hq/Hkv)."""
    g = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    p = (torch.einsum("hd,shd->hs", q, k) * scale).softmax(-1)
    return torch.einsum("hs,shd->hd", p, v)


def check(impls, shape, dev, seq_lens=(1, 17, 256, 1000, 3001)) -> dict:
    """Max abs error of each impl vs fp32 attention on the unquantized K/V (and atom vs its dequant)."""
    from vllm_atom.reference import hadamard_rotate, read_kv_cache
    hq, hkv, hd = shape
    gen = torch.Generator(device=dev).manual_seed(1)
    b = Batch(list(seq_lens), hq, hd, dev, gen)
    t = sum(seq_lens)
    k, v = (torch.randn(t, hkv, hd, generator=gen, device=dev).to(torch.bfloat16) for _ in range(2))
    starts = [0] + list(torch.tensor(seq_lens).cumsum(0).tolist())
    q32, scale = b.q.float(), hd ** -0.5
    exact = torch.stack([ref_attention(q32[i], k[s:e].float(), v[s:e].float(), scale)
                         for i, (s, e) in enumerate(zip(starts, starts[1:]))])
    res = {"seq_lens": list(seq_lens), "ref_absmax": round(exact.abs().max().item(), 4)}
    for impl in impls:
        try:
            m = make(impl, shape, b.num_blocks, dev)
            fill(m, b, hkv, hd, gen, kv=(k, v))
            out = m.prepare(b)().float()
            r = {"max_abs_err_vs_exact": round((out - exact).abs().max().item(), 5),
                 "rel_rms_err_vs_exact": round(((out - exact).norm() / exact.norm()).item(), 5)}
            if impl.startswith("atom-int4"):  # rotated keys: the rotated query, rounded as the kernel does
                qa = hadamard_rotate(b.q).to(b.q.dtype).float() if m.rotate_k else q32
                deq = torch.stack([ref_attention(qa[i], *read_kv_cache(m.kv_cache, b.block_table[i], s, hd),
                                                 scale) for i, s in enumerate(seq_lens)])
                r["max_abs_err_vs_dequant"] = round((out - deq).abs().max().item(), 5)
            res[impl] = r
        except Exception as e:  # noqa: BLE001
            res[impl] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"  check {impl}: {res[impl]}", flush=True)
    return res


def bench(impls, shape, batches, contexts, warmup, iters, dev) -> list[dict]:
    hq, hkv, hd = shape
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=dev)
    rows, broken = [], {}
    for ctx in contexts:
        for bsz in batches:
            gen = torch.Generator(device=dev).manual_seed(bsz * 100003 + ctx)
            b = Batch([ctx] * bsz, hq, hd, dev, gen)
            for impl in impls:
                row = dict(impl=impl, batch=bsz, context=ctx, us=None, gbps=None, graph=None)
                rows.append(row)
                kv_bytes = bsz * ctx * hkv * kv_bytes_per_token_head(impl, hd)
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info()[0]
                need = b.num_blocks * BLOCK * hkv * kv_bytes_per_token_head(impl, hd) \
                    + 24 * FILL_ELEMS + (1 << 30)
                if impl in broken:
                    row["error"] = broken[impl]
                elif need > free:
                    row["skipped"] = f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
                else:
                    m = None
                    try:
                        m = make(impl, shape, b.num_blocks, dev)
                        fill(m, b, hkv, hd, gen)
                        us, graph = time_us(m.prepare(b), warmup, iters, flush)
                        row.update(us=round(us, 2), gbps=round(kv_bytes / us / 1e3, 1), graph=graph)
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"[:500]
                        if isinstance(e, ImportError):
                            broken[impl] = row["error"]
                    del m
                print(f"  B={bsz:<4} ctx={ctx:<6} {impl:<12} "
                      + (f"{row['us']:9.1f} us {row['gbps']:7.0f} GB/s" if row["us"] is not None
                         else str(row.get("skipped") or row.get("error"))[:100]), flush=True)
            del b
    return rows


def speedups(rows, num: str, den: str) -> dict:
    """(B, ctx) -> us(num) / us(den) where both ran."""
    t = {(r["impl"], r["batch"], r["context"]): r["us"] for r in rows if r["us"] is not None}
    return {(bb, c): t[(num, bb, c)] / t[(den, bb, c)] for (i, bb, c) in t if i == den and (num, bb, c) in t}


def summarize(rows) -> dict:
    out = {}
    for base in ("fa3-fp8", "fa3-bf16", "triton-int4"):
        sp = speedups(rows, base, "atom-int4")
        if sp:
            out[f"atom speedup vs {base} (min, geomean)"] = [
                round(min(sp.values()), 3), round(math.exp(statistics.mean(map(math.log, sp.values()))), 3)]
    sp = [s for (bb, c), s in speedups(rows, "fa3-fp8", "atom-int4").items() if c == 4096 and bb >= 16]
    if sp:  # design target (docs/kv_int4_design.md §7): >= 1.5x fp8 at 4k, B >= 16
        out["ctx=4096 B>=16 atom speedup vs fa3-fp8 (min)"] = round(min(sp), 3)
    return out


def plot(rows, impls, batches, contexts, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = {(r["impl"], r["batch"], r["context"]): r for r in rows if r["us"] is not None}
    ran = [i for i in ("fa3-fp8", "fa3-bf16", *impls) if any(k[0] == i for k in t)]
    base = ran[0] if ran else impls[0]
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.2 * len(contexts), 7), squeeze=False)
    for j, ctx in enumerate(contexts):
        for impl in impls:
            bs = [k for k, bb in enumerate(batches) if (impl, bb, ctx) in t and (base, bb, ctx) in t]
            axes[0][j].plot(bs, [t[(base, batches[k], ctx)]["us"] / t[(impl, batches[k], ctx)]["us"] for k in bs],
                            marker="o", label=impl)
            bs = [k for k, bb in enumerate(batches) if (impl, bb, ctx) in t]
            axes[1][j].plot(bs, [t[(impl, batches[k], ctx)]["gbps"] for k in bs], marker="o", label=impl)
        axes[0][j].axhline(1.0, color="gray", lw=0.8)
        axes[0][j].set_title(f"context {ctx}: speedup vs {base}")
        axes[1][j].set_title(f"context {ctx}: KV bytes read / time")
        axes[1][j].set_ylabel("GB/s")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(range(len(batches)), [str(bb) for bb in batches])
            ax.set_xlabel("batch (sequences)")
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("speedup (x)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows, impls, batches, contexts, title: str) -> None:
    t = {(r["impl"], r["batch"], r["context"]): r["us"] for r in rows}
    sps = speedups(rows, "fa3-fp8", "atom-int4"), speedups(rows, "triton-int4", "atom-int4")
    print(f"\n{title}  decode attention, us per call (graph replay, cold L2)")
    print(f"{'B':>5} {'ctx':>6} " + " ".join(f"{i:>11}" for i in impls) + f" {'atom/fp8':>9} {'atom/tri4':>9}")
    for ctx in contexts:
        for bb in batches:
            us = [f"{t[(i, bb, ctx)]:11.1f}" if t.get((i, bb, ctx)) else f"{'-':>11}" for i in impls]
            sp = [f"{s[(bb, ctx)]:9.2f}" if (bb, ctx) in s else f"{'-':>9}" for s in sps]
            print(f"{bb:>5} {ctx:>6} " + " ".join(us + sp))


def main() -> None:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="Hq/Hkv/head_dim preset")
    ap.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    ap.add_argument("--contexts", type=ints, default=[1024, 4096, 16384])
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--no-check", action="store_true", help="skip the small correctness cross-check")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    if bad := [i for i in impls if i not in IMPLS]:
        ap.error(f"unknown impl(s) {bad}; choose from {IMPLS}")
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); run it on an H100/H200.")
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    device = torch.cuda.get_device_name()
    try:
        vllm_version = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        vllm_version = None
    print(f"{device}  shape {args.shape} (Hq, Hkv, hd) = {shape}, block {BLOCK}, vllm {vllm_version}", flush=True)
    dev = torch.device("cuda")
    rows = bench(impls, shape, args.batches, args.contexts, args.warmup, args.iters, dev)
    summary = summarize(rows)
    tag = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    if args.shape != "llama3-8b":
        tag += f"-{args.shape}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(
        device=device, commit=commit(), torch=torch.__version__, cuda=torch.version.cuda, vllm=vllm_version,
        shape=dict(name=args.shape, num_heads=shape[0], num_kv_heads=shape[1], head_dim=shape[2],
                   block_size=BLOCK, query_dtype="bfloat16"),
        fa_version=3 if torch.cuda.get_device_capability()[0] == 9 else 2,
        timing=dict(method="one call per CUDA graph replay, L2 flushed before each, CUDA events, median",
                    warmup=args.warmup, iters=args.iters),
        check=None, summary=summary, rows=rows)
    path = out / f"attention-{tag}.json"
    path.write_text(json.dumps(result, indent=1))  # saved before the check, in case a kernel crashes there
    try:
        plot(rows, impls, args.batches, args.contexts, path.with_suffix(".png"), f"{device}, {args.shape}")
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {type(e).__name__}: {e}")
    if not args.no_check:
        result["check"] = check(impls, shape, dev)
        path.write_text(json.dumps(result, indent=1))
    table(rows, impls, args.batches, args.contexts, f"{device}  {args.shape}")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
