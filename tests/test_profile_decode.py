"""examples/benchmarks/profile_decode.py without a GPU: kernel names to categories, a trace to the
per-step table (the GPU run itself is the script's)."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))
import profile_decode as pd  # noqa: E402


def test_categories():
    assert pd.category("w4a4_sm90") == "atom gemm"
    assert pd.category("fused_add_rmsnorm_act_quant") == pd.category("act_quant") == \
        "atom quantize (+ fused norm / SiLU)"
    assert pd.category("kv_int4_decode_attention") == pd.category("flash_fwd_splitkv_kernel") == "attention"
    assert pd.category("void vllm::dynamic_per_token_scaled_fp8_quant_kernel<...>") == "fp8 quantize"
    assert pd.category("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "gemm (fp8 / bf16 / lm_head)"
    assert pd.category("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == \
        "norm / activation / residual (Triton, vLLM)"
    assert pd.category("void at::native::vectorized_elementwise_kernel") == "other"


def test_trace_to_summary(tmp_path):
    ev = [{"ph": "X", "cat": "kernel", "name": n, "dur": d} for n, d in
          [("w4a4_sm90", 10.0), ("w4a4_sm90", 6.0), ("act_quant", 2.0), ("triton_poi_fused_add_0", 1.0)] * 4]
    ev += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "dur": 50.0}]
    (tmp_path / "worker.pt.trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": ev}).encode()))
    (tmp_path / "engine.pt.trace.json").write_text(json.dumps({"traceEvents": ev[:1]}))  # fewer kernels
    s = pd.summarize(pd.read_trace(tmp_path), steps=2)
    assert s["us_per_step"] == {"atom gemm": 32.0, "atom quantize (+ fused norm / SiLU)": 4.0,
                                "norm / activation / residual (Triton, vLLM)": 2.0}
    assert s["total_us_per_step"] == 38.0 and s["kernels_per_step"] == 8.0
    assert s["top_kernels"][0] == {"name": "w4a4_sm90", "category": "atom gemm", "us_per_step": 32.0,
                                   "calls_per_step": 4.0}
