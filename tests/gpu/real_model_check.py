"""A real Atom checkpoint through vLLM on the GPU machine: `vllm serve` answers
/v1/completions and /v1/chat/completions, and wiki perplexity through vLLM's prompt
logprobs is compared with `vllm-atom eval`'s simulated number on the same windows.

    python tests/gpu/real_model_check.py CKPT TEXT EXPECTED.json [--kv4]

EXPECTED.json is the output of `vllm-atom eval CKPT --text TEXT --seqlen S --max-tokens N
--methods atom,atom-kv4 --json EXPECTED.json` (run on the CPU machine); the row of method
atom (or atom-kv4 with --kv4, which serves with Atom's INT4 KV cache) and pipeline
--pipeline (default fp32, `vllm-atom eval`'s default) is the target. Rows of the other
pipeline (`--pipeline 16bit` into the same JSON) are compared too and reported. Rows with
per-window NLLs also give the paired standard error of the difference (`rel_se`).
Writes $OUT/real-model[-kv4].json.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


KV4_ARGS = ["--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "CUSTOM"]


def serve_and_query(ckpt: str, extra: list[str], tag: str, port: int = 8011) -> dict:
    cmd = ["vllm", "serve", ckpt, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float16",
           "--served-model-name", "atom", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096", *extra]
    log = open(os.path.join(os.environ.get("OUT", "/tmp"), f"vllm-serve{tag}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < 240:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited; see vllm-serve{tag}.log")
                time.sleep(2)
        ready_s = time.time() - t0
        out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "query_server.py"),
                              "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "atom"],
                             capture_output=True, text=True, timeout=120)
        print(out.stdout, out.stderr[-2000:])
        return {"serve_ready_s": round(ready_s, 1), "query_rc": out.returncode, "answers": out.stdout}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("text")
    ap.add_argument("expected")
    ap.add_argument("--kv4", action="store_true", help="serve with Atom's INT4 KV cache")
    ap.add_argument("--pipeline", default="fp32", help="the simulation row that is the target")
    args = ap.parse_args()
    extra = KV4_ARGS if args.kv4 else []
    from transformers import AutoTokenizer

    from vllm_atom.evaluate import eval_windows

    expected = json.load(open(args.expected))
    rows = expected if isinstance(expected, list) else expected.get("rows", [expected])
    method = "atom-kv4" if args.kv4 else "atom"
    mine = [r for r in rows if r.get("method", method) == method]
    row = next(r for r in mine if r.get("pipeline", "fp32") == args.pipeline)
    seqlen, tokens = int(row["seqlen"]), int(row["tokens"])
    result = {"expected": row}
    result.update(serve_and_query(args.ckpt, extra, '-kv4' if args.kv4 else ''))

    tok = AutoTokenizer.from_pretrained(args.ckpt)
    windows = eval_windows(tok, args.text, seqlen, tokens).tolist()
    ids, res = "/tmp/real-ids.json", "/tmp/real-vllm.json"
    json.dump(windows, open(ids, "w"))
    subprocess.run([sys.executable, os.path.join(HERE, "vllm_logprobs.py"), args.ckpt, ids, res,
                    "--gpu-memory-utilization", "0.3", *extra], check=True)
    got = json.load(open(res))
    lps = [lp for w in got["windows"] for lp in w["logprob"]]
    ppl = math.exp(-sum(lps) / len(lps))
    result.update({"vllm_ppl": ppl, "vllm_tokens": len(lps), "sim_ppl": row["ppl"],
                   "rel_diff": ppl / row["ppl"] - 1})
    # Paired over windows: how far vLLM and the simulation disagree window by window (INT4
    # rounding flips), i.e. the noise on rel_diff.
    from vllm_atom.evaluate import paired_ppl_ratio
    vllm_nll = [-sum(w["logprob"]) for w in got["windows"]]
    result["by_pipeline"] = {}
    for r in mine:
        if int(r["seqlen"]) != seqlen or int(r["tokens"]) != tokens:
            continue
        cmp = {"sim_ppl": r["ppl"], "rel_diff": ppl / r["ppl"] - 1}
        if r.get("window_nll"):
            cmp["rel_se"] = paired_ppl_ratio(vllm_nll, r["window_nll"], seqlen - 1)["rel_se"]
        result["by_pipeline"][r.get("pipeline", "fp32")] = cmp
    result["rel_se"] = result["by_pipeline"][args.pipeline].get("rel_se")
    print("real-model", json.dumps({k: v for k, v in result.items() if k != "answers"}))
    json.dump(result, open(os.path.join(os.environ.get("OUT", "/tmp"), f"real-model{'-kv4' if args.kv4 else ''}.json"), "w"),
              indent=1)
    if abs(result["rel_diff"]) > 0.01 or result["query_rc"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
