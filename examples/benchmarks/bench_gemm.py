"""Atom linear (activation quantization + W4A4 GEMM) against torch BF16 and FP8 on one GPU.

Rows: impl "atom" = torch.ops.vllm_atom.atom_linear (quantize + GEMM, the full cost of an Atom
linear); "bf16" = torch.nn.functional.linear; "fp8" = per-token dynamic FP8 quantization
(one fused torch.compile'd kernel) + torch._scaled_mm with per-token x per-channel scales.
Extra rows (key "detail"): atom_gemm (GEMM on pre-quantized input), atom_quant (activation
quantization alone, with its HBM bandwidth), fp8_gemm (_scaled_mm alone).
Timing: calls are captured in a CUDA graph of many calls over rotated buffers (so weights
are not served from L2) and the graph replays are timed with events (`time_us`). Median of 5. Writes results/gemm-<gpu>.json and .png.

    python examples/benchmarks/bench_gemm.py [--quick] [--out DIR]
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
from vllm_atom.kernels import layout, ops  # noqa: E402

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
M_LIST = [1, 16, 64, 256, 1024, 4096, 8192]
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


def bench_shape(n: int, k: int, m_list: list[int], fp8_quant_c) -> list[dict]:
    cfg = AtomConfig()
    o = cfg.outliers_for(k)
    kn = k - o
    dev = "cuda"
    w_bytes = n * k  # bf16 weight is the largest of the three
    n_w = max(1, min(8, math.ceil(ROTATE_BYTES / (2 * w_bytes))))
    weights = []
    for _ in range(n_w):
        wb = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(torch.bfloat16)
        ws = wb.abs().amax(1).float() / 448.0
        weights.append(dict(
            bf16=wb, fp8=(wb.float() / ws[:, None]).to(FP8), fp8_scale=ws[None, :].contiguous(),
            qweight=torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, device=dev),
            w_scale=(torch.rand(n, kn // 128, device=dev) * 0.01 + 1e-3).half(),
            w_outlier=torch.randint(-127, 128, (n, o), dtype=torch.int8, device=dev),
            w_outlier_scale=(torch.rand(n, 1, device=dev) * 0.01 + 1e-3).half(),
            reorder=torch.randperm(k, device=dev).to(torch.int32)))
    w0 = weights[0]
    ops.prepare_atom_linear(w0["qweight"], w0["w_scale"], w0["w_outlier"], w0["w_outlier_scale"], w0["reorder"],
                            torch.bfloat16)
    rows = []
    for m in m_list:
        n_sets = max(n_w, min(8, math.ceil(ROTATE_BYTES / (2 * m * k + 2 * m * n))))
        sets = []
        for i in range(n_sets):
            w = weights[i % n_w]
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            qa, sa = torch.ops.vllm_atom.quantize_act(x, w["reorder"], o, cfg.a_clip)
            xq, xs = fp8_quant(x)
            sets.append((x, w, qa, sa, xq, xs))

        def atom(x, w, *_):
            return torch.ops.vllm_atom.atom_linear(x, w["qweight"], w["w_scale"], w["w_outlier"],
                                                   w["w_outlier_scale"], w["reorder"], None, cfg.a_clip)

        def atom_gemm(x, w, qa, sa, *_):
            return torch.ops.vllm_atom.w4a4_gemm(qa, sa, w["qweight"], w["w_scale"], w["w_outlier"],
                                                 w["w_outlier_scale"], None, torch.bfloat16)

        def atom_quant(x, w, *_):
            return torch.ops.vllm_atom.quantize_act(x, w["reorder"], o, cfg.a_clip)

        def bf16(x, w, *_):
            return torch.nn.functional.linear(x, w["bf16"])

        def fp8(x, w, *_):
            xq, xs = fp8_quant_c(x)
            return torch._scaled_mm(xq, w["fp8"].T, scale_a=xs, scale_b=w["fp8_scale"], out_dtype=torch.bfloat16)

        def fp8_gemm(x, w, qa, sa, xq, xs):
            return torch._scaled_mm(xq, w["fp8"].T, scale_a=xs, scale_b=w["fp8_scale"], out_dtype=torch.bfloat16)

        for name, fn in (("atom", atom), ("bf16", bf16), ("fp8", fp8), ("atom_gemm", atom_gemm),
                         ("atom_quant", atom_quant), ("fp8_gemm", fp8_gemm)):
            us = time_us(fn, sets)
            rows.append(dict(M=m, N=n, K=k, impl=name, us=round(us, 3)))
        del sets
        torch.cuda.empty_cache()
    return rows


def geomean(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def summarize(rows, shapes) -> dict:
    t = {(r["M"], r["N"], r["K"], r["impl"]): r["us"] for r in rows}
    target = [(n, k) for model, _, n, k in shapes if model in TARGET_MODELS]
    out = {}
    for label, ms in (("M<=16", (1, 16)), ("M>=1024", (1024, 4096, 8192))):
        for base in ("bf16", "fp8"):
            sp = [t[(m, n, k, base)] / t[(m, n, k, "atom")] for m in ms for n, k in target if (m, n, k, "atom") in t]
            out[f"{label} atom speedup vs {base}"] = round(geomean(sp), 3)
    tops = [2 * m * n * k / t[(m, n, k, "atom_gemm")] / 1e6 for m in (4096, 8192) for n, k in target
            if (m, n, k, "atom_gemm") in t]
    out["M>=4096 atom_gemm TOPS (geomean)"] = round(geomean(tops), 1)
    bw = []
    for m in (1024, 4096, 8192):
        for n, k in target:
            if (m, n, k, "atom_quant") in t:
                o = AtomConfig().outliers_for(k)
                _, ka, steps = layout.sizes(k, o)
                bw.append((2 * m * k + m * ka + 4 * m * steps + 4 * k) / t[(m, n, k, "atom_quant")] / 1e3)
    out["M>=1024 atom_quant GB/s (geomean)"] = round(geomean(bw), 1)
    return out


def plot(rows, shapes, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = {(r["M"], r["N"], r["K"], r["impl"]): r["us"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, base in zip(axes, ("bf16", "fp8")):
        for model in dict.fromkeys(s[0] for s in shapes):
            nk = [(n, k) for mo, _, n, k in shapes if mo == model]
            ms = sorted({r["M"] for r in rows})
            ys = [geomean([t[(m, n, k, base)] / t[(m, n, k, "atom")] for n, k in nk if (m, n, k, "atom") in t])
                  for m in ms]
            ax.plot(ms, ys, marker="o", label=model)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"Atom linear speedup over {base} (geomean of layers)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[0].legend(fontsize=8)
    fig.suptitle(device)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def profile(n: int = 4096, k: int = 4096, m_list=(1, 8192)) -> None:
    """One GEMM per M between cudaProfilerStart/Stop, for `ncu --profile-from-start off`."""
    o = AtomConfig().outliers_for(k)
    kn = k - o
    w = dict(qweight=torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, device="cuda"),
             w_scale=(torch.rand(n, kn // 128, device="cuda") * 0.01).half(),
             w_outlier=torch.randint(-127, 128, (n, o), dtype=torch.int8, device="cuda"),
             w_outlier_scale=(torch.rand(n, 1, device="cuda") * 0.01).half())
    reorder = torch.randperm(k, device="cuda").to(torch.int32)
    for m in m_list:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        qa, sa = torch.ops.vllm_atom.quantize_act(x, reorder, o, 0.9)
        for _ in range(2):
            torch.ops.vllm_atom.w4a4_gemm(qa, sa, *w.values(), None, torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        torch.ops.vllm_atom.w4a4_gemm(qa, sa, *w.values(), None, torch.bfloat16)
        torch.ops.vllm_atom.quantize_act(x, reorder, o, 0.9)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--quick", action="store_true", help="a few shapes and sizes only")
    ap.add_argument("--profile", action="store_true", help="only run the kernels to profile (ncu)")
    args = ap.parse_args()
    if args.profile:
        return profile()
    torch.manual_seed(0)
    shapes = SHAPES
    m_list = M_LIST
    if args.quick:
        shapes = [s for s in SHAPES if s[1] in ("o", "down") and s[0] in TARGET_MODELS]
        m_list = [1, 16, 1024, 8192]
    fp8_quant_c = torch.compile(fp8_quant, dynamic=True)
    device = torch.cuda.get_device_name()
    rows = []
    for model, layer, n, k in shapes:
        rows += bench_shape(n, k, m_list, fp8_quant_c)
        print(f"{model} {layer} N={n} K={k} done", flush=True)
    main_rows = [r for r in rows if r["impl"] in ("atom", "bf16", "fp8")]
    detail = [r for r in rows if r not in main_rows]
    summary = summarize(rows, shapes)
    tag = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gemm-{tag}.json").write_text(json.dumps(
        dict(device=device, commit=commit(), torch=torch.__version__, cuda=torch.version.cuda,
             summary=summary, rows=main_rows, detail=detail), indent=1))
    plot(rows, shapes, out / f"gemm-{tag}.png", device)
    t = {(r["M"], r["N"], r["K"], r["impl"]): r["us"] for r in rows}
    print(f"\n{device}  (us; atom = quantize + GEMM)")
    print(f"{'shape':>22} {'M':>5} {'atom':>9} {'gemm':>9} {'quant':>8} {'bf16':>9} {'fp8':>9} {'fp8mm':>9} "
          f"{'x bf16':>6} {'x fp8':>6}")
    for model, layer, n, k in shapes:
        for m in m_list:
            g = lambda i: t[(m, n, k, i)]  # noqa: E731
            print(f"{model[:12] + ' ' + layer:>22} {m:>5} {g('atom'):9.1f} {g('atom_gemm'):9.1f} "
                  f"{g('atom_quant'):8.1f} {g('bf16'):9.1f} {g('fp8'):9.1f} {g('fp8_gemm'):9.1f} "
                  f"{g('bf16') / g('atom'):6.2f} {g('fp8') / g('atom'):6.2f}")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
