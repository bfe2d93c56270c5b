#!/usr/bin/env bash
# The GPU suite in one call of the device tool, from the repo root, with .devbundle carried:
#     bash tests/gpu/run.sh [STEPS]
# STEPS: comma list of kernels,kv,e2e,real,real_kv4,gemm,attn_bench,vllm_bench (default: all but
# real*). kv: the INT4 KV cache kernels; real / real_kv4: a real checkpoint served by vLLM (16-bit
# / Atom INT4 KV cache), perplexity vs `vllm-atom eval`; they need REAL_CKPT, REAL_TEXT and
# REAL_EXPECTED (the eval's --json with methods atom,atom-kv4) in the environment.
# E2E_ARGS: extra pytest arguments of the e2e step (no spaces inside one); E2E_K: its -k expression.
# Sets up the device bundle's vLLM and makes the plugin an installed distribution (vLLM finds
# plugins through entry points in every process), runs each step, and prints a short table.
# Logs and JSON land in $OUT (the device tool brings them back).
set -uo pipefail
STEPS=${1:-kernels,kv,e2e,gemm,attn_bench,vllm_bench}
export OUT=${OUT:-/tmp/atom-out}; mkdir -p "$OUT"
source .devbundle/vllm_env.sh || exit 1
source tests/gpu/plugin_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
echo "${ATOM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee "$OUT/commit.txt"

summary=()
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record status and time
    local name=$1; shift
    local t0=$(date +%s)
    echo "=== $name: $*"
    "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    summary+=("$(printf '%-12s rc=%-3s %5ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" \
        "$(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -1 | cut -c1-80)")")
}

has() { [[ ",$STEPS," == *",$1,"* ]]; }
has kernels && step kernels python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py
has kv && step kv python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kv_int4.py
has e2e && step e2e python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_vllm_e2e.py ${E2E_ARGS:-} \
    ${E2E_K:+-k "$E2E_K"}
has real && step real python3 tests/gpu/real_model_check.py "$REAL_CKPT" "$REAL_TEXT" "$REAL_EXPECTED"
has real_kv4 && step real_kv4 python3 tests/gpu/real_model_check.py "$REAL_CKPT" "$REAL_TEXT" "$REAL_EXPECTED" --kv4
has gemm && step gemm python3 examples/benchmarks/bench_gemm.py --out "$OUT"
has attn_bench && step attn_bench python3 examples/benchmarks/bench_attention.py --out-dir "$OUT" ${ATTN_ARGS:-}
has vllm_bench && step vllm_bench bash examples/benchmarks/bench_vllm.sh "$OUT"

echo; echo "=== summary ($(cat "$OUT/device.txt"), commit $(cat "$OUT/commit.txt" 2>/dev/null))"
printf '%s\n' "${summary[@]}"
for f in "$OUT"/e2e-*.json "$OUT"/real-model*.json; do [ -f "$f" ] && cat "$f" && echo; done
