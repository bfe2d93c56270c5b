"""End-to-end suite of vLLM's own benchmarks: BF16, FP8, W4A16 (GPTQ Marlin) and Atom W4A4 on one GPU.

For each model shape (dummy weights, config.json written here), memory budget and quantization
config, one at a time, this runs `vllm bench throughput` (random prompts) and `vllm bench latency`
(one batch, 128 + 128), one engine per subprocess, each under a timeout. A run that times out or
fails becomes a row with "error"; a config whose weights do not fit the budget becomes a row with
"skipped". Rows are merged into ONE JSON per GPU (results/e2e-suite-<gpu>.json), keyed by
(model, config, util, workload, bench): a later call replaces its own rows and keeps the others,
so several device calls can fill one file. A PNG (throughput per config, per model and budget)
is drawn next to it.

Configs (CONFIGS): bf16; fp8 = `--quantization fp8 --kv-cache-dtype fp8`; w4a16 = a GPTQ
checkpoint (4 bit, group 128, sym) through Marlin (`--linear-backend marlin`: on sm_90 vLLM would
pick Machete); atom-kv4 = Atom + its INT4 KV cache; atom-fp8kv = Atom + FP8 KV; atom = Atom with
a 16-bit KV cache (not in the default set). Budgets: "24GiB" (gpu_memory_utilization = 24 GiB /
the GPU's memory) and 0.9. Workloads: throughput 512x256 and 4096x512 (in x out tokens),
latency lat-b1 and lat-b16 (batch 1 / 16, 128 in + 128 out). A config fits a budget when its
weights (linears in its format, embeddings and lm_head in bf16) + the KV cache of one
--max-model-len sequence + --headroom-gib do; e.g. Llama-2-70B BF16 (138 GB) does not fit 0.9 of
an H200.

Needs vLLM with this plugin registered (tests/gpu/e2e_bench_session.sh shows the set-up on the
GPU machine) and a tokenizer (default: the tiny one of .devbundle/make_tiny_llama.py).

    python examples/benchmarks/bench_e2e.py [--models llama-2-7b,...] [--configs bf16,fp8,...]
        [--budgets 24GiB,0.9] [--workloads 512x256,4096x512,lat-b1,lat-b16] [--timeout 540]
        [--budget-s S] [--skip-existing] [--out DIR] [--dry-run]
    python examples/benchmarks/bench_e2e.py --summary [results/e2e-suite-h200.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from vllm_atom.config import AtomConfig  # noqa: E402  (standard library only)

GIB = 1 << 30


# ---- what is benchmarked ----

@dataclass(frozen=True)
class Model:
    """A Llama shape (config.json fields); weights are vLLM's dummy ones."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(N, K) of one decoder layer's linears, as vLLM fuses them: qkv, o, gate_up, down."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [(h + 2 * kv, h), (h, h), (2 * self.intermediate, h), (h, self.intermediate)]


MODELS = {
    "llama-2-7b": Model(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000),
    "llama-3-8b": Model(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256,
                        rope_theta=500000.0),
    "llama-2-70b": Model(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=32000),
}


@dataclass(frozen=True)
class Quant:
    """One serving config: which checkpoint it loads, its vLLM flags, and its storage formats."""

    checkpoint: str  # "plain" | "gptq" | "atom": the model directory (config.json) it loads
    args: tuple[str, ...]
    weights: str  # linear weight format, see linear_bytes
    kv: str  # KV cache format, see KV_BYTES_PER_ELEMENT


KV4 = ("--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "CUSTOM")
CONFIGS = {
    "bf16": Quant("plain", (), "bf16", "bf16"),
    "fp8": Quant("plain", ("--quantization", "fp8", "--kv-cache-dtype", "fp8"), "fp8", "fp8"),
    "w4a16": Quant("gptq", ("--linear-backend", "marlin"), "w4a16", "bf16"),
    "atom-kv4": Quant("atom", KV4, "atom", "int4"),
    "atom-fp8kv": Quant("atom", ("--kv-cache-dtype", "fp8"), "atom", "fp8"),
    "atom": Quant("atom", (), "atom", "bf16"),
}
DEFAULT_CONFIGS = ("bf16", "fp8", "w4a16", "atom-kv4", "atom-fp8kv")
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


@dataclass(frozen=True)
class Workload:
    bench: str  # "throughput" | "latency"
    input_len: int
    output_len: int
    num_prompts: int = 0  # throughput
    batch_size: int = 0  # latency


WORKLOADS = {
    "512x256": Workload("throughput", 512, 256, num_prompts=300),
    "4096x512": Workload("throughput", 4096, 512, num_prompts=100),
    "lat-b1": Workload("latency", 128, 128, batch_size=1),
    "lat-b16": Workload("latency", 128, 128, batch_size=16),
}
LATENCY_ITERS = ("--num-iters-warmup", "3", "--num-iters", "10")
MAX_MODEL_LEN = 5120  # 4096 + 512, and room for special tokens
DEFAULT_BUDGETS = "24GiB,0.9"
HEADROOM_GIB = 3.0  # activations, CUDA graphs, the sampler: what a budget needs beyond weights + KV


# ---- memory: does a config fit a budget ----

def linear_bytes(fmt: str, n: int, k: int) -> float:
    """Bytes of one N x K linear's weights stored in format fmt."""
    if fmt == "bf16":
        return 2 * n * k
    if fmt == "fp8":
        return n * k + 4 * n  # + per-channel fp32 scales
    if fmt == "w4a16":
        return n * k / 2 + n * (k // 128) * (2 + 0.5)  # int4 + per-group fp16 scale and 4-bit zero
    if fmt == "atom":  # int4 groups + fp16 group scales, int8 outliers + fp16 scale, int32 reorder
        o = AtomConfig().outliers_for(k)
        return n * ((k - o) / 2 + 2 * (k - o) // 128 + o + 2) + 4 * k
    raise ValueError(f"unknown weight format {fmt!r}")


def weight_bytes(model: Model, quant: Quant) -> float:
    """All weights: the quantized linears plus embeddings, lm_head and norms in bf16 (vLLM
    quantizes neither the embeddings nor lm_head, for any of these configs)."""
    linears = model.layers * sum(linear_bytes(quant.weights, n, k) for n, k in model.linears())
    unquantized = 2 * (2 * model.vocab * model.hidden + (2 * model.layers + 1) * model.hidden)
    return linears + unquantized


KV_BYTES_PER_ELEMENT = {"bf16": 2.0, "fp8": 1.0}


def kv_bytes_per_token(model: Model, quant: Quant) -> float:
    """KV cache bytes of one token over all layers (K and V)."""
    d = model.head_dim
    per_head = d / 2 + 4 if quant.kv == "int4" else d * KV_BYTES_PER_ELEMENT[quant.kv]  # int4: + fp16 scale, zero
    return model.layers * 2 * model.kv_heads * per_head


def fit_reason(model: Model, quant: Quant, budget_bytes: float, max_model_len: int = MAX_MODEL_LEN,
               headroom_gib: float = HEADROOM_GIB) -> str | None:
    """None if the config fits the budget: weights + the KV cache of one max-length sequence +
    headroom; else why not (the "skipped" of its rows)."""
    w = weight_bytes(model, quant)
    need = w + kv_bytes_per_token(model, quant) * max_model_len + headroom_gib * GIB
    if need <= budget_bytes:
        return None
    return (f"weights {w / 1e9:.1f} GB + KV of one {max_model_len}-token sequence + {headroom_gib:g} GiB "
            f"headroom = {need / 1e9:.1f} GB > budget {budget_bytes / 1e9:.1f} GB")


@dataclass(frozen=True)
class Budget:
    label: str  # "24GiB" or "0.9": the "util" of a row
    util: float  # --gpu-memory-utilization
    nbytes: float


def parse_budgets(spec: str, total_bytes: float) -> list[Budget]:
    """ "24GiB,0.9" -> budgets of 24 GiB (util = 24 GiB / total) and of 0.9 of the GPU."""
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s.lower().endswith("gib"):
            util = float(s[:-3]) * GIB / total_bytes
        else:
            util = float(s)
        if not 0 < util <= 1:
            raise ValueError(f"budget {s!r} is gpu_memory_utilization {util:.3f}, outside (0, 1]")
        out.append(Budget(s, round(util, 4), round(util, 4) * total_bytes))
    return out


# ---- commands and what they print ----

def bench_command(vllm: str, model_dir: Path, quant: Quant, workload: Workload, util: float,
                  output_json: Path, max_model_len: int = MAX_MODEL_LEN, num_prompts: int | None = None) -> list[str]:
    """The `vllm bench throughput|latency` command line of one run."""
    cmd = [vllm, "bench", workload.bench, "--model", str(model_dir), "--load-format", "dummy",
           "--dtype", "bfloat16", "--max-model-len", str(max_model_len), "--gpu-memory-utilization", f"{util:g}",
           *quant.args]
    if workload.bench == "throughput":
        cmd += ["--dataset-name", "random", "--random-input-len", str(workload.input_len),
                "--random-output-len", str(workload.output_len),
                "--num-prompts", str(num_prompts or workload.num_prompts)]
    else:
        cmd += ["--input-len", str(workload.input_len), "--output-len", str(workload.output_len),
                "--batch-size", str(workload.batch_size), *LATENCY_ITERS]
    return cmd + ["--output-json", str(output_json)]


KV_TOKENS_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def parse_kv_tokens(log: str) -> int | None:
    """The last "GPU KV cache size: N tokens" of a vLLM log."""
    found = KV_TOKENS_RE.findall(log)
    return int(found[-1].replace(",", "")) if found else None


def parse_result(workload: Workload, result: dict) -> dict:
    """Row fields from vLLM's --output-json (0.26.0 keys: throughput "tokens_per_second",
    "requests_per_second", "elapsed_time", "num_requests"; latency "avg_latency")."""
    if workload.bench == "throughput":
        out_tokens = result["num_requests"] * workload.output_len
        return dict(tokens_per_s=round(result["tokens_per_second"], 1),
                    output_tokens_per_s=round(out_tokens / result["elapsed_time"], 1),
                    requests_per_s=round(result["requests_per_second"], 3))
    lat = result["avg_latency"]
    return dict(avg_latency_s=round(lat, 4), s_per_output_token=round(lat / workload.output_len, 6))


def num_prompts_overrides(specs: list[str]) -> dict[str, int]:
    """["512x256=50"] -> {"512x256": 50}."""
    out = {}
    for s in specs:
        name, _, n = s.partition("=")
        if name not in WORKLOADS or WORKLOADS[name].bench != "throughput" or not n.isdigit():
            raise ValueError(f"--num-prompts {s!r}: expected WORKLOAD=N for a throughput workload "
                             f"({', '.join(k for k, w in WORKLOADS.items() if w.bench == 'throughput')})")
        out[name] = int(n)
    return out


# ---- the results file ----

KEY = ("model", "config", "util", "workload", "bench")


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def run_stem(row: dict) -> str:
    """File name stem of a run's log and --output-json: llama-2-7b-fp8-0.9-512x256."""
    return f"{row['model']}-{row['config']}-{row['util']}-{row['workload']}"


def _order(row: dict) -> tuple:
    def pos(seq, v):
        return list(seq).index(v) if v in seq else len(seq)
    return (pos(MODELS, row["model"]), pos(DEFAULT_BUDGETS.split(","), row["util"]), row["util"],
            pos(WORKLOADS, row["workload"]), pos(CONFIGS, row["config"]))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Rows of old and new, a new row replacing the old one of the same key; in suite order."""
    by_key = {row_key(r): r for r in old}
    by_key.update((row_key(r), r) for r in new)
    return sorted(by_key.values(), key=_order)


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save_rows(path: Path, new: list[dict], device: str) -> list[dict]:
    """Merge new rows into the file (written atomically); returns all its rows."""
    rows = merge_rows(load_rows(path), new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(device=device, key=list(KEY), rows=rows), indent=1))
    os.replace(tmp, path)
    return rows


# ---- summary: ratios against fp8 and bf16 ----

def value(row: dict) -> float | None:
    """Throughput tok/s, or latency s (None for skipped or failed rows)."""
    return row.get("tokens_per_s") if row["bench"] == "throughput" else row.get("avg_latency_s")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row plus "x_fp8" and "x_bf16": how many times better than fp8 / bf16 of the same model,
    util and workload (throughput: own / theirs; latency: theirs / own). None where either is missing."""
    ref = {(r["model"], r["util"], r["workload"], r["config"]): value(r) for r in rows}
    out = []
    for r in rows:
        ratios = {}
        for base in ("fp8", "bf16"):
            mine, theirs = value(r), ref.get((r["model"], r["util"], r["workload"], base))
            if not mine or not theirs:
                ratios[f"x_{base}"] = None
            else:
                ratios[f"x_{base}"] = round(mine / theirs if r["bench"] == "throughput" else theirs / mine, 3)
        out.append(dict(r, **ratios))
    return out


def format_summary(rows: list[dict]) -> str:
    """The suite as a table: throughput in tok/s (in + out), latency in s per batch and ms per output token."""
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"
    lines = [(f"{'model':12} {'util':>6} {'workload':9} {'config':10} {'tok/s':>9} {'lat s':>7} {'ms/tok':>7} "
              f"{'KV tokens':>10} {'x fp8':>6} {'x bf16':>6}  note")]
    for r in with_ratios(sorted(rows, key=_order)):
        spt = r.get("s_per_output_token")
        note = ""
        if "skipped" in r:
            note = f"skipped: {r['skipped']}"
        elif "error" in r:
            note = f"error: {r['error']}"
        lines.append(f"{r['model']:12} {r['util']:>6} {r['workload']:9} {r['config']:10} "
                     f"{num(r.get('tokens_per_s'), ',.0f'):>9} {num(r.get('avg_latency_s'), '.3f'):>7} "
                     f"{num(spt and spt * 1e3, '.2f'):>7} {num(r.get('kv_cache_tokens'), ','):>10} "
                     f"{num(r['x_fp8'], '.2f'):>6} {num(r['x_bf16'], '.2f'):>6}  {note[:90]}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, device: str) -> None:
    """Throughput (tok/s) bars per config, grouped by workload; one panel per model and budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = [r for r in rows if r["bench"] == "throughput"]
    panels = list(dict.fromkeys((r["model"], r["util"]) for r in sorted(tp, key=_order)))
    if not panels:
        return
    configs = [c for c in CONFIGS if any(r["config"] == c for r in tp)]
    ncol = min(2, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4 * nrow), squeeze=False)
    width = 0.8 / len(configs)
    for ax, (model, util) in zip(axes.flat, panels):
        wls = [w for w in WORKLOADS if any(r["workload"] == w and (r["model"], r["util"]) == (model, util) for r in tp)]
        for i, cfg in enumerate(configs):
            got = {r["workload"]: r for r in tp if (r["model"], r["util"], r["config"]) == (model, util, cfg)}
            ys = [value(got[w]) if w in got and value(got[w]) else 0.0 for w in wls]
            xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(wls))]
            ax.bar(xs, ys, width, label=cfg)
            for x, w in zip(xs, wls):
                if w in got and not value(got[w]):
                    ax.text(x, 0, "skip" if "skipped" in got[w] else "err", rotation=90, ha="center",
                            va="bottom", fontsize=7)
        ax.set_xticks(range(len(wls)), [f"{w} (in x out)" for w in wls])
        ax.set_title(f"{model}, budget {util}")
        ax.set_ylabel("tokens/s (in + out)")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"vllm bench throughput, dummy weights, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- side effects: model directories, the GPU, subprocesses ----

def write_model_dir(root: Path, name: str, model: Model, checkpoint: str, tokenizer: Path) -> Path:
    """<root>/<name>-<checkpoint>/config.json (+ the tokenizer files), for --load-format dummy."""
    d = root / f"{name}-{checkpoint}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": model.hidden,
           "intermediate_size": model.intermediate, "num_attention_heads": model.heads,
           "num_key_value_heads": model.kv_heads, "num_hidden_layers": model.layers, "vocab_size": model.vocab,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": model.rope_theta,
           "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    if checkpoint == "gptq":
        cfg["quantization_config"] = dict(GPTQ_CONFIG)
    elif checkpoint == "atom":
        cfg["quantization_config"] = AtomConfig(kv_bits=None).to_dict()
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in list(tokenizer.glob("tokenizer*")) + list(tokenizer.glob("special_tokens_map.json")):
        shutil.copy(f, d / f.name)
    return d


def ensure_tokenizer(tokenizer: Path, dry_run: bool) -> None:
    """The tiny BPE tokenizer of .devbundle/make_tiny_llama.py, made if missing."""
    if (tokenizer / "tokenizer.json").exists():
        return
    maker = REPO / ".devbundle" / "make_tiny_llama.py"
    if dry_run or not maker.exists():
        print(f"note: no tokenizer in {tokenizer}" + ("" if dry_run else f" and no {maker}"), file=sys.stderr)
        if not dry_run:
            raise SystemExit("give --tokenizer DIR (a directory with tokenizer.json)")
        return
    subprocess.run([sys.executable, str(maker), str(tokenizer), "--hidden", "128", "--layers", "1", "--heads", "2",
                    "--kv-heads", "2", "--intermediate", "256"], check=True, stdout=subprocess.DEVNULL)


def gpu_info() -> tuple[str, int] | None:
    """(name, total bytes) of GPU 0, asked in a subprocess so this process holds no CUDA context."""
    code = "import torch; print(torch.cuda.get_device_name()); print(torch.cuda.mem_get_info()[1])"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        name, total = out.stdout.strip().splitlines()[-2:]
        return name, int(total)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def gpu_tag(device: str) -> str:
    return device.replace("NVIDIA ", "").replace(" ", "-").lower()


def commit() -> str:
    if os.environ.get("ATOM_COMMIT"):
        return os.environ["ATOM_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"


def vllm_version() -> str:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_command(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, float]:
    """Run cmd in its own process group with its output in log_path; (exit code or None on
    timeout, wall seconds). The whole group is killed afterwards: vLLM's engine core is a child
    process that would otherwise keep the GPU memory."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return rc, round(time.time() - t0, 1)


def last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["(no output)"])[-1][:300]


def run_one(cmd: list[str], workload: Workload, log_dir: Path, stem: str, timeout: float) -> dict:
    """One vLLM run: the row's measured fields, or its "error"."""
    out_json, log_path = Path(cmd[-1]), log_dir / f"{stem}.log"
    out_json.unlink(missing_ok=True)
    rc, wall = run_command(cmd, log_path, timeout)
    log = log_path.read_text(errors="replace")
    row = dict(kv_cache_tokens=parse_kv_tokens(log), wall_s=wall, log=str(log_path))
    if rc is None:
        return dict(row, error=f"timeout after {timeout:g} s")
    if rc != 0 or not out_json.exists():
        return dict(row, error=f"rc={rc}: {last_error_line(log)}")
    try:
        return dict(row, **parse_result(workload, json.loads(out_json.read_text())))
    except (KeyError, ValueError, ZeroDivisionError) as e:
        return dict(row, error=f"unreadable {out_json.name}: {type(e).__name__}: {e}")


def describe(row: dict) -> str:
    head = f"{row['model']} {row['config']} util={row['util']} {row['workload']}"
    if "skipped" in row:
        return f"{head}: skipped ({row['skipped']})"
    if "error" in row:
        return f"{head}: ERROR {row['error']}  ({row['wall_s']} s)"
    kv = f"  KV cache {row['kv_cache_tokens']:,} tokens" if row.get("kv_cache_tokens") else ""
    if row["bench"] == "throughput":
        return f"{head}: {row['tokens_per_s']:,.0f} tok/s{kv}  ({row['wall_s']} s)"
    return f"{head}: {row['avg_latency_s']:.3f} s, {row['s_per_output_token'] * 1e3:.2f} ms/token{kv}  ({row['wall_s']} s)"


# ---- the suite ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--budgets", default=DEFAULT_BUDGETS,
                    help="comma-separated; NGiB (absolute) or a fraction (gpu_memory_utilization)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--num-prompts", action="append", default=[], metavar="WORKLOAD=N",
                    help="prompts of a throughput workload (default: "
                    + ", ".join(f"{k}={w.num_prompts}" for k, w in WORKLOADS.items() if w.bench == "throughput") + ")")
    ap.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    ap.add_argument("--timeout", type=float, default=540, help="seconds per vLLM run (default 540)")
    ap.add_argument("--budget-s", type=float, help="total seconds: start no run after this, cut the last one short")
    ap.add_argument("--skip-existing", action="store_true", help="do not rerun rows the JSON already has measured")
    ap.add_argument("--gpu-mem-gib", type=float, help="total GPU memory (default: asked of GPU 0 with torch)")
    ap.add_argument("--device-name", help="GPU name for the rows and the file name (default: GPU 0's)")
    ap.add_argument("--headroom-gib", type=float, default=HEADROOM_GIB,
                    help="memory a budget needs beyond weights + one sequence's KV cache (fit check)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory of the JSON and PNG")
    ap.add_argument("--model-dir", default="/tmp/atom-e2e-models", help="where the config.json directories go")
    ap.add_argument("--log-dir", default="/tmp/atom-e2e-logs", help="vLLM logs and --output-json files")
    ap.add_argument("--tokenizer", default="/tmp/atom-tiny-tokenizer")
    ap.add_argument("--vllm", default="vllm", help="the vllm executable")
    ap.add_argument("--dry-run", action="store_true", help="print the commands (and write the model dirs), run nothing")
    ap.add_argument("--summary", nargs="?", const="", metavar="JSON",
                    help="print the table of an existing JSON (default: the one --out would write) and exit")
    return ap.parse_args(argv)


def pick(spec: str, known, what: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; known: {', '.join(known)}")
    return names


def device_and_memory(args) -> tuple[str, float]:
    info = None if args.gpu_mem_gib and args.device_name else gpu_info()
    if args.gpu_mem_gib is None and info is None:
        raise SystemExit("no GPU found: give --gpu-mem-gib (and --device-name)")
    device = args.device_name or (info[0] if info else "unknown-gpu")
    total = args.gpu_mem_gib * GIB if args.gpu_mem_gib else info[1]
    return device, total


def plan(args, budgets: list[Budget], model_dirs: dict) -> list[tuple[dict, list[str] | None]]:
    """(row identity + fixed fields, command or None when skipped) for every run, in order:
    model, budget, config (one engine at a time), workload."""
    prompts = num_prompts_overrides(args.num_prompts)
    runs = []
    for name in pick(args.models, MODELS, "models"):
        model = MODELS[name]
        for budget in budgets:
            for cfg in pick(args.configs, CONFIGS, "configs"):
                quant = CONFIGS[cfg]
                skipped = fit_reason(model, quant, budget.nbytes, args.max_model_len, args.headroom_gib)
                for wl in pick(args.workloads, WORKLOADS, "workloads"):
                    w = WORKLOADS[wl]
                    base = dict(model=name, config=cfg, util=budget.label, workload=wl, bench=w.bench,
                                gpu_memory_utilization=budget.util, input_len=w.input_len, output_len=w.output_len,
                                weight_gb=round(weight_bytes(model, quant) / 1e9, 2))
                    if w.bench == "throughput":
                        base["num_prompts"] = prompts.get(wl, w.num_prompts)
                    else:
                        base["batch_size"] = w.batch_size
                    if skipped:
                        runs.append((dict(base, skipped=skipped), None))
                        continue
                    cmd = bench_command(args.vllm, model_dirs[(name, quant.checkpoint)], quant, w, budget.util,
                                        Path(args.log_dir) / f"{run_stem(base)}.json", args.max_model_len,
                                        prompts.get(wl))
                    runs.append((base, cmd))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summary is not None:
        path = Path(args.summary or Path(args.out) / f"e2e-suite-{gpu_tag(device_and_memory(args)[0])}.json")
        print(format_summary(load_rows(path)))
        return 0
    device, total = device_and_memory(args)
    try:
        budgets = parse_budgets(args.budgets, total)
    except ValueError as e:
        raise SystemExit(f"--budgets: {e}") from None
    tokenizer = Path(args.tokenizer)
    ensure_tokenizer(tokenizer, args.dry_run)
    checkpoints = {CONFIGS[c].checkpoint for c in pick(args.configs, CONFIGS, "configs")}
    model_dirs = {(name, ckpt): write_model_dir(Path(args.model_dir), name, MODELS[name], ckpt, tokenizer)
                  for name in pick(args.models, MODELS, "models") for ckpt in sorted(checkpoints)}
    runs = plan(args, budgets, model_dirs)
    print(f"{device}: {total / GIB:.1f} GiB; budgets " + ", ".join(f"{b.label} = util {b.util}" for b in budgets))
    if args.dry_run:
        for base, cmd in runs:
            print(shlex.join(cmd) if cmd else describe(base))
        return 0
    path = Path(args.out) / f"e2e-suite-{gpu_tag(device)}.json"
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    done = {row_key(r) for r in load_rows(path) if "error" not in r and "skipped" not in r}
    stamp = dict(device=device, commit=commit(), vllm=vllm_version())
    t0 = time.time()
    for base, cmd in runs:
        if args.skip_existing and row_key(base) in done:
            continue
        if cmd is None:
            row = dict(base, **stamp)
        else:
            left = args.timeout if args.budget_s is None else min(args.timeout, args.budget_s - (time.time() - t0))
            if left < 1:
                print(f"--budget-s {args.budget_s:g} spent: not started: {describe(dict(base, skipped='budget'))}")
                continue
            measured = run_one(cmd, WORKLOADS[base["workload"]], Path(args.log_dir), run_stem(base), left)
            row = dict(base, **stamp, command=shlex.join(cmd), **measured)
        save_rows(path, [row], device)
        print(describe(row), flush=True)
    rows = load_rows(path)
    try:
        plot(rows, path.with_suffix(".png"), device)
    except ImportError as e:
        print(f"no chart: {e}")
    print(f"\n{path}\n{format_summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
