"""examples/benchmarks/bench_e2e.py on CPU: commands, the fit check, log parsing, the JSON merge,
the summary ratios, and the whole driver against a fake `vllm` executable (subprocess, timeout,
failure, merge across calls)."""

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "benchmarks" / "bench_e2e.py"
spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
be = sys.modules["bench_e2e"] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(be)

H200_GIB = 140.4  # what torch.cuda.mem_get_info reports on an H200 ("141 GB")


def test_command_throughput_and_latency(tmp_path):
    cmd = be.bench_command("vllm", tmp_path / "m", be.CONFIGS["fp8"], be.WORKLOADS["4096x512"], 0.9,
                           tmp_path / "o.json")
    s = " ".join(cmd)
    assert cmd[:3] == ["vllm", "bench", "throughput"]
    assert "--load-format dummy --dtype bfloat16 --max-model-len 5120 --gpu-memory-utilization 0.9" in s
    assert "--quantization fp8 --kv-cache-dtype fp8" in s
    assert "--dataset-name random --random-input-len 4096 --random-output-len 512 --num-prompts 100" in s
    assert cmd[-2:] == ["--output-json", str(tmp_path / "o.json")]
    assert "--num-prompts 7" in " ".join(be.bench_command("vllm", tmp_path, be.CONFIGS["bf16"],
                                                          be.WORKLOADS["512x256"], 0.5, tmp_path, num_prompts=7))
    lat = " ".join(be.bench_command("vllm", tmp_path, be.CONFIGS["atom-kv4"], be.WORKLOADS["lat-b16"], 0.1709,
                                    tmp_path / "o.json"))
    assert "bench latency" in lat and "--gpu-memory-utilization 0.1709" in lat
    assert "--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM" in lat
    assert "--input-len 128 --output-len 128 --batch-size 16 --num-iters-warmup 3 --num-iters 10" in lat
    w4 = be.bench_command("vllm", tmp_path, be.CONFIGS["w4a16"], be.WORKLOADS["lat-b1"], 0.9, tmp_path)
    assert "--linear-backend marlin" in " ".join(w4) and "--quantization" not in w4


def test_weight_bytes_and_fit():
    m70, m7 = be.MODELS["llama-2-70b"], be.MODELS["llama-2-7b"]
    assert be.weight_bytes(m70, be.CONFIGS["bf16"]) == pytest.approx(138e9, rel=0.01)
    assert be.weight_bytes(m7, be.CONFIGS["bf16"]) == pytest.approx(13.5e9, rel=0.01)
    # 4-bit linears ~0.53 B/param, the bf16 embeddings + lm_head on top
    emb = 2 * 2 * m70.vocab * m70.hidden
    lin_params = (be.weight_bytes(m70, be.CONFIGS["bf16"]) - emb) / 2
    for cfg in ("w4a16", "atom-kv4"):
        assert (be.weight_bytes(m70, be.CONFIGS[cfg]) - emb) / lin_params == pytest.approx(0.53, abs=0.015)
    assert (be.weight_bytes(m70, be.CONFIGS["fp8"]) - emb) / lin_params == pytest.approx(1.0, abs=0.01)
    small, big = be.parse_budgets("24GiB,0.9", H200_GIB * be.GIB)
    assert (small.label, small.util, big.util) == ("24GiB", round(24 / H200_GIB, 4), 0.9)
    assert "138.0 GB" in be.fit_reason(m70, be.CONFIGS["bf16"], big.nbytes)
    assert be.fit_reason(m70, be.CONFIGS["fp8"], big.nbytes) is None
    assert be.fit_reason(m70, be.CONFIGS["atom-kv4"], small.nbytes) is not None
    assert all(be.fit_reason(m, q, small.nbytes) is None for m in (m7, be.MODELS["llama-3-8b"])
               for q in be.CONFIGS.values())
    with pytest.raises(ValueError, match="outside"):
        be.parse_budgets("200GiB", H200_GIB * be.GIB)


def test_kv_bytes_per_token():
    m = be.MODELS["llama-3-8b"]  # 32 layers x K,V x 8 heads x 128
    assert be.kv_bytes_per_token(m, be.CONFIGS["bf16"]) == 32 * 2 * 8 * 128 * 2
    assert be.kv_bytes_per_token(m, be.CONFIGS["atom-fp8kv"]) == 32 * 2 * 8 * 128
    assert be.kv_bytes_per_token(m, be.CONFIGS["atom-kv4"]) == 32 * 2 * 8 * (64 + 4)


def test_parse_kv_tokens_and_result():
    log = ("INFO [kv_cache_utils.py:1] GPU KV cache size: 56,816 tokens\n"
           "INFO [kv_cache_utils.py:1] GPU KV cache size: 1,138,400 tokens\nThroughput: ...")
    assert be.parse_kv_tokens(log) == 1138400
    assert be.parse_kv_tokens("nothing here") is None
    tp = be.parse_result(be.WORKLOADS["512x256"], {"elapsed_time": 10.0, "num_requests": 300,
                                                   "total_num_tokens": 230400, "requests_per_second": 30.0,
                                                   "tokens_per_second": 23040.0})
    assert tp == dict(tokens_per_s=23040.0, output_tokens_per_s=7680.0, requests_per_s=30.0)
    lat = be.parse_result(be.WORKLOADS["lat-b1"], {"avg_latency": 0.64, "latencies": [0.64]})
    assert lat == dict(avg_latency_s=0.64, s_per_output_token=0.005)


def row(config, tps=None, lat=None, model="llama-2-7b", util="0.9", workload="512x256", **kw):
    bench = "latency" if workload.startswith("lat") else "throughput"
    r = dict(model=model, config=config, util=util, workload=workload, bench=bench, **kw)
    if tps is not None:
        r["tokens_per_s"] = tps
    if lat is not None:
        r["avg_latency_s"] = lat
    return r


def test_merge_replaces_by_key_and_keeps_the_rest():
    old = [row("bf16", 100.0), row("fp8", 200.0), row("fp8", 50.0, util="24GiB")]
    new = [row("fp8", 210.0), row("atom-kv4", 300.0)]
    merged = be.merge_rows(old, new)
    assert len(merged) == 4
    got = {(r["config"], r["util"]): r["tokens_per_s"] for r in merged}
    assert got == {("bf16", "0.9"): 100.0, ("fp8", "0.9"): 210.0, ("fp8", "24GiB"): 50.0, ("atom-kv4", "0.9"): 300.0}
    # suite order: budget (24GiB before 0.9), then config
    assert [(r["util"], r["config"]) for r in merged] == [
        ("24GiB", "fp8"), ("0.9", "bf16"), ("0.9", "fp8"), ("0.9", "atom-kv4")]


def test_summary_ratios():
    rows = [row("bf16", 100.0), row("fp8", 200.0), row("atom-kv4", 300.0),
            row("w4a16", skipped="too big"),
            row("bf16", lat=1.0, workload="lat-b1"), row("fp8", lat=0.8, workload="lat-b1"),
            row("atom-kv4", lat=0.5, workload="lat-b1"),
            row("atom-kv4", 999.0, model="llama-3-8b")]  # no baseline of its own model
    r = {(x["model"], x["config"], x["workload"]): x for x in be.with_ratios(rows)}
    assert (r[("llama-2-7b", "atom-kv4", "512x256")]["x_fp8"], r[("llama-2-7b", "atom-kv4", "512x256")]["x_bf16"]) \
        == (1.5, 3.0)
    assert r[("llama-2-7b", "atom-kv4", "lat-b1")]["x_fp8"] == 1.6  # latency: theirs / mine
    assert r[("llama-2-7b", "w4a16", "512x256")]["x_fp8"] is None
    assert r[("llama-3-8b", "atom-kv4", "512x256")]["x_bf16"] is None
    table = be.format_summary(rows)
    assert "skipped: too big" in table and "1.50" in table and "3.00" in table


FAKE_VLLM = r'''#!{python}
"""Stands in for `vllm bench throughput|latency`: a log line and vLLM 0.26.0's --output-json."""
import json, os, subprocess, sys, time
argv = sys.argv[1:]
opt = lambda name: argv[argv.index(name) + 1]
line = " ".join(argv)
if os.environ.get("FAKE_SLOW") and os.environ["FAKE_SLOW"] in line:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # an "engine core"
    open(os.environ["FAKE_CHILD_PID"], "w").write(str(child.pid))
    time.sleep(60)
if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in line:
    print("ValueError: Failed to find a kernel", file=sys.stderr)
    sys.exit(1)
util = float(opt("--gpu-memory-utilization"))
print(f"INFO [kv_cache_utils.py:2177] GPU KV cache size: {{int(util * 100000):,}} tokens", file=sys.stderr)
if argv[1] == "throughput":
    n, i, o = int(opt("--num-prompts")), int(opt("--random-input-len")), int(opt("--random-output-len"))
    res = dict(elapsed_time=2.0, num_requests=n, total_num_tokens=n * (i + o), requests_per_second=n / 2.0,
               tokens_per_second=n * (i + o) / 2.0)
else:
    res = dict(avg_latency=0.5, latencies=[0.5] * 10, percentiles={{"50": 0.5}})
json.dump(res, open(opt("--output-json"), "w"))
'''


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_driver_end_to_end_with_fake_vllm(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "vllm"
    fake.write_text(FAKE_VLLM.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLOW", "llama-2-7b-atom-fp8kv")  # its --output-json path names model and config
    monkeypatch.setenv("FAKE_CHILD_PID", str(tmp_path / "child.pid"))
    monkeypatch.setenv("FAKE_FAIL", "--linear-backend marlin")
    monkeypatch.setenv("ATOM_COMMIT", "abc1234")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = tmp_path / "results"
    common = ["--gpu-mem-gib", str(H200_GIB), "--device-name", "NVIDIA H200", "--out", str(out),
              "--model-dir", str(tmp_path / "models"), "--log-dir", str(tmp_path / "logs"),
              "--tokenizer", str(tok), "--timeout", "3"]
    assert be.main(common + ["--models", "llama-2-7b,llama-2-70b", "--configs", "bf16,fp8,w4a16,atom-fp8kv",
                             "--budgets", "0.9", "--workloads", "512x256,lat-b1",
                             "--num-prompts", "512x256=40"]) == 0
    path = out / "e2e-suite-h200.json"
    data = json.loads(path.read_text())
    rows = {(r["model"], r["config"], r["workload"]): r for r in data["rows"]}
    assert len(rows) == 2 * 4 * 2
    ok = rows[("llama-2-7b", "bf16", "512x256")]
    assert ok["tokens_per_s"] == 40 * 768 / 2.0 and ok["num_prompts"] == 40
    assert ok["kv_cache_tokens"] == 90000 and ok["commit"] == "abc1234" and ok["device"] == "NVIDIA H200"
    assert ok["command"].startswith("vllm bench throughput --model ") and ok["vllm"] and ok["wall_s"] >= 0
    lat = rows[("llama-2-7b", "fp8", "lat-b1")]
    assert (lat["avg_latency_s"], lat["s_per_output_token"], lat["batch_size"]) == (0.5, pytest.approx(0.5 / 128, abs=1e-6), 1)
    assert "138.0 GB" in rows[("llama-2-70b", "bf16", "512x256")]["skipped"]
    assert "tokens_per_s" in rows[("llama-2-70b", "fp8", "512x256")]
    assert rows[("llama-2-7b", "w4a16", "lat-b1")]["error"].startswith("rc=1: ValueError")
    slow = rows[("llama-2-7b", "atom-fp8kv", "512x256")]
    assert slow["error"] == "timeout after 3 s" and slow["kv_cache_tokens"] is None
    assert not alive(int((tmp_path / "child.pid").read_text()))  # the whole process group went
    assert (out / "e2e-suite-h200.png").exists() == bool(importlib.util.find_spec("matplotlib"))
    assert json.loads((tmp_path / "models" / "llama-2-7b-gptq" / "config.json").read_text())[
        "quantization_config"] == be.GPTQ_CONFIG
    assert (tmp_path / "models" / "llama-2-7b-atom" / "tokenizer.json").exists()

    # a second call fills other keys, replaces its own, keeps the rest
    monkeypatch.delenv("FAKE_SLOW")
    assert be.main(common + ["--models", "llama-2-7b", "--configs", "atom-fp8kv,atom-kv4", "--budgets", "0.9,24GiB",
                             "--workloads", "512x256", "--skip-existing"]) == 0
    rows2 = {(r["model"], r["config"], r["util"], r["workload"]): r for r in json.loads(path.read_text())["rows"]}
    assert len(rows2) == 16 + 3
    assert "tokens_per_s" in rows2[("llama-2-7b", "atom-fp8kv", "0.9", "512x256")]  # was a timeout
    assert "error" in rows2[("llama-2-7b", "atom-fp8kv", "0.9", "lat-b1")]  # not asked again: kept
    assert rows2[("llama-2-7b", "atom-kv4", "24GiB", "512x256")]["gpu_memory_utilization"] == round(24 / H200_GIB, 4)

    capsys.readouterr()
    assert be.main(["--summary", str(path)]) == 0
    table = capsys.readouterr().out
    assert "atom-kv4" in table and "timeout" in table and "skipped" in table


def test_dry_run_runs_nothing(tmp_path, capsys):
    assert be.main(["--dry-run", "--gpu-mem-gib", "80", "--device-name", "NVIDIA H100", "--vllm", "/nonexistent/vllm",
                    "--out", str(tmp_path / "r"), "--model-dir", str(tmp_path / "m"), "--log-dir", str(tmp_path / "l"),
                    "--tokenizer", str(tmp_path / "none"), "--models", "llama-3-8b", "--configs", "atom-kv4",
                    "--workloads", "4096x512"]) == 0
    out = capsys.readouterr().out
    assert out.count("/nonexistent/vllm bench throughput") == 2  # 24GiB and 0.9
    assert "--gpu-memory-utilization 0.3" in out  # 24 / 80
    cfg = json.loads((tmp_path / "m" / "llama-3-8b-atom" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["vocab_size"], cfg["rope_theta"]) == (8, 128256, 500000.0)
    assert cfg["quantization_config"]["quant_method"] == "atom" and cfg["quantization_config"]["kv_bits"] is None
    assert not (tmp_path / "r").exists()
