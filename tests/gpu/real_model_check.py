"""A real Atom checkpoint through vLLM on the GPU machine: `vllm serve` answers
/v1/completions and /v1/chat/completions, and wiki perplexity through vLLM's prompt
logprobs is compared with `vllm-atom eval`'s simulated number on the same windows.

    python tests/gpu/real_model_check.py CKPT TEXT EXPECTED.json [--seqlen 2048 --max-tokens N]

EXPECTED.json is the output of `vllm-atom eval CKPT --text TEXT --seqlen S --max-tokens N
--json EXPECTED.json` (run on the CPU machine). Writes $OUT/real-model.json.
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


def serve_and_query(ckpt: str, port: int = 8011) -> dict:
    cmd = ["vllm", "serve", ckpt, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float16",
           "--served-model-name", "atom", "--gpu-memory-utilization", "0.3", "--max-model-len", "4096"]
    log = open(os.path.join(os.environ.get("OUT", "/tmp"), "vllm-serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while time.time() - t0 < 240:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("vllm serve exited; see vllm-serve.log")
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
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from vllm_atom.evaluate import eval_windows

    expected = json.load(open(args.expected))
    row = expected[0] if isinstance(expected, list) else expected
    row = row.get("rows", [row])[0] if "rows" in row else row
    seqlen, tokens = int(row["seqlen"]), int(row["tokens"])
    result = {"expected": row}
    result.update(serve_and_query(args.ckpt))

    tok = AutoTokenizer.from_pretrained(args.ckpt)
    windows = eval_windows(tok, args.text, seqlen, tokens).tolist()
    ids, res = "/tmp/real-ids.json", "/tmp/real-vllm.json"
    json.dump(windows, open(ids, "w"))
    subprocess.run([sys.executable, os.path.join(HERE, "vllm_logprobs.py"), args.ckpt, ids, res,
                    "--gpu-memory-utilization", "0.3"], check=True)
    got = json.load(open(res))
    lps = [lp for w in got["windows"] for lp in w["logprob"]]
    ppl = math.exp(-sum(lps) / len(lps))
    result.update({"vllm_ppl": ppl, "vllm_tokens": len(lps), "sim_ppl": row["ppl"],
                   "rel_diff": ppl / row["ppl"] - 1})
    print("real-model", json.dumps({k: v for k, v in result.items() if k != "answers"}))
    json.dump(result, open(os.path.join(os.environ.get("OUT", "/tmp"), "real-model.json"), "w"), indent=1)
    if abs(result["rel_diff"]) > 0.01 or result["query_rc"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
