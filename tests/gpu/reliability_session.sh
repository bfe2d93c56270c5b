#!/usr/bin/env bash
# One device call for parts of examples/benchmarks/reliability.py: PARTS=soak,preempt,... [LIMIT=s]
# [EXTRA="--bench-timeout 330"] [SANITIZER_K="a pytest -k expression" (spaces survive)]; the results are merged into a copy of the committed
# results/reliability-h200.json written to $OUT (copy it back); server logs (last 200 kB each) to
# $OUT/logs. Pass ATOM_COMMIT=<hash> (git on the device can report a stale HEAD).
set -uo pipefail
export OUT=${OUT:-/tmp/atom-out}; mkdir -p "$OUT"
source .devbundle/vllm_env.sh > "$OUT/env.log" 2>&1 || { cat "$OUT/env.log"; exit 1; }
source tests/gpu/plugin_env.sh
cp examples/benchmarks/results/reliability-h200.json "$OUT/" 2>/dev/null
timeout ${LIMIT:-560} python examples/benchmarks/reliability.py --parts "$PARTS" --out "$OUT" --work /tmp/rw ${EXTRA:-} \
    ${SANITIZER_K:+--sanitizer-k "$SANITIZER_K"} 2>&1 | tail -20
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/reliability-h200.json"))
for p in os.environ["PARTS"].split(","):
    r = d["parts"].get(p, {})
    print(p, {k: v for k, v in r.items() if k not in ("server_args", "first_difference", "default_mode", "baseline_16bit", "cases")})
    for sub in ("default_mode", "baseline_16bit"):
        if sub in r: print("  ", sub, {k: r[sub].get(k) for k in ("identical", "requests", "preemptions", "ok")})
PY
mkdir -p "$OUT/logs"; for f in /tmp/rw/*.log /tmp/rw/*.json; do [ -f "$f" ] && tail -c 200000 "$f" > "$OUT/logs/$(basename $f)"; done
