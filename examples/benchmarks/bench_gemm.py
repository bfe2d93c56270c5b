"""Atom linear (activation quantization + W4A4 GEMM) against BF16, FP8 and W4A16 on one GPU.

Rows (impl, time_us per call; M, N, K): "atom" = the Atom linear as vLLM runs it
(torch.ops.vllm_atom.atom_linear_sm90 on sm_90, atom_linear elsewhere: quantize + GEMM, the
full cost); "bf16" = torch.nn.functional.linear; "fp8" = the faster of "fp8_torch" (per-token
dynamic FP8 quantization, one torch.compile'd kernel, + torch._scaled_mm) and "fp8_cutlass"
(vLLM's --quantization fp8 path: vllm._custom_ops.scaled_fp8_quant per token +
cutlass_scaled_mm with per-token x per-channel scales); "marlin" = vLLM's GPTQ W4A16 Marlin
kernel (4 bit, group 128, `apply_gptq_marlin_linear`), when the vLLM in this environment has it.
Detail rows: atom_gemm (GEMM on pre-quantized input; TOPS), atom_quant (activation quantization
alone), atom_mma (the mma.sync kernel + its quantization, the sm_80 path). Every row carries
the HBM bytes it must move (weights + activations in + out) and the GB/s that gives; the run
also measures a device-to-device copy ("copy_gbps"), the bandwidth the weight stream is held to.
Timing: calls are captured in a CUDA graph of many calls over rotated buffers (so weights
are not served from L2) and the graph replays are timed with events. Median of 5.
Writes results/gemm-<gpu>.json and .png.

    python examples/benchmarks/bench_gemm.py [--quick] [--out DIR] [--sweep-splits]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_atom.config import AtomConfig  # noqa: E402
from vllm_atom.kernels import gemm_plan, layout, ops  # noqa: E402

if torch.cuda.is_available():
    from vllm_atom.kernels import cuda_ops  # noqa: E402

# (model, layer, N, K)
SHAPES = [
    ("smollm2-135m", "qkv", 960, 576), ("smollm2-135m", "gate_up", 3072, 576), ("smollm2-135m", "down", 576, 1536),
    ("qwen2.5-1.5b", "qkv", 2048, 1536), ("qwen2.5-1.5b", "gate_up", 17920, 1536), ("qwen2.5-1.5b", "down", 1536, 8960),
    ("llama-2-7b", "qkv", 12288, 4096), ("llama-2-7b", "o", 4096, 4096), ("llama-2-7b", "gate_up", 22016, 4096),
    ("llama-2-7b", "down", 4096, 11008),
    ("llama-3-8b", "qkv", 6144, 4096), ("llama-3-8b", "gate_up", 28672, 4096), ("llama-3-8b", "down", 4096, 14336),
    ("llama-2-70b", "qkv", 10240, 8192), ("llama-2-70b", "o", 8192, 8192), ("llama-2-70b", "gate_up", 57344, 8192),
    ("llama-2-70b", "down", 8192, 28672),
]
TARGET_MODELS = ("llama-2-7b", "llama-3-8b", "llama-2-70b")
M_LIST = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
ROTATE_BYTES = 256 << 20  # rotate buffer sets until they span this much (5x the H100's L2)
FP8 = torch.float8_e4m3fn


def commit() -> str:
    if os.environ.get("ATOM_COMMIT"):
        return os.environ["ATOM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic FP8 (what vLLM does for W8A8-FP8 with per-token activation scales)."""
    s = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 448.0
    return (x.float() / s).clamp(-448.0, 448.0).to(FP8), s


def time_us(fn, sets: list) -> float:
    """Median GPU microseconds per call of fn(*sets[i]) cycling through the buffer sets.

    Every call is timed inside a CUDA graph, so the host's launch cost never shows: a first
    graph of len(sets) calls estimates the time per call, and a second one of enough calls for
    about 3 ms is replayed 5 times between events. (Timing eager calls one by one, as an earlier
    version did above 200 us per call, put 150-250 us host stalls into some H100 rows.)"""
    for s in sets[:2]:
        fn(*s)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def graph_of(reps: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*sets[0])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fn(*sets[i % len(sets)])
        graph.replay()
        return graph

    def replay_us(graph: torch.cuda.CUDAGraph, reps: int) -> float:
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / reps

    reps = len(sets)
    graph = graph_of(reps)
    est = replay_us(graph, reps)
    more = max(len(sets), min(200, math.ceil(3000 / max(est, 1.0))))
    if more != reps:
        del graph
        reps, graph = more, graph_of(more)
    times = [replay_us(graph, reps) for _ in range(5)]
    del graph
    return statistics.median(times)


def copy_gbps() -> float:
    """HBM bandwidth of a device-to-device copy of 1 GiB (read + write bytes, GB/s): the better of
    cudaMemcpy (tensor.copy_) and an elementwise kernel (torch.neg)."""
    src = torch.zeros(1 << 29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    us = min(time_us(lambda a, b: b.copy_(a), [(src, dst)]), time_us(lambda a, b: torch.neg(a, out=b), [(src, dst)]))
    del src, dst
    return 2 * (1 << 30) / us / 1e3


def _vllm_fp8():
    """(quant, gemm) of vLLM's FP8 W8A8 path, or None without vLLM."""
    try:
        from vllm import _custom_ops as vops
    except Exception as e:  # noqa: BLE001  (any import failure: the peer is just absent)
        print(f"vLLM FP8 kernels unavailable: {e}")
        return None
    return vops


def _marlin(w_bf16: torch.Tensor):
    """A callable x -> y through vLLM's GPTQ Marlin W4A16 (4 bit, group 128), or None."""
    try:
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.scalar_type import scalar_types
    except Exception as e:  # noqa: BLE001
        print(f"Marlin unavailable: {e}")
        return None
    n, k = w_bf16.shape
    _, qw, s, g_idx, sort_idx, _ = marlin_quantize(w_bf16.T.contiguous(), scalar_types.uint4b8, 128, False)
    ws = mu.marlin_make_workspace_new(w_bf16.device)
    empty = mu.marlin_make_empty_g_idx(w_bf16.device)

    def fn(x):
        return mu.apply_gptq_marlin_linear(x, qw, s, empty, empty, empty, ws, scalar_types.uint4b8, n, k, True)

    return fn


def bench_shape(n: int, k: int, m_list: list[int], fp8_quant_c, sweep_splits: bool = False,
                sweep_ks: int | None = None, sweep_stages: list[int] | None = None,
                sweep_width: tuple[int, ...] = ()) -> list[dict]:
    cfg = AtomConfig()
    o = cfg.outliers_for(k)
    kn = k - o
    dev = "cuda"
    sm90 = ops.use_sm90(torch.device(dev))
    vops = _vllm_fp8()
    w_bytes = n * k  # bf16 weight is the largest of the three
    n_w = max(1, min(8, math.ceil(ROTATE_BYTES / (2 * w_bytes))))
    weights = []
    for i in range(n_w):
        wb = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
        ws = wb.abs().amax(1).float() / 448.0
        w = dict(
            bf16=wb, fp8=(wb.float() / ws[:, None]).to(FP8), fp8_scale=ws[None, :].contiguous(),
            qweight=torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, device=dev),
            w_scale=(torch.rand(n, kn // 128, device=dev) * 0.01 + 1e-3).half(),
            w_outlier=torch.randint(-127, 128, (n, o), dtype=torch.int8, device=dev),
            w_outlier_scale=(torch.rand(n, 1, device=dev) * 0.01 + 1e-3).half(),
            reorder=torch.randperm(k, device=dev).to(torch.int32))
        if sm90:
            w["wpack"] = layout.prepack_sm90(w["qweight"], w["w_scale"], w["w_outlier"], w["w_outlier_scale"])
        w["marlin"] = _marlin(wb) if i == 0 or weights[0]["marlin"] is not None else None
        weights.append(w)
    w0 = weights[0]
    ops.prepare_atom_linear(w0["qweight"], w0["w_scale"], w0["w_outlier"], w0["w_outlier_scale"], w0["reorder"],
                            torch.bfloat16)
    if sm90:
        ops.prepare_atom_linear_sm90(w0["wpack"], n, w0["reorder"], torch.bfloat16)
    _, ka, steps = layout.sizes(k, o)
    atom_w_bytes = n * (kn // 2 + 2 * (kn // 128) + o + 2)
    rows = []
    for m in m_list:
        n_sets = max(n_w, min(8, math.ceil(ROTATE_BYTES / (2 * m * k + 2 * m * n))))
        sets = []
        for i in range(n_sets):
            w = weights[i % n_w]
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            qa, sa = torch.ops.vllm_atom.quantize_act(x, w["reorder"], o, cfg.a_clip, sm90)
            xq, xs = fp8_quant(x)
            sets.append((x, w, qa, sa, xq, xs))

        def atom(x, w, *_):
            if sm90:
                return torch.ops.vllm_atom.atom_linear_sm90(x, w["wpack"], w["reorder"], None, n, o, cfg.a_clip)
            return atom_mma(x, w)

        def atom_mma(x, w, *_):
            return torch.ops.vllm_atom.atom_linear(x, w["qweight"], w["w_scale"], w["w_outlier"],
                                                   w["w_outlier_scale"], w["reorder"], None, cfg.a_clip)

        def atom_gemm(x, w, qa, sa, *_):
            if sm90:
                return torch.ops.vllm_atom.w4a4_gemm_sm90(qa, sa, w["wpack"], None, n, torch.bfloat16)
            return torch.ops.vllm_atom.w4a4_gemm(qa, sa, w["qweight"], w["w_scale"], w["w_outlier"],
                                                 w["w_outlier_scale"], None, torch.bfloat16)

        def atom_quant(x, w, *_):
            return torch.ops.vllm_atom.quantize_act(x, w["reorder"], o, cfg.a_clip, sm90)

        def bf16(x, w, *_):
            return torch.nn.functional.linear(x, w["bf16"])

        def fp8_torch(x, w, *_):
            xq, xs = fp8_quant_c(x)
            return torch._scaled_mm(xq, w["fp8"].T, scale_a=xs, scale_b=w["fp8_scale"], out_dtype=torch.bfloat16)

        def fp8_cutlass(x, w, *_):
            xq, xs = vops.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
            return vops.cutlass_scaled_mm(xq, w["fp8"].T, xs, w["fp8_scale"], torch.bfloat16)

        def fp8_gemm(x, w, qa, sa, xq, xs):
            return torch._scaled_mm(xq, w["fp8"].T, scale_a=xs, scale_b=w["fp8_scale"], out_dtype=torch.bfloat16)

        def marlin(x, w, *_):
            return w["marlin"](x)

        io = 2 * m * k + 2 * m * n  # bf16 activations in, bf16 out
        impls = [("atom", atom, atom_w_bytes + io), ("bf16", bf16, 2 * n * k + io),
                 ("fp8_torch", fp8_torch, n * k + io), ("atom_gemm", atom_gemm, atom_w_bytes + m * ka + 2 * m * n),
                 ("atom_quant", atom_quant, 2 * m * k + m * ka), ("fp8_gemm", fp8_gemm, n * k + m * k + 2 * m * n)]
        if sm90:
            impls.append(("atom_mma", atom_mma, atom_w_bytes + io))
        if vops is not None:
            impls.append(("fp8_cutlass", fp8_cutlass, n * k + io))
        if w0["marlin"] is not None:
            impls.append(("marlin", marlin, n * k // 2 + n * (k // 128) * 2 + io))
        for name, fn, nbytes in impls:
            try:
                us = time_us(fn, sets)
            except Exception as e:  # noqa: BLE001  (a peer kernel that rejects the shape)
                print(f"{name} M={m} N={n} K={k}: {type(e).__name__}: {e}")
                continue
            rows.append(dict(M=m, N=n, K=k, impl=name, time_us=round(us, 3), hbm_bytes=nbytes,
                             gbps=round(nbytes / us / 1e3, 1), tops=round(2 * m * n * k / us / 1e6, 1)))
        if sweep_splits and sm90 and m <= gemm_plan.SM90_MID_MAX_M:
            bn = gemm_plan.sm90_width(m)
            saved = gemm_plan.SM90_TUNED.pop((bn, n, k), None)
            saved_mid = gemm_plan.SM90_MID_TUNED.pop((gemm_plan.sm90_mid_bucket(m), n, k), None)  # picked: the model's
            picked = gemm_plan.sm90_plan(m, n, k, steps, torch.cuda.get_device_properties(0).multi_processor_count,
                                         cuda_ops._cluster_slots(0))[0]
            for c in gemm_plan.sm90_candidates(m, pipe=True):
                if (c.cs > 1 and steps < 2 * c.cs) or (sweep_ks is not None and c.ks != sweep_ks):
                    continue
                gemm_plan.SM90_TUNED[(bn, n, k)] = (c.wgc, c.cs, c.ks, c.pipe)
                us = time_us(atom_gemm, sets)
                rows.append(dict(M=m, N=n, K=k, impl=f"atom_gemm_w{c.wgc}c{c.cs}" + (f"k{c.ks}" if c.ks > 1 else "")
                                 + ("p" if c.pipe else ""), time_us=round(us, 3),
                                 picked=c == picked._replace(lean=0)))  # (candidates leave LEAN to the plan)
            del gemm_plan.SM90_TUNED[(bn, n, k)]
            if saved:
                gemm_plan.SM90_TUNED[(bn, n, k)] = saved
            if saved_mid:
                gemm_plan.SM90_MID_TUNED[(gemm_plan.sm90_mid_bucket(m), n, k)] = saved_mid
        for width_ in sweep_width if sm90 else ():  # every (wgc, cs, ks) of other tile widths at this M
            width, saved = gemm_plan.sm90_width, dict(gemm_plan.SM90_TUNED)
            gemm_plan.sm90_width = lambda _m, w=width_: w
            try:
                for c in gemm_plan.sm90_candidates(m, pipe=True):
                    if c.cs > 1 and steps < 2 * c.cs:
                        continue
                    gemm_plan.SM90_TUNED[(width_, n, k)] = (c.wgc, c.cs, c.ks, c.pipe)
                    rows.append(dict(M=m, N=n, K=k, impl=f"atom_gemm_b{c.bn}w{c.wgc}c{c.cs}k{c.ks}" + ("p" if c.pipe else ""),
                                     time_us=round(time_us(atom_gemm, sets), 3)))
            finally:
                gemm_plan.sm90_width = width
                gemm_plan.SM90_TUNED.clear()
                gemm_plan.SM90_TUNED.update(saved)
        if sweep_stages and sm90 and m <= 256:  # the plan's config with other pipeline depths
            seen = set()
            for cap in sweep_stages:
                gemm_plan.SM90_MAX_STAGES = cap
                stages = gemm_plan.sm90_plan(m, n, k, steps, torch.cuda.get_device_properties(0).multi_processor_count,
                                             cuda_ops._cluster_slots(0))[0].stages
                if stages not in seen:
                    seen.add(stages)
                    rows.append(dict(M=m, N=n, K=k, impl=f"atom_gemm_s{stages}", time_us=round(time_us(atom_gemm, sets), 3)))
            gemm_plan.SM90_MAX_STAGES = None
        del sets
        torch.cuda.empty_cache()
    return rows


def geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def with_fp8(rows: list[dict]) -> list[dict]:
    """Add the "fp8" rows: per (M, N, K) the faster of fp8_torch and fp8_cutlass."""
    best: dict = {}
    for r in rows:
        if r["impl"] in ("fp8_torch", "fp8_cutlass"):
            key = (r["M"], r["N"], r["K"])
            if key not in best or r["time_us"] < best[key]["time_us"]:
                best[key] = r
    return rows + [dict(r, impl="fp8", source=r["impl"]) for r in best.values()]


def summarize(rows, shapes, copy: float) -> dict:
    t = {(r["M"], r["N"], r["K"], r["impl"]): r["time_us"] for r in rows}
    target = [(n, k) for model, _, n, k in shapes if model in TARGET_MODELS]
    out = {"copy_gbps": round(copy, 1)}
    buckets = (("M=1", (1,)), ("M=16", (16,)), ("M=32", (32,)), ("M=64", (64,)), ("M=128", (128,)),
               ("M=256", (256,)), ("M>=1024", (1024, 2048, 4096, 8192)))
    for label, ms in buckets:
        for base in ("bf16", "fp8", "marlin"):
            sp = [t[(m, n, k, base)] / t[(m, n, k, "atom")] for m in ms for n, k in target
                  if (m, n, k, "atom") in t and (m, n, k, base) in t]
            if sp:
                out[f"{label} atom speedup vs {base}"] = round(geomean(sp), 3)
    tops = [2 * m * n * k / t[(m, n, k, "atom_gemm")] / 1e6 for m in (4096, 8192) for n, k in target
            if (m, n, k, "atom_gemm") in t]
    if tops:
        out["M>=4096 atom_gemm TOPS (geomean)"] = round(geomean(tops), 1)
    by = {(r["M"], r["N"], r["K"], r["impl"]): r for r in rows}
    for m in (1, 16):
        bw = [by[(m, n, k, "atom")]["gbps"] for n, k in target if (m, n, k, "atom") in by]
        if bw:
            out[f"M={m} atom weight stream GB/s (geomean)"] = round(geomean(bw), 1)
            out[f"M={m} atom weight stream / copy"] = round(geomean(bw) / copy, 3)
    bw = [by[(m, n, k, "atom_quant")]["gbps"] for m in (1024, 4096, 8192) for n, k in target
          if (m, n, k, "atom_quant") in by]
    if bw:
        out["M>=1024 atom_quant GB/s (geomean)"] = round(geomean(bw), 1)
    return out


def plot(rows, shapes, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = {(r["M"], r["N"], r["K"], r["impl"]): r["time_us"] for r in rows}
    bases = [b for b in ("bf16", "fp8", "marlin") if any(r["impl"] == b for r in rows)]
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4.5), sharey=True)
    for ax, base in zip(axes, bases):
        for model in dict.fromkeys(s[0] for s in shapes):
            nk = [(n, k) for mo, _, n, k in shapes if mo == model]
            ms = sorted({r["M"] for r in rows})
            ys = [geomean([t[(m, n, k, base)] / t[(m, n, k, "atom")] for n, k in nk
                           if (m, n, k, "atom") in t and (m, n, k, base) in t]) for m in ms]
            ax.plot(ms, ys, marker="o", label=model)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"Atom linear speedup over {base}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup (x, geomean of layers)")
    axes[0].legend(fontsize=8)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile(n: int = 4096, k: int = 4096, m_list=(1, 16, 256, 8192)) -> None:
    """One GEMM per M between cudaProfilerStart/Stop, for `ncu --profile-from-start off`."""
    o = AtomConfig().outliers_for(k)
    kn = k - o
    w = dict(qweight=torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, device="cuda"),
             w_scale=(torch.rand(n, kn // 128, device="cuda") * 0.01).half(),
             w_outlier=torch.randint(-127, 128, (n, o), dtype=torch.int8, device="cuda"),
             w_outlier_scale=(torch.rand(n, 1, device="cuda") * 0.01).half())
    reorder = torch.randperm(k, device="cuda").to(torch.int32)
    sm90 = ops.use_sm90(torch.device("cuda"))
    wpack = layout.prepack_sm90(*w.values()) if sm90 else None

    def gemm(qa, sa):
        if sm90:
            return torch.ops.vllm_atom.w4a4_gemm_sm90(qa, sa, wpack, None, n, torch.bfloat16)
        return torch.ops.vllm_atom.w4a4_gemm(qa, sa, *w.values(), None, torch.bfloat16)

    for m in m_list:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        qa, sa = torch.ops.vllm_atom.quantize_act(x, reorder, o, 0.9, sm90)
        for _ in range(2):
            gemm(qa, sa)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        gemm(qa, sa)
        torch.ops.vllm_atom.quantize_act(x, reorder, o, 0.9, sm90)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def _widths(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in text.split(","))
    bad = [w for w in widths if w not in gemm_plan.SM90_ALL_WIDTHS]
    if bad:
        raise argparse.ArgumentTypeError(f"not a tile width: {bad} (widths: {gemm_plan.SM90_ALL_WIDTHS})")
    return widths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="a few shapes and sizes only")
    ap.add_argument("--all-models", action="store_true", help="also SmolLM2 and Qwen2.5 layers")
    ap.add_argument("--sweep-splits", action="store_true",
                    help="also time every sm90 config of M's width at M <= 1024 (SM90_MID_MAX_M), PIPE ones too (rows "
                    "atom_gemm_w<wgc>c<cs>[k2][p])")
    ap.add_argument("--sweep-ks", type=int, help="with --sweep-splits: only the configs with this many "
                    "consumer warpgroups per slab (the atom_gemm row is the table's pick)")
    ap.add_argument("--sweep-stages", help="comma-separated stage caps: also time the plan's sm90 config at M <= 256 "
                    "with each (rows atom_gemm_s<stages>; as many as fit in shared memory)")
    ap.add_argument("--sweep-width", type=_widths, default=(),
                    help="comma-separated tile widths (tokens per CTA, of SM90_ALL_WIDTHS): also "
                    "time every sm90 config of each at every M (rows atom_gemm_b<width>w<wgc>c<cs>k<ks>[p], p: PIPE; "
                    "e.g. 64,96 at M >= 256, where the plan's width is 128)")
    ap.add_argument("--m-list", help="comma-separated M values (default: all of M_LIST)")
    ap.add_argument("--profile", action="store_true", help="only run the kernels to profile (ncu)")
    args = ap.parse_args()
    if args.profile:
        return profile(m_list=[int(m) for m in args.m_list.split(",")] if args.m_list else (1, 16, 256, 8192))
    torch.manual_seed(0)
    shapes = SHAPES if args.all_models else [s for s in SHAPES if s[0] in TARGET_MODELS]
    m_list = M_LIST
    if args.quick:
        shapes = [s for s in shapes if s[1] in ("o", "down")]
        m_list = [1, 16, 64, 256, 1024, 8192]
    if args.m_list:
        m_list = [int(v) for v in args.m_list.split(",")]
    fp8_quant_c = torch.compile(fp8_quant, dynamic=True)
    device = torch.cuda.get_device_name()
    copy = copy_gbps()
    print(f"device copy: {copy:.0f} GB/s", flush=True)
    rows = []
    for model, layer, n, k in shapes:
        rows += bench_shape(n, k, m_list, fp8_quant_c, args.sweep_splits, args.sweep_ks,
                            [int(v) for v in args.sweep_stages.split(",")] if args.sweep_stages else None,
                            args.sweep_width)
        print(f"{model} {layer} N={n} K={k} done", flush=True)
    rows = with_fp8(rows)
    main_rows = [r for r in rows if r["impl"] in ("atom", "bf16", "fp8", "marlin")]
    detail = [r for r in rows if r not in main_rows]
    summary = summarize(rows, shapes, copy)
    tag = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gemm-{tag}.json").write_text(json.dumps(
        dict(device=device, commit=commit(), torch=torch.__version__, cuda=torch.version.cuda,
             sm90_tuned={f"{k[0]},{k[1]},{k[2]}": v for k, v in gemm_plan.SM90_TUNED.items()},
             sm90_mid_tuned={f"{k[0]},{k[1]},{k[2]}": v for k, v in gemm_plan.SM90_MID_TUNED.items()},
             cluster_slots=cuda_ops._cluster_slots(0) if ops.use_sm90(torch.device("cuda")) else None,
             summary=summary, rows=main_rows, detail=detail), indent=1))
    plot(rows, shapes, out / f"gemm-{tag}.png", device)
    t = {(r["M"], r["N"], r["K"], r["impl"]): r["time_us"] for r in rows}
    print(f"\n{device}  (us; atom = quantize + GEMM)")
    cols = ("atom", "atom_gemm", "atom_quant", "atom_mma", "bf16", "fp8_torch", "fp8_cutlass", "marlin")
    print(f"{'shape':>20} {'M':>5} " + " ".join(f"{c[:10]:>10}" for c in cols) + f" {'x fp8':>6} {'x bf16':>6}")
    for model, layer, n, k in shapes:
        for m in m_list:
            g = lambda i: t.get((m, n, k, i), float("nan"))  # noqa: E731
            print(f"{model[:11] + ' ' + layer:>20} {m:>5} " + " ".join(f"{g(c):10.1f}" for c in cols)
                  + f" {g('fp8') / g('atom'):6.2f} {g('bf16') / g('atom'):6.2f}")
    if args.sweep_stages:
        print("\nsm90 pipeline depth (us of atom_gemm with s stages; atom_gemm = the shipped depth)")
        for model, layer, n, k in shapes:
            for m in m_list:
                ss = [r for r in rows if (r["M"], r["N"], r["K"]) == (m, n, k) and r["impl"].startswith("atom_gemm_s")]
                if ss:
                    print(f"{model[:11] + ' ' + layer:>20} {m:>5} atom_gemm={t[(m, n, k, 'atom_gemm')]:.1f} "
                          + " ".join(f"s{r['impl'][11:]}={r['time_us']:.1f}" for r in ss))
    if args.sweep_splits:
        print("\nsm90 configs (us of atom_gemm per warpgroups w x cluster split c; * = the plan's pick)")
        for model, layer, n, k in shapes:
            for m in m_list:
                cs = [r for r in rows if (r["M"], r["N"], r["K"]) == (m, n, k) and r["impl"].startswith("atom_gemm_w")]
                if cs:
                    print(f"{model[:11] + ' ' + layer:>20} {m:>5} " + " ".join(
                        f"{r['impl'][10:]}={r['time_us']:.1f}{'*' if r['picked'] else ''}" for r in cs))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
