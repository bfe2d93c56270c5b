#!/usr/bin/env bash
# One device call for the sm90 GEMM: correctness first (each step under a timeout, so a hung
# kernel costs its timeout, not the call), then the GEMM benchmark if time is left.
#     bash tests/gpu/sm90_session.sh [BENCH_ARGS...]      (with .devbundle carried)
# BUDGET (seconds, default 540) bounds the whole call; SM90_TESTS picks the pytest selection;
# E2E_K (a pytest -k expression) adds tests/gpu/test_vllm_e2e.py; BENCH=0 skips the benchmark.
# Pass ATOM_COMMIT=<hash> for the JSON's commit field: git on the device machine can report a
# stale HEAD (it did on 2026-12-02).
# Compiling on the device costs its time: `bash tests/gpu/kernel_cache.sh build` here first and
# carry .kcache.tar.xz (tests/gpu/kernel_cache.sh).
set -uo pipefail
export OUT=${OUT:-/tmp/atom-out}; mkdir -p "$OUT"
t0=$(date +%s); BUDGET=${BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
source .devbundle/vllm_env.sh > "$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
[ -n "${VLLM_ATOM_KERNEL_CACHE:-}" ] || source tests/gpu/kernel_cache.sh
export PYTHONPATH=$PWD:$PYTHONPATH
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/device.txt"
run() {  # run NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local l; l=$(left); (( limit > l )) && limit=$l
    (( limit < 20 )) && { echo "=== $name: skipped (budget)"; return; }
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
    tail -n "${TAIL:-25}" "$OUT/$name.log"; echo "--- $name rc=$rc after $(( $(date +%s) - t0 ))s"
}
run smoke 150 python -m pytest -x -q -p no:cacheprovider tests/gpu/test_sm90.py \
    -k "${SM90_SMOKE:-quantize_act_sm90 or every_cluster_split or fp16_bias}"
run tests "${TEST_LIMIT:-300}" python -m pytest -q -p no:cacheprovider ${SM90_TESTS:-tests/gpu/test_sm90.py}
if [ -n "${E2E_K:-}" ]; then  # vLLM with the kernels (tiny real-tokenizer models), a -k selection
    source tests/gpu/plugin_env.sh
    run e2e "${E2E_LIMIT:-300}" python -m pytest -q -s -p no:cacheprovider \
        tests/gpu/test_vllm_e2e.py -k "$E2E_K"
fi
[ "${BENCH:-1}" = 1 ] && TAIL=60 run bench 600 python examples/benchmarks/bench_gemm.py --out "$OUT" "$@"
