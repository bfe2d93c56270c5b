"""Where one decode step's GPU time goes, for Atom and FP8 in vLLM: GEMM, quantization, attention, the rest.

Each config runs in its own process (one engine each): a model shape of bench_e2e.py with dummy
weights, vLLM's torch profiler (``profiler_config``, `LLM.start_profile` / `stop_profile`) around
one batch of BATCH prompts of 16 tokens decoding STEPS tokens (after a warm-up), CUDA graphs and
torch.compile on as in serving. The worker's trace is read back and every GPU kernel is put in a
category by its name (`CATEGORIES`, first match wins); times are per decode step (the whole
profiled generate / STEPS, so the one 16-token prefill is spread over the steps).

    python examples/benchmarks/profile_decode.py [--configs fp8,atom-kv4,atom-kv4-nofuse]
        [--model llama-2-7b] [--batch 1] [--steps 64] [--out DIR]

Writes DIR/profile-decode-<gpu>.json (per config: µs per step by category, kernel launches per
step, the 12 costliest kernels) and prints one table. atom-kv4-nofuse: Atom + INT4 KV with
VLLM_ATOM_FUSION=0 (the quantization in its own launch before every linear).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e  # noqa: E402  (standard library only)

# (category, regex on the lower-cased kernel name); the first that matches
CATEGORIES = (
    ("atom quantize (+ fused norm / SiLU)", r"act_quant"),
    ("atom gemm", r"w4a4_sm90|w4a4_gemm"),
    ("attention", r"kv_int4|flash|attn|attention|paged|reshape_and_cache|concat_and_cache|fmha"),
    ("fp8 quantize", r"scaled_fp8_quant|per_token_quant|dynamic.*quant|quant_fp8|fp8_quant"),
    ("gemm (fp8 / bf16 / lm_head)", r"gemm|cutlass|xmma|nvjet|sm90_.*_tn|cublas|matmul|splitk"),
    ("norm / activation / residual (Triton, vLLM)", r"triton_|rms|silu|act_and_mul|fused_add"),
)
CONFIGS = {"fp8": ("fp8", {}), "atom-kv4": ("atom-kv4", {}),
           "atom-kv4-nofuse": ("atom-kv4", {"VLLM_ATOM_FUSION": "0"}), "bf16": ("bf16", {})}


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, pat in CATEGORIES if re.search(pat, low)), "other")


def kernel_events(trace: dict) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel in a Chrome trace of the torch profiler."""
    return [(e["name"], float(e.get("dur", 0.0))) for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") == "kernel"]


def summarize(events: list[tuple[str, float]], steps: int) -> dict:
    """Per step: µs by category, kernel launches, and the costliest kernels."""
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, us in events:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + us
        by_name.setdefault(name, []).append(us)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    return {"us_per_step": {c: round(v / steps, 2) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "total_us_per_step": round(sum(by_cat.values()) / steps, 2),
            "kernels_per_step": round(len(events) / steps, 1),
            "top_kernels": [{"name": n[:120], "category": category(n), "us_per_step": round(sum(v) / steps, 2),
                             "calls_per_step": round(len(v) / steps, 2)} for n, v in top]}


def read_trace(trace_dir: Path) -> list[tuple[str, float]]:
    """The kernels of the trace under trace_dir with the most of them (vLLM also writes the engine
    process's CPU-only trace there); traces are ``*.json`` or ``*.json.gz``."""
    best: list[tuple[str, float]] = []
    for p in trace_dir.rglob("*"):
        if p.name.endswith((".json", ".json.gz")):
            raw = p.read_bytes()
            events = kernel_events(json.loads(gzip.decompress(raw) if p.name.endswith(".gz") else raw))
            best = max(best, events, key=len)
    if not best:
        raise SystemExit(f"no GPU kernels in the profiler traces under {trace_dir}")
    return best


def child(args) -> None:
    """One config in this process: warm up, profile one generate, print the summary as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, extra, trace_dir = args.child
    extra = json.loads(extra)
    kw = dict(zip((a.lstrip("-").replace("-", "_") for a in extra[::2]), extra[1::2]))
    llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", max_model_len=1024,
              gpu_memory_utilization=0.5, enable_prefix_caching=False, seed=0,
              # graphs only for the profiled batch (and 1): the step is the same, start-up shorter
              compilation_config={"cudagraph_capture_sizes": sorted({1, args.batch})},
              profiler_config={"profiler": "torch", "torch_profiler_dir": trace_dir, "ignore_frontend": True,
                               "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False,
                               "torch_profiler_dump_cuda_time_total": False}, **kw)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 10 for j in range(16)]) for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    llm.start_profile()
    llm.generate(prompts, params, use_tqdm=False)
    llm.stop_profile()
    print("PROFILE " + json.dumps(summarize(read_trace(Path(trace_dir)), args.steps)), flush=True)
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="fp8,atom-kv4,atom-kv4-nofuse", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--model", default="llama-2-7b", choices=list(bench_e2e.MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--tokenizer", default="/tmp/atom-tiny-tokenizer")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    tok = Path(args.tokenizer)
    bench_e2e.ensure_tokenizer(tok, dry_run=False)
    root = Path(tempfile.mkdtemp(prefix="profile-decode-"))
    device = (bench_e2e.gpu_info() or ("unknown GPU", 0))[0]
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.configs.split(","):
        cfg, env = CONFIGS[name]
        quant = bench_e2e.CONFIGS[cfg]
        model_dir = bench_e2e.write_model_dir(root, args.model, bench_e2e.MODELS[args.model], quant.checkpoint, tok)
        cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps),
               "--child", str(model_dir), json.dumps(list(quant.args)), str(root / f"trace-{name}")]
        # a session of its own, so that a timeout also ends the engine core it started (else it
        # keeps its GPU memory and the next config fails to start)
        # (the engine's log goes to a file as it is written: a run cut short by an outer limit
        # still shows how far it got)
        log_path = out / f"profile-decode-{name}.log"
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=log,
                                 text=True, start_new_session=True)
            try:
                stdout, _ = p.communicate(timeout=args.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                stdout, _ = p.communicate()
                timed_out = True
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        line = next((ln for ln in stdout.splitlines() if ln.startswith("PROFILE ")), None)
        if timed_out:
            row = {"error": f"timed out after {args.timeout:.0f} s", "stderr_tail": tail}
        else:
            row = json.loads(line[8:]) if line else {"error": (tail or ["?"])[-1][:300]}
        rows.append({"config": name, "model": args.model, "batch": args.batch, "steps": args.steps, **row})
        print(f"{name}: " + (json.dumps(row["us_per_step"]) if "us_per_step" in row else row["error"]), flush=True)
    path = out / f"profile-decode-{bench_e2e.gpu_tag(device)}.json"
    path.write_text(json.dumps({"device": device, "commit": bench_e2e.commit(), "vllm": bench_e2e.vllm_version(),
                                "rows": rows}, indent=1))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"\n{device}, {args.model}, batch {args.batch}: GPU µs per decode step")
    print(f"{'category':>44} " + " ".join(f"{r['config']:>16}" for r in rows))
    for c in cats + ["total"]:
        vals = [r.get("us_per_step", {}).get(c) if c != "total" else r.get("total_us_per_step") for r in rows]
        if any(v for v in vals):
            print(f"{c[:44]:>44} " + " ".join(f"{v or 0:16.1f}" for v in vals))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
