#!/usr/bin/env bash
# vLLM's own benchmarks, unchanged, on a Llama-2-7B-shaped model with dummy weights:
# Atom W4A4 (--load-format dummy fills valid random quantized weights) against BF16 and
# FP8 W8A8 in the same run, and Atom with its INT4 KV cache (or FP8 KV) against Atom with BF16 KV.
# Usage: bash examples/benchmarks/bench_vllm.sh OUT_DIR [TOKENIZER_DIR]
#   CONFIGS=bf16,fp8,atom,atom-kv4,atom-fp8kv (default: these), atom-kv4-nofuse (Atom + INT4 KV without the
#   quantization fused into norms / SiLU, VLLM_ATOM_FUSION=0)   LATENCY=0 skips `vllm bench latency`,
#   THROUGHPUT=0 skips `vllm bench throughput`
# Writes OUT_DIR/vllm-{throughput,latency}-CONFIG.json and prints one line each (with the KV
# cache size vLLM reported).
set -uo pipefail
OUT=${1:-/tmp/atom-out}; TOK=${2:-/tmp/atom-tiny-tokenizer}
NPROMPTS=${NPROMPTS:-300}; IN=${IN_LEN:-512}; OUTLEN=${OUT_LEN:-256}; UTIL=${UTIL:-0.3}
CONFIGS=${CONFIGS:-bf16,fp8,atom,atom-kv4,atom-fp8kv}; LATENCY=${LATENCY:-1}
mkdir -p "$OUT"
[ -f "$TOK/tokenizer.json" ] || python3 .devbundle/make_tiny_llama.py "$TOK" --hidden 128 --layers 1 \
    --heads 2 --kv-heads 2 --intermediate 256 >/dev/null
make_model() {  # make_model DIR WITH_ATOM
    mkdir -p "$1"; cp "$TOK"/tokenizer* "$TOK"/special_tokens_map.json "$1"/ 2>/dev/null
    python3 - "$1" "$2" <<'PY'
import json, sys
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
       "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
       "num_hidden_layers": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
       "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
if sys.argv[2] == "1":
    from vllm_atom.config import AtomConfig
    cfg["quantization_config"] = AtomConfig(kv_bits=None).to_dict()
json.dump(cfg, open(sys.argv[1] + "/config.json", "w"))
PY
}
make_model /tmp/llama2-7b-shape 0
make_model /tmp/llama2-7b-atom 1
common=(--load-format dummy --dtype bfloat16 --max-model-len 2048 --gpu-memory-utilization "$UTIL")
run() {  # run NAME MODEL [extra args]
    local name=$1 model=$2; shift 2
    [ "${THROUGHPUT:-1}" = 1 ] && vllm bench throughput --model "$model" "${common[@]}" "$@" --dataset-name random \
        --random-input-len "$IN" --random-output-len "$OUTLEN" --num-prompts "$NPROMPTS" \
        --output-json "$OUT/vllm-throughput-$name.json" > "$OUT/vllm-throughput-$name.log" 2>&1
    [ "$LATENCY" = 1 ] && vllm bench latency --model "$model" "${common[@]}" "$@" --input-len 128 \
        --output-len 128 --batch-size 1 --num-iters-warmup 3 --num-iters 10 \
        --output-json "$OUT/vllm-latency-$name.json" > "$OUT/vllm-latency-$name.log" 2>&1
    python3 - "$OUT" "$name" <<'PY'
import json, sys, os, re
out, name = sys.argv[1:]
t = os.path.join(out, f"vllm-throughput-{name}.json"); l = os.path.join(out, f"vllm-latency-{name}.json")
tp = json.load(open(t))["tokens_per_second"] if os.path.exists(t) else float("nan")
lat = json.load(open(l))["avg_latency"] if os.path.exists(l) else float("nan")
log = os.path.join(out, f"vllm-throughput-{name}.log")
m = re.findall(r"GPU KV cache size: ([\d,]+) tokens", open(log).read()) if os.path.exists(log) else []
kv = m[-1] if m else "?"
print(f"vllm_bench {name:10s} throughput {tp:9.0f} tok/s   latency(b=1, 128+128) {lat:6.3f} s   KV cache {kv} tokens")
PY
}
has() { [[ ",$CONFIGS," == *",$1,"* ]]; }
has bf16 && run bf16 /tmp/llama2-7b-shape
has fp8 && run fp8 /tmp/llama2-7b-shape --quantization fp8 --kv-cache-dtype fp8
has atom && run atom /tmp/llama2-7b-atom
has atom-kv4 && run atom-kv4 /tmp/llama2-7b-atom --kv-cache-dtype int4_per_token_head --attention-backend CUSTOM
has atom-kv4-nofuse && VLLM_ATOM_FUSION=0 run atom-kv4-nofuse /tmp/llama2-7b-atom --kv-cache-dtype int4_per_token_head \
    --attention-backend CUSTOM
has atom-fp8kv && run atom-fp8kv /tmp/llama2-7b-atom --kv-cache-dtype fp8
