#!/usr/bin/env bash
# One device call: the kernel tests (summary line only), then `vllm bench latency` (batch 1,
# 128 + 128) and `vllm bench throughput` (300 x 512/256) for FP8 W8A8 + FP8 KV and Atom + INT4 KV
# on the Llama-2-7B shape (examples/benchmarks/bench_vllm.sh), each step under a timeout.
#     bash tests/gpu/e2e_bench_session.sh        (with .devbundle carried; BUDGET seconds, default 500;
#                                                TESTS=0 skips the kernel tests; STEPS="CONFIG LATENCY ..."
#                                                picks and orders the runs)
set -uo pipefail
export OUT=${OUT:-/tmp/atom-out}; mkdir -p "$OUT"
t0=$(date +%s); BUDGET=${BUDGET:-500}
source .devbundle/vllm_env.sh > "$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
source tests/gpu/plugin_env.sh
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
if [ "${TESTS:-1}" = 1 ]; then  # TESTS=0: the benchmarks only (the tests ran in an earlier call)
    timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_sm90.py tests/gpu/test_kernels.py > "$OUT/tests.log" 2>&1
    echo "tests rc=$? $(tail -1 "$OUT/tests.log")  ($(( $(date +%s) - t0 ))s)"
fi
IFS=, read -ra steps <<< "${STEPS:-fp8 1,atom-kv4 1,fp8 0,atom-kv4 0}"
for step in "${steps[@]}"; do
    set -- $step
    l=$(left); (( l < 60 )) && { echo "skip $1 latency=$2 (budget)"; continue; }
    if [ "$2" = 1 ]; then tag=lat; else tag=tp; fi
    # latency only (NPROMPTS tiny) or throughput only (LATENCY=0)
    if [ "$2" = 1 ]; then
        CONFIGS=$1 LATENCY=1 THROUGHPUT=0 timeout "$l" bash examples/benchmarks/bench_vllm.sh "$OUT/$tag" > "$OUT/$tag-$1.txt" 2>&1
    else
        CONFIGS=$1 LATENCY=0 timeout "$l" bash examples/benchmarks/bench_vllm.sh "$OUT/$tag" > "$OUT/$tag-$1.txt" 2>&1
    fi
    echo "$tag $1 rc=$?: $(tail -1 "$OUT/$tag-$1.txt")  ($(( $(date +%s) - t0 ))s)"
done
