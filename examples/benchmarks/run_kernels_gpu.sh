#!/usr/bin/env bash
# One device call: GPU kernel tests, then the GEMM benchmark. Logs and results go to $OUT.
#   bash examples/benchmarks/run_kernels_gpu.sh [tests|bench|quick|all] [pytest -k expr]
set -o pipefail
OUT=${OUT:-/tmp/atom-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
what=${1:-all}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels.py ${2:+-k "$2"} --maxfail=8 --tb=short 2>&1 \
    | tee "$OUT/tests.log" | tail -n 25
fi
if [[ $what == bench || $what == all || $what == quick ]]; then
  extra=""; [[ $what == quick ]] && extra=--quick
  python3 examples/benchmarks/bench_gemm.py --out "$OUT" $extra 2>&1 \
    | tee "$OUT/bench.log" | tail -n 140
fi
if [[ $what == profile ]]; then
  ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 examples/benchmarks/bench_gemm.py --profile > "$OUT/ncu.txt" 2>&1
  grep -E "w4a4_gemm|act_quant|Duration|Throughput|Registers|Achieved Occupancy|Stall|Warp Cycles|Issued Ipc|No Eligible|Block Size|Grid Size|Waves" "$OUT/ncu.txt" | head -120
fi
