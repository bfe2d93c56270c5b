#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B on the GPU machine (issue 3): GGUF -> HF, Atom quantization with the
# default 128 x 2048 calibration, and the full ladder on 65,536 tokens of wiki and c4.
# Needs no vLLM (the quantizer and the simulation are plain torch + transformers).
#
# On the CPU machine, gather the inputs in one folder and slice it for the device tool:
#     mkdir -p /tmp/qwen-carry
#     python -m vllm_atom.data assemble-qwen /tmp/qwen-carry/qwen.gguf      # 1.05 GB, Q4_K_M
#     cp "$(python -m vllm_atom.data where wiki)" "$(python -m vllm_atom.data where c4)" \
#        "$(python -m vllm_atom.data where austen)" /tmp/qwen-carry/
#     pip download gguf --no-deps -d /tmp/qwen-carry                          # not on the GPU image
#     python3 ../shared/device/carry_parts.py pack /tmp/qwen-carry qwen --part-mb 60
# then one device call per part, back to back (each: bash .devcarry/qwen/partNN/recv.sh), the
# last one followed by:
#     bash tests/gpu/qwen_ladder.sh /tmp/devcarry/qwen/data
# Writes $OUT/accuracy-qwen.json (rows for examples/benchmarks/results/accuracy.json) and
# $OUT/qwen-quantize.log (wall time and peak RSS from /usr/bin/time -v, GPU peak from the log).
set -euo pipefail
D=${1:?usage: qwen_ladder.sh DATA_DIR}
OUT=${OUT:-/tmp/atom-out}; mkdir -p "$OUT"
SAMPLES=${SAMPLES:-128}; TOKENS=${TOKENS:-65536}; DEVICE=${DEVICE:-cuda}
python3 -m pip install --no-deps --no-index -q -t /tmp/gguf-site "$D"/gguf-*.whl
export PYTHONPATH=$PWD:/tmp/gguf-site:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "cpu ($DEVICE)"; } | tee "$OUT/device.txt"
echo "${ATOM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee "$OUT/commit.txt"

HF=${HF:-/tmp/qwen2.5-coder-1.5b}; CKPT=${CKPT:-/tmp/qwen-atom}
[ -f "$HF/config.json" ] || python3 -c "import sys; from vllm_atom.data import gguf_to_hf; gguf_to_hf(sys.argv[1], sys.argv[2], 'bfloat16')" "$D/qwen.gguf" "$HF"
wiki=$(ls "$D"/wiki*.utf8); c4=$(ls "$D"/c4*.utf8); austen=$(ls "$D"/austen*)
TIMEV=$([ -x /usr/bin/time ] && echo "/usr/bin/time -v")
[ -f "$CKPT/config.json" ] || $TIMEV python3 -m vllm_atom.cli quantize "$HF" "$CKPT" \
    --calib-text "$austen" --nsamples "$SAMPLES" --seqlen 2048 --device "$DEVICE" ${QUANT_ARGS:-} 2>&1 | tee "$OUT/qwen-quantize.log"
# The eval holds one fp32 copy of the linears per method (5.2 GB each for this model): the
# whole ladder at once does not fit an 80 GB GPU, so it runs in two halves (FP16 is the KL /
# top-1 reference of both).
for t in "$wiki" "$c4"; do
    for methods in ${METHODS:-fp16,rtn,outliers-fp16,outliers-int8 group128,clip,atom,atom-kv4}; do
        python3 -m vllm_atom.cli eval "$HF" --checkpoint "$CKPT" --text "$t" --seqlen 2048 --max-tokens "$TOKENS" \
            --device "$DEVICE" --methods "$methods" --model-name Qwen2.5-Coder-1.5B-Instruct \
            --json "$OUT/accuracy-qwen.json" 2>&1 | tr '\r' '\n' | { grep -v "Loading weights\|window/s\|s/window" || true; }
    done
done
python3 - "$OUT/accuracy-qwen.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows if isinstance(rows, list) else rows.get("rows", [])
for r in rows:
    print(f"{r['text']:>10} {r['method']:>10} ppl {r['ppl']:9.3f}  kl {r['kl']}  top1 {r['top1']}")
PY
