"""Reliability of Atom serving under load, faults and bad input (issue 17), on one GPU.

Parts (``--parts``, default all; each in its own subprocesses under a timeout; results merged by
part into ``results/reliability-<gpu>.json``, so several device calls can fill one file):

  soak             `vllm serve` a Llama-2-7B-shaped Atom checkpoint (dummy weights, INT4 KV cache,
                   CUDA graphs on), driven by `vllm bench serve`: 1,000 requests at concurrency 64,
                   random lengths (input 1024 +- 90 %, output 112 +- 90 %: the longest reach
                   max-model-len 2176); failed requests, latency percentiles, GPU memory after a
                   warm-up burst (128 requests at the same concurrency) and after the run, and a
                   request answered afterwards.
  soak-prefix      the same with prefix caching on, a 512-token prefix shared by every prompt and
                   chunked prefill in 512-token steps.
  bad-requests     the OpenAI completions API with bad input: a prompt longer than max-model-len,
                   max_tokens huge / negative, logprobs out of range / not a number, an empty
                   prompt, a body that is not UTF-8, a burst of 32 streams closed after their first
                   chunk. Each must get a 4xx (the streams: nothing), and the server must still
                   answer a good request and /health afterwards.
  preempt          the tiny Llama of tests/gpu/tiny_models.py quantized on the GPU (INT4 KV), 32
                   greedy requests with a KV cache of 64 blocks (preemption and recompute forced;
                   vLLM's preemption counter from /metrics) and again with room: the completions
                   must be identical.
  bad-checkpoints  copies of that checkpoint, each broken one way (`MUTATIONS`), served: each must
                   exit non-zero within 60 s with one line naming the tensor or field.
  sanitizer        compute-sanitizer memcheck over the kernel tests and tests/gpu/test_bad_numbers.py
                   (NaN / Inf / huge inputs; ``--sanitizer-k`` selects), in processes of
                   ``--sanitizer-chunk`` tests, ``--sanitizer-jobs`` at once, torch's caching allocator off.

    python examples/benchmarks/reliability.py [--parts soak,...] [--out DIR] [--port 8765]

Needs vLLM with this plugin registered (tests/gpu/plugin_env.sh) and, for the checkpoint parts,
the tiny tokenizer of .devbundle/make_tiny_llama.py (made if missing).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
import bench_e2e as e2e  # noqa: E402  (standard library + vllm_atom.config only)

PARTS = ("soak", "soak-prefix", "bad-requests", "preempt", "bad-checkpoints", "sanitizer")
MAX_MODEL_LEN = 2176
KV4 = ["--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "CUSTOM"]


# ---- bad checkpoints: (name, what breaks, text the error must name) ----

def _drop(name: str):
    def mutate(config, tensors):
        del tensors[name]
        return name
    return mutate


def _reshape(name: str):
    def mutate(config, tensors):
        tensors[name] = tensors[name][..., :-1].contiguous()
        return name
    return mutate


def _retype(name: str):
    def mutate(config, tensors):
        import torch
        tensors[name] = tensors[name].to(torch.int16)
        return name
    return mutate


def _not_a_permutation(config, tensors):
    names = [f"model.layers.0.self_attn.{p}_proj.reorder_index" for p in "qkv"]
    for k in names:  # q/k/v share one reorder; break it in all three the same way
        tensors[k][3] = tensors[k][0]
    return "reorder_index"


def _format_version(config, tensors):
    config["quantization_config"]["format_version"] = 99
    return "format_version"


def _row_shards(config, tensors):
    config["quantization_config"]["row_shards"] = 2  # served with tensor_parallel_size 1
    return "row_shards"


MUTATIONS = {
    "missing-tensor": _drop("model.layers.0.self_attn.k_proj.w_scale"),
    "wrong-shape": _reshape("model.layers.0.mlp.down_proj.qweight"),
    "wrong-dtype": _retype("model.layers.0.mlp.up_proj.w_outlier"),
    "reorder-not-a-permutation": _not_a_permutation,
    "unknown-format-version": _format_version,
    "row-shards-not-tp": _row_shards,
}


def write_mutated(src: Path, dst: Path, mutation: str) -> str:
    """Copy checkpoint ``src`` to ``dst`` broken by ``MUTATIONS[mutation]``; returns the name the
    error must contain."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    config = json.loads((src / "config.json").read_text())
    expect = MUTATIONS[mutation](config, tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return expect


# ---- a vLLM server in its own process group ----

class Server:
    def __init__(self, model: Path, args: list[str], log: Path, port: int, env: dict | None = None):
        self.url, self.model, self.args = f"http://127.0.0.1:{port}", str(model), list(args)
        self.env = dict(env or {})
        self.log = open(log, "w")
        self.proc = subprocess.Popen(["vllm", "serve", self.model, "--port", str(port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **self.env})

    def wait_ready(self, timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            if self.healthy():
                return True
            time.sleep(2)
        return False

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/health", timeout=5).status == 200
        except (OSError, urllib.error.URLError):
            return False

    def post(self, body, timeout: float = 120) -> tuple[int, dict | str]:
        data = body if isinstance(body, bytes) else json.dumps({"model": self.model, **body}).encode()
        req = urllib.request.Request(self.url + "/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")[:300]
        except OSError as e:
            return -1, f"{type(e).__name__}: {e}"

    def metric(self, name: str) -> float | None:
        try:
            text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        except (OSError, urllib.error.URLError):
            return None
        vals = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                if ln.startswith((name + "{", name + " "))]  # a counter's own lines, not its _created
        return sum(vals) if vals else None

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def gpu_memory_mib(field: str = "memory.used") -> int | None:
    """nvidia-smi's ``field`` (MiB) of the first GPU, or None where it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def good_request(server: Server) -> bool:
    code, body = server.post({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    return code == 200 and isinstance(body, dict) and bool(body.get("choices"))


# ---- parts ----

def atom_7b_server(args, out: Path, tag: str, extra: list[str] = ()) -> Server:
    """`vllm serve` of the Llama-2-7B-shaped Atom checkpoint (dummy weights, INT4 KV, graphs on)."""
    tok = Path(args.tokenizer)
    e2e.ensure_tokenizer(tok, False)
    model = e2e.write_model_dir(out / "models", "llama-2-7b", e2e.MODELS["llama-2-7b"], "atom", tok)
    serve = ["--load-format", "dummy", "--max-model-len", str(MAX_MODEL_LEN), *KV4,
             "--gpu-memory-utilization", "0.85", *extra]
    return Server(model, serve, out / f"{tag}-server.log", args.port)


def part_soak(args, out: Path, prefix: bool) -> dict:
    tag = "soak-prefix" if prefix else "soak"
    server = atom_7b_server(args, out, tag, ["--enable-prefix-caching", "--max-num-batched-tokens", "512"]
                            if prefix else [])
    res: dict = {"server_args": server.args}
    try:
        if not server.wait_ready(args.ready_timeout):
            return {**res, "ok": False, "error": "server did not become ready",
                    "log_tail": e2e.last_error_line((out / f"{tag}-server.log").read_text())}
        res["warmup_ok"] = good_request(server)

        def bench(n: int, name: str) -> list[str]:
            cmd = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", server.url, "--model", server.model,
                   "--dataset-name", "random", "--num-prompts", str(n), "--max-concurrency", "64",
                   "--random-input-len", "512" if prefix else "1024", "--random-output-len", "112",
                   "--random-range-ratio", "0.9", "--ignore-eos", "--seed", "0", "--save-result",
                   "--result-dir", str(out), "--result-filename", f"{name}.json",
                   "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90,99"]
            return cmd + (["--random-prefix-len", "512"] if prefix else [])

        # a first burst at full concurrency, so that 'before' includes the allocator's one-time growth
        # at the largest batches (what 'flat' is about is growth over the run)
        res["warmup_burst_rc"] = e2e.run_command(bench(128, f"{tag}-warmup"), out / f"{tag}-warmup.log",
                                                 args.bench_timeout)[0]
        res["gpu_mib_before"] = gpu_memory_mib()
        rc, secs = e2e.run_command(bench(args.num_prompts, f"{tag}-bench"), out / f"{tag}-bench.log",
                                   args.bench_timeout)
        res.update(bench_rc=rc, bench_s=secs)
        path = out / f"{tag}-bench.json"
        if path.exists():
            b = json.loads(path.read_text())
            res.update({k: b.get(k) for k in ("completed", "failed", "duration", "request_throughput",
                                              "output_throughput", "max_concurrent_requests")})
            res.update({k: round(v, 1) for k, v in b.items() if k.startswith(("p50_", "p90_", "p99_"))})
            res["errors"] = sorted({e for e in b.get("errors", []) if e})[:5]
        res["gpu_mib_after"] = gpu_memory_mib()
        res["answers_after"] = good_request(server) and server.healthy()
        before, after = res.get("gpu_mib_before"), res.get("gpu_mib_after")
        res["gpu_growth"] = None if not before or after is None else round((after - before) / before, 4)
        res["ok"] = bool(res.get("completed") == args.num_prompts and res.get("failed") == 0
                         and res["answers_after"] and res["gpu_growth"] is not None and res["gpu_growth"] < 0.01)
        return res
    finally:
        server.stop()


def bad_request_bodies(model: str) -> dict[str, bytes | dict]:
    return {
        "prompt-longer-than-max-model-len": {"prompt": [5] * (MAX_MODEL_LEN + 10), "max_tokens": 4},
        "max-tokens-huge": {"prompt": "hello", "max_tokens": 10 ** 9},
        "max-tokens-negative": {"prompt": "hello", "max_tokens": -5},
        "logprobs-out-of-range": {"prompt": "hello", "max_tokens": 4, "logprobs": 10 ** 6},
        "logprobs-not-a-number": {"prompt": "hello", "max_tokens": 4, "logprobs": "many"},
        "empty-prompt": {"prompt": "", "max_tokens": 4},
        "not-utf8": b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfa", "max_tokens": 4}',
    }


def cancelled_streams(server: Server, n: int = 32) -> int:
    """Open n streaming completions, read a little of each response, drop the connection; how many
    streams started."""
    started = []

    def one():
        body = json.dumps({"model": server.model, "prompt": "Once upon a time", "max_tokens": 512,
                           "stream": True, "ignore_eos": True}).encode()
        host, port = server.url.rsplit("/", 1)[1].split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                if s.recv(256):
                    started.append(1)
        except OSError:
            pass

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(started)


def part_bad_requests(args, out: Path) -> dict:
    server = atom_7b_server(args, out, "bad-requests")
    try:
        if not server.wait_ready(args.ready_timeout):
            return {"ok": False, "error": "server did not become ready"}
        cases = {}
        for name, body in bad_request_bodies(server.model).items():
            code, text = server.post(body)
            cases[name] = {"status": code, "reply": text if isinstance(text, str) else "(200 with a body)",
                           "ok": 400 <= code < 500}
        n = cancelled_streams(server)
        time.sleep(2)
        cases["cancelled-streams"] = {"started": n, "ok": n > 0}
        alive = server.healthy() and good_request(server)
        return {"cases": cases, "answers_after": alive, "ok": alive and all(c["ok"] for c in cases.values())}
    finally:
        server.stop()


def tiny_checkpoint(args, out: Path) -> Path:
    """The tiny Llama of tests/gpu/tiny_models.py, quantized (INT4 KV) on the GPU; cached in out."""
    sys.path.insert(0, str(REPO / "tests" / "gpu"))
    from tiny_models import make_tiny, stdlib_text

    from vllm_atom.config import AtomConfig
    from vllm_atom.quantize.pipeline import QuantizeOptions, quantize

    ckpt = out / "tiny-atom-kv4"
    if not (ckpt / "config.json").exists():
        tok = Path(args.tokenizer)
        e2e.ensure_tokenizer(tok, False)
        base = make_tiny(str(out / "tiny-fp16"), str(tok), outlier_gain=10.0, logit_gain=8.0)
        calib = stdlib_text(str(out / "calib.txt"), 0, 40)
        quantize(base, str(ckpt), calib, AtomConfig(kv_bits=4),
                 QuantizeOptions(nsamples=32, seqlen=256, device="cuda"), progress=False)
    return ckpt


def greedy_run(server: Server, n: int = 32, max_tokens: int = 160) -> list[str | None]:
    """n greedy completions sent at once (distinct prompts)."""
    texts: list[str | None] = [None] * n

    def one(i):
        code, body = server.post({"prompt": f"def function_{i}(x):\n    return", "max_tokens": max_tokens,
                                  "temperature": 0, "ignore_eos": True}, timeout=300)
        if code == 200:
            texts[i] = body["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts


def _preempt_pair(model: Path, serve: list[str], tag: str, args, out: Path, env: dict | None = None) -> dict:
    """Greedy completions of ``model`` with room, then with 64 KV blocks (preemption forced)."""
    runs = {}
    for name, extra in (("room", []), ("preempted", ["--num-gpu-blocks-override", "64"])):
        server = Server(model, [*serve, "--max-model-len", "512", "--gpu-memory-utilization", "0.3", *extra],
                        out / f"preempt-{tag}-{name}-server.log", args.port, env)
        try:
            if not server.wait_ready(args.ready_timeout):
                return {"ok": False, "error": f"{tag} {name}: server did not become ready"}
            texts = greedy_run(server)
            runs[name] = {"texts": texts, "preemptions": server.metric("vllm:num_preemptions_total")}
        finally:
            server.stop()
    a, b = runs["room"]["texts"], runs["preempted"]["texts"]
    same = sum(int(x is not None and x == y) for x, y in zip(a, b))
    pre = runs["preempted"]["preemptions"]
    # where a pair first differs (characters): a late split after near-equal logits points at batch
    # composition (the two runs batch the requests differently, so the GEMMs run at other M), an
    # early or total one at the recompute path
    first_diff = [None if x == y else next((i for i, (c, d) in enumerate(zip(x or "", y or "")) if c != d),
                                           min(len(x or ""), len(y or ""))) for x, y in zip(a, b)]
    return {"env": env or {}, "requests": len(a), "answered": sum(int(x is not None) for x in a + b), "identical": same,
            "preemptions": pre, "first_difference": first_diff,
            "preemptions_with_room": runs["room"]["preemptions"], "ok": same == len(a) and bool(pre)}


def part_preempt(args, out: Path) -> dict:
    """Atom + INT4 KV, and as the baseline the same tiny model unquantized (16-bit weights and KV
    cache) under the same two schedules: whether a difference is Atom's or vLLM's batching. The
    result is Atom's batch-invariant mode (VLLM_ATOM_BATCH_INVARIANT=1: fixed GEMM and attention
    splits); `default_mode` the same pair as shipped by default (splits chosen by batch size)."""
    ckpt = tiny_checkpoint(args, out)
    res = _preempt_pair(ckpt, KV4, "atom-invariant", args, out, {"VLLM_ATOM_BATCH_INVARIANT": "1"})
    res["default_mode"] = _preempt_pair(ckpt, KV4, "atom", args, out)
    res["baseline_16bit"] = _preempt_pair(out / "tiny-fp16", [], "fp16", args, out)
    return res


def part_bad_checkpoints(args, out: Path) -> dict:
    ckpt = tiny_checkpoint(args, out)
    cases = {}
    for name in args.mutations or MUTATIONS:
        d = out / f"broken-{name}"
        expect = write_mutated(ckpt, d, name)
        log = out / f"broken-{name}.log"
        rc, secs = e2e.run_command(["vllm", "serve", str(d), "--port", str(args.port), *KV4,
                                    "--gpu-memory-utilization", "0.3"], log, 60)
        text = log.read_text(errors="replace")
        named = [ln.strip()[:300] for ln in text.splitlines() if expect in ln and "error" in ln.lower()]
        cases[name] = {"rc": rc, "seconds": secs, "expect": expect, "error_line": named[-1] if named else None,
                       "ok": rc not in (0, None) and bool(named), "commit": e2e.commit()}
    return {"cases": cases, "ok": all(c["ok"] for c in cases.values())}


SANITIZER_FILES = ("tests/gpu/test_kernels.py", "tests/gpu/test_kv_int4.py", "tests/gpu/test_sm90.py",
                   "tests/gpu/test_bad_numbers.py")


# memcheck lines of a process that ran out of GPU memory ("unknown error" launches were seen only
# beside out-of-memory ones in the H200 runs: memcheck failing to allocate for its own launch)
_OOM = re.compile(r"cudaErrorMemoryAllocation|out of memory|cudaErrorUnknown")


def _sanitizer_shard(text: str, tests: int, rc) -> dict:
    """One shard's record from its log: rc (None: killed at the timeout), pytest's counts, the
    distinct memcheck error lines (addresses blanked) and the first failed tests."""
    lines = text.splitlines()
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    for ln in lines:  # pytest's last line: "3 failed, 57 passed, 1 skipped in 9.1s"
        if re.search(r"\d+ (passed|failed|errors?|skipped)\b.* in [\d.]+s", ln):
            for n, what in re.findall(r"(\d+) (passed|failed|error|skipped)", ln):
                counts[what] = int(n)
    summary = [ln.strip() for ln in lines if "ERROR SUMMARY" in ln]
    return {"rc": rc, "tests": tests, **counts, "memcheck": summary[0] if summary else None,
            "errors": dict(_memcheck_lines(lines).most_common(6)),
            "failed_tests": [ln[7:200] for ln in lines if ln.startswith("FAILED ")][:6]}


def _memcheck_lines(lines: list[str]) -> collections.Counter:
    """The distinct memcheck error lines (addresses blanked), with counts."""
    return collections.Counter(re.sub(r"0x[0-9a-f]+", "0x..", ln.strip("= \t")) for ln in lines
                               if re.match(r"=+\s+(Invalid|Program hit|Misaligned|Out-of-range|Barrier|Cuda|at \S)", ln))


def _gpu_mib_by_group() -> dict[int, int]:
    """{process group: MiB of GPU memory its processes hold} (nvidia-smi; {} where it cannot say)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[int, int] = {}
    for ln in r.stdout.splitlines():
        try:
            pid, mib = (int(v) for v in ln.split(","))
            g = os.getpgid(pid)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        out[g] = out.get(g, 0) + mib
    return out


def _oom_only(text: str, shard: dict) -> list[str]:
    """The failed tests of a shard (its log and `_sanitizer_shard` record) whose every failure and
    memcheck line is out of memory (to be run again alone), else []."""
    lines = text.splitlines()
    errors = _memcheck_lines(lines)
    if shard["rc"] in (0, None) or not shard["failed"] or not errors or not all(_OOM.search(e) for e in errors):
        return []
    ids = [ln[7:].split(" - ")[0].strip() for ln in lines if ln.startswith("FAILED ")]
    return ids if len(ids) == shard["failed"] else []


def _sanitizer_spans(previous: dict, ids: list[str], selection: str) -> tuple[list[dict], list[tuple[int, int]]]:
    """For ``--sanitizer-resume``: the shards of an earlier sanitizer record that finished clean
    (rc 0; a chunk that needed an alone-rerun runs again), each with its ``start`` in ``ids`` and
    its run's commit, and the [start, end) spans of ``ids`` they leave out. The earlier run must
    have collected the same tests (count and selection): its chunks map onto ``ids`` by position."""
    shards = previous.get("shards") or []
    if previous.get("selection") != selection or previous.get("tests") != len(ids) or not shards:
        raise ValueError(f"--sanitizer-resume: the earlier record ({previous.get('tests')} tests, "
                         f"{previous.get('selection')!r}) is not this selection ({len(ids)} tests, {selection!r})")
    reruns = {s["retried_as"] for s in shards if "retried_as" in s}
    kept, at = [], 0
    for j, s in enumerate(shards):
        if j in reruns:
            continue  # an alone-rerun of a chunk's failed tests: that chunk runs again
        start = s.get("start", at)
        at = start + s["tests"]
        if s["rc"] == 0 and "retried_as" not in s:
            kept.append({**s, "start": start, "commit": s.get("commit", previous.get("commit"))})
    spans, at = [], 0
    for a, b in sorted((s["start"], s["start"] + s["tests"]) for s in kept) + [(len(ids), len(ids))]:
        if a > at:
            spans.append((at, a))
        at = max(at, b)
    return kept, spans


def part_sanitizer(args, out: Path, previous: dict | None = None) -> dict:
    """compute-sanitizer memcheck over the selected kernel tests: contiguous chunks of
    ``--sanitizer-chunk`` tests, one memcheck process each, ``--sanitizer-jobs`` at a time on the
    one GPU (memcheck's cost is mostly per launch on the host, so processes overlap well; a
    process per chunk bounds the instrumented modules and memory each holds). A chunk starts only
    while ``--sanitizer-min-free-gib`` of GPU memory is free; a chunk whose failures and memcheck
    lines are all out-of-memory (the concurrent tests' peaks, not an access error) runs its failed
    tests once more, alone, and that run's outcome is the record. ``--sanitizer-resume`` keeps the
    clean chunks of ``previous`` (the committed record) and runs only the tests they leave out."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider"]
    if args.sanitizer_ids:  # an explicit list (e.g. what an earlier record left out), named by its hash
        ids = [ln.strip() for ln in Path(args.sanitizer_ids).read_text().splitlines() if "::" in ln]
        digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:10]
        selection = f"ids {Path(args.sanitizer_ids).name} (sha1 {digest})"
    else:
        ids = subprocess.run(pytest + ["--collect-only", *SANITIZER_FILES, "-k", args.sanitizer_k],
                             capture_output=True, text=True).stdout.splitlines()
        ids = [ln.strip() for ln in ids if "::" in ln]
        selection = args.sanitizer_k
    if not ids:
        return {"ok": False, "error": "no tests collected", "selection": selection}
    kept, spans = _sanitizer_spans(previous or {}, ids, selection) if args.sanitizer_resume else ([], [(0, len(ids))])
    starts = [i for a, b in spans for i in range(a, b, args.sanitizer_chunk)]
    ends = [min(i + args.sanitizer_chunk, b) for a, b in spans for i in range(a, b, args.sanitizer_chunk)]
    chunks = [ids[i:e] for i, e in zip(starts, ends)]
    # torch's caching allocator off: every tensor is its own cudaMalloc, so memcheck sees an access
    # past a tensor's end (inside a pooled block it could not), and a process holds only what its
    # test uses (pooled, concurrent processes' peaks summed to more than the GPU: out of memory)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    t0, todo, running, shards, peak = time.time(), list(enumerate(chunks)), {}, {}, {}
    began = {}

    def finish(j, proc, log, rc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()
        text = (out / f"sanitizer-{j}.log").read_text(errors="replace")
        shards[j] = _sanitizer_shard(text, len(chunks[j]), rc)
        shards[j].update(start=starts[j] if j < len(starts) else None, peak_gpu_mib=peak.pop(proc.pid, None),
                         seconds=round(time.time() - began[j], 1))
        return text

    retried, retry_ids = [], set()
    while todo or running:
        late = time.time() - t0 > args.sanitizer_timeout
        while todo and len(running) < args.sanitizer_jobs and not late:
            alone = todo[0][0] in retry_ids or any(r in retry_ids for r in running)
            free = gpu_memory_mib("memory.free")
            if running and (alone or (free is not None and free < 1024 * args.sanitizer_min_free_gib)):
                break  # the running tests hold the memory: start the next chunk when some is back
            j, chunk = todo.pop(0)
            (out / f"sanitizer-{j}.ids").write_text("\n".join(chunk) + "\n")
            cmd = ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "99", *pytest, *chunk]
            log = open(out / f"sanitizer-{j}.log", "w")
            began[j] = time.time()
            running[j] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                           env=env), log)
        if late:
            for j, (proc, log) in running.items():
                finish(j, proc, log, proc.poll())
            for j, chunk in todo:
                shards[j] = {"rc": None, "tests": len(chunk), "start": starts[j] if j < len(starts) else None,
                             "not_started": True}
            running, todo = {}, []
            break
        for g, mib in _gpu_mib_by_group().items():  # each chunk's process group, sampled every second
            peak[g] = max(peak.get(g, 0), mib)
        for j, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                text = finish(j, proc, log, proc.returncode)
                del running[j]
                again = [] if j in retry_ids else _oom_only(text, shards[j])
                if again:  # out of memory beside the others, not a memcheck finding: once more, alone
                    retried.append(j)
                    chunks.append(again)
                    retry_ids.add(len(chunks) - 1)
                    todo.append((len(chunks) - 1, again))
                    shards[j]["retried_as"] = len(chunks) - 1
        time.sleep(1.0)
    commit = e2e.commit()
    new = [{**shards[j], "commit": commit} for j in sorted(shards)]
    for s in new:  # the kept shards come first
        if "retried_as" in s:
            s["retried_as"] += len(kept)
    final = kept + [s for s in new if "retried_as" not in s]
    total = {k: sum(s.get(k, 0) for s in final) for k in ("passed", "failed", "error", "skipped")}
    total["passed"] += sum(shards[j]["passed"] for j in retried)  # the retried chunks' first passes

    def memcheck_errors(group):
        return sum(int(re.search(r"(\d+) error", s.get("memcheck") or "x 0 error").group(1)) for s in group)
    return {"tests": len(ids), "processes": len(kept) + len(new), "jobs": args.sanitizer_jobs,
            "seconds": round(time.time() - t0, 1), "selection": selection, **total,
            "memcheck_errors": memcheck_errors(final),
            "retried_alone": len(retried), "oom_errors_before_retry": memcheck_errors([shards[j] for j in retried]),
            "kept_from_earlier": len(kept), "commits": sorted({s["commit"] for s in kept + new}),
            "shards": kept + new,
            "ok": all(s["rc"] == 0 for s in final) and total["passed"] > 0
            and total["passed"] + total["skipped"] == len(ids)}


# ---- driver ----

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default=str(HERE / "results"), help="directory of reliability-<gpu>.json")
    ap.add_argument("--work", default="/tmp/atom-reliability", help="logs, models, checkpoints")
    ap.add_argument("--tokenizer", default="/tmp/atom-tiny-tokenizer")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--mutations", default="", help="bad-checkpoints: a comma list of MUTATIONS (default all)")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--bench-timeout", type=float, default=480)
    ap.add_argument("--sanitizer-k", default="not graph and not 8192")
    ap.add_argument("--sanitizer-timeout", type=float, default=540)
    ap.add_argument("--sanitizer-jobs", type=int, default=6, help="memcheck processes at once on the GPU")
    ap.add_argument("--sanitizer-chunk", type=int, default=30, help="tests per memcheck process")
    ap.add_argument("--sanitizer-ids", help="a file of pytest test ids (one per line) to run instead of "
                    "--sanitizer-k's collection")
    ap.add_argument("--sanitizer-resume", action="store_true",
                    help="keep the clean chunks of the committed sanitizer record; run only the tests they leave out")
    ap.add_argument("--sanitizer-record", default="sanitizer",
                    help="the part of the JSON the sanitizer run reads (--sanitizer-resume) and writes "
                         "(a second record, e.g. after a kernel change, beside the first)")
    ap.add_argument("--sanitizer-min-free-gib", type=float, default=40,
                    help="start another memcheck process only while this much GPU memory is free")
    args = ap.parse_args(argv)
    args.parts = e2e.pick(args.parts, PARTS, "part")
    args.mutations = e2e.pick(args.mutations, tuple(MUTATIONS), "mutation")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info = e2e.gpu_info()
    device = info[0] if info else "unknown GPU"
    path = Path(args.out) / f"reliability-{e2e.gpu_tag(device)}.json"
    record = json.loads(path.read_text()) if path.exists() else {"parts": {}}
    run = {"soak": lambda: part_soak(args, work, False), "soak-prefix": lambda: part_soak(args, work, True),
           "bad-requests": lambda: part_bad_requests(args, work), "preempt": lambda: part_preempt(args, work),
           "bad-checkpoints": lambda: part_bad_checkpoints(args, work), "sanitizer": lambda: part_sanitizer(args, work, record["parts"].get(args.sanitizer_record))}

    def record_key(part: str) -> str:  # the JSON part a run's result goes to
        return args.sanitizer_record if part == "sanitizer" else part

    for part in args.parts:
        t0 = time.time()
        try:
            res = run[part]()
        except Exception as e:  # noqa: BLE001  (a part that crashes is a result too)
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        res.update(seconds_total=round(time.time() - t0, 1), commit=e2e.commit())
        key = record_key(part)
        old = record["parts"].get(key, {})
        if part == "bad-checkpoints" and args.mutations and "cases" in res:  # a subset: keep the other cases
            res["cases"] = {**old.get("cases", {}), **res["cases"]}
            res["ok"] = all(c["ok"] for c in res["cases"].values())
        record["parts"][key] = res
        print(f"{key:16} {'ok' if res.get('ok') else 'FAILED'}  ({res['seconds_total']} s)", flush=True)
        record.update(device=device, vllm=e2e.vllm_version())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(record["parts"][record_key(p)].get("ok") for p in args.parts) else 1


if __name__ == "__main__":
    sys.exit(main())
