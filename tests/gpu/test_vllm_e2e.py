"""End to end on the GPU machine: quantize a tiny model, serve it through vLLM with
``quantization="atom"`` (torch.compile + CUDA graphs on), and compare prompt logprobs with
the simulated reference (`vllm_atom.evaluate`), for a Llama with injected outlier channels
and a Qwen2 with q/k/v biases.

Why the bounds are not "99% top-1" on a random model: vLLM computes norms, attention and
the residual stream in fp16 while the simulation does them in fp32, rounding only where
the runtime quantizes. INT4 turns a relative input difference d into a ~sqrt(d * step)
output difference (values near a rounding boundary flip by a whole step): 1 ulp of fp16
(5e-4) becomes ~1% per linear, and a random model compounds that over 28 linears. On CPU
the same model run in fp16 with the reference op in place of every linear agrees with the
fp32 simulation on 96% of top-1 tokens (bit-exact in fp32), while one wrong reorder index in
one layer drops that to 85% and multiplies |dlogprob| by 7. The tiny model is made
residual-dominated (embeddings x50, o/down x0.3) to keep that separation; the bounds sit
between the two. Real-model agreement is measured on SmolLM2 (perplexity within 1%).
Each run also reports agreement with the simulation run in fp16 (`--pipeline 16bit`): on an
H100 it was no closer (97.9 % / 97.5 % vs 97.8 % / 98.2 %), since vLLM's compiled, fused norms
and activations round at other points than any eager fp16 model.

Needs the device bundle (``source .devbundle/vllm_env.sh``) and the plugin visible as an
installed distribution (tests/gpu/run.sh sets both up). Results also go to $OUT/e2e-*.json.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from tiny_models import make_tiny, stdlib_text  # noqa: E402

pytestmark = pytest.mark.gpu

TOKENIZER_DIR = "/tmp/atom-tiny-tokenizer"
OUT = os.environ.get("OUT", "/tmp")


@pytest.fixture(scope="module")
def tokenizer_dir():
    if not os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        maker = os.path.join(os.getcwd(), ".devbundle", "make_tiny_llama.py")
        subprocess.run([sys.executable, maker, TOKENIZER_DIR, "--hidden", "128", "--layers", "1",
                        "--heads", "2", "--kv-heads", "2", "--intermediate", "256"], check=True)
    return TOKENIZER_DIR


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    return stdlib_text(str(d / "calib.txt"), 0, 40), stdlib_text(str(d / "eval.txt"), 120, 20)


def quantized_tiny(arch, tokenizer_dir, calib, root, row_shards=1, kv_skip_layers=(), center=False):
    from vllm_atom.config import AtomConfig
    from vllm_atom.quantize.pipeline import QuantizeOptions, quantize

    base = make_tiny(os.path.join(root, f"{arch}-fp16"), tokenizer_dir, arch=arch, outlier_gain=10.0,
                     logit_gain=8.0, branch_gain=0.3, emb_gain=50.0)
    out = os.path.join(root, f"{arch}-atom" + (f"-rs{row_shards}" if row_shards > 1 else "")
                       + ("-skip" + "-".join(map(str, kv_skip_layers)) if kv_skip_layers else "")
                       + ("-center" if center else ""))
    kv = dict(kv_bits=4, kv_skip_layers=kv_skip_layers, kv_center_k=center) if kv_skip_layers or center \
        else dict(kv_bits=None)
    if not os.path.exists(os.path.join(out, "config.json")):
        quantize(base, out, calib, AtomConfig(row_shards=row_shards, **kv),
                 QuantizeOptions(nsamples=32, seqlen=256, device="cuda"), progress=False)
    return out


def eval_windows(ckpt, text, n=8, seqlen=256):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok(open(text).read(), add_special_tokens=False)["input_ids"]
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def simulated_logprobs(ckpt, windows, kv_bits=None, pipelines=("fp32",), kv_skip_layers=(), rotate_k=None,
                       center=True):
    """Per pipeline, log_softmax of the simulated Atom model (runtime numerics; KV cache 16-bit or
    INT4, keys rotated as the checkpoint's kv_rotate_k says unless rotate_k is given, and centered
    by the checkpoint's k_center if it has them, unless center=False) at each position; pipeline
    "16bit" computes the unquantized ops in fp16 as vLLM does (`vllm-atom eval --pipeline 16bit`).
    The model is loaded once; fp32 must come first."""
    from vllm_atom.evaluate import SimModel, checkpoint_model, load_model
    model, io_dtype = load_model(ckpt, device="cuda")
    sim = SimModel(model, io_dtype)
    cfg, states, centers = checkpoint_model(sim, ckpt, device="cuda")
    sim.add_method("atom", states, kv_bits=kv_bits, kv_skip_layers=kv_skip_layers,
                   kv_rotate_k=cfg.kv_rotate_k if rotate_k is None else rotate_k,
                   kv_center=centers if center else None)
    sim.activate("atom")
    out = {}
    for pipeline in pipelines:
        if pipeline == "16bit":
            model.to(io_dtype)
        out[pipeline] = [torch.log_softmax(sim.logits(torch.tensor(w)).float(), -1).cpu() for w in windows]
    del model, sim
    torch.cuda.empty_cache()
    return out


def vllm_logprobs(ckpt, windows, tmp, *extra, env_extra=None):
    ids, res = os.path.join(tmp, "ids.json"), os.path.join(tmp, "vllm.json")
    json.dump(windows, open(ids, "w"))
    env = dict(os.environ, VLLM_DISABLE_COMPILE_CACHE="1", **(env_extra or {}))
    subprocess.run([sys.executable, os.path.join(HERE, "vllm_logprobs.py"), ckpt, ids, res, *extra],
                   check=True, env=env)
    return json.load(open(res))


def agreement(windows, sim, got) -> dict:
    """Top-1 agreement and |logprob difference| of vLLM's prompt logprobs against a simulation."""
    agree = total = 0
    dlp = []
    for w, s, v in zip(windows, sim, got["windows"]):
        sim_top1 = s[:-1].argmax(-1)                      # prediction for positions 1..
        sim_lp = s[torch.arange(len(w) - 1), torch.tensor(w[1:])]
        agree += int((sim_top1 == torch.tensor(v["top1"])).sum())
        total += len(w) - 1
        dlp.append((sim_lp - torch.tensor(v["logprob"])).abs())
    dlp = torch.cat(dlp)
    return {"top1_agreement": agree / total, "tokens": total, "mean_abs_dlogprob": float(dlp.mean()),
            "max_abs_dlogprob": float(dlp.max())}


KV4_ARGS = ("--kv-cache-dtype", "int4_per_token_head", "--attention-backend", "CUSTOM")


@pytest.mark.parametrize("kv", ["kv16", "kv4"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_atom_matches_simulated_reference(arch, kv, tokenizer_dir, texts, tmp_path):
    """kv4: Atom's INT4 KV cache through the plugin's attention backend, graphs on, against the
    simulation with KV quantized after RoPE; a second vLLM pass with a 64-token step budget
    forces chunked prefill (each window is read back from INT4 pages written in earlier steps)."""
    calib, evaltext = texts
    ckpt = quantized_tiny(arch, tokenizer_dir, calib, "/tmp/atom-e2e")
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "atom"
    windows = eval_windows(ckpt, evaltext)
    sims = simulated_logprobs(ckpt, windows, kv_bits=4 if kv == "kv4" else None, pipelines=("fp32", "16bit"))
    assert cfg["quantization_config"]["kv_rotate_k"] is True  # the default: vLLM stores rotated keys
    extra = KV4_ARGS if kv == "kv4" else ()
    got = vllm_logprobs(ckpt, windows, str(tmp_path), *extra)
    if kv == "kv4":
        chunked = vllm_logprobs(ckpt, windows, str(tmp_path), *extra, "--max-num-batched-tokens", "64",
                                 "--max-num-seqs", "8")
        d = [abs(a - b) for w1, w2 in zip(got["windows"], chunked["windows"])
             for a, b in zip(w1["logprob"], w2["logprob"])]
        chunk_dlp = sum(d) / len(d)
    result = {"arch": arch, "kv": kv, **agreement(windows, sims["fp32"], got), "vllm_load_s": got["load_s"]}
    result.update({f"{k}_16bit": v for k, v in agreement(windows, sims["16bit"], got).items() if k != "tokens"})
    if kv == "kv4":
        result["chunked_vs_whole_mean_abs_dlogprob"] = chunk_dlp
        unrot = agreement(windows, simulated_logprobs(ckpt, windows, kv_bits=4, rotate_k=False)["fp32"], got)
        result["top1_vs_unrotated_sim"] = unrot["top1_agreement"]
        result["mean_abs_dlogprob_vs_unrotated_sim"] = unrot["mean_abs_dlogprob"]
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, f"e2e-{arch}-{kv}.json"), "w"))
    if kv == "kv4":
        assert chunk_dlp < 0.05, result
    assert result["top1_agreement"] >= 0.93, result
    assert result["mean_abs_dlogprob"] < 0.12, result


def test_vllm_kv4_skip_layers(tokenizer_dir, texts, tmp_path):
    """A checkpoint that keeps the KV cache of layers 0 and 2 in 16 bit (kv_skip_layers, as
    Qwen2.5 needs), served with --kv-cache-dtype-skip-layers 0 2: those layers run vLLM's Triton
    attention over a bf16/fp16 cache inside the plugin's backend, the others Atom's INT4 cache
    (vLLM pads both page sizes to one). Against the simulation with the same skip layers; also
    reported: agreement with the all-INT4 simulation, which should be lower."""
    calib, evaltext = texts
    skip = (0, 2)
    ckpt = quantized_tiny("llama", tokenizer_dir, calib, "/tmp/atom-e2e", kv_skip_layers=skip)
    assert json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]["kv_skip_layers"] == [0, 2]
    windows = eval_windows(ckpt, evaltext)
    sim = simulated_logprobs(ckpt, windows, kv_bits=4, kv_skip_layers=skip)["fp32"]
    sim_all = simulated_logprobs(ckpt, windows, kv_bits=4)["fp32"]
    got = vllm_logprobs(ckpt, windows, str(tmp_path), *KV4_ARGS, "--kv-cache-dtype-skip-layers", "0", "2")
    vs_all = agreement(windows, sim_all, got)
    result = {"arch": "llama", "kv": "kv4-skip-0-2", **agreement(windows, sim, got),
              "top1_vs_all_int4_sim": vs_all["top1_agreement"],
              "mean_abs_dlogprob_vs_all_int4_sim": vs_all["mean_abs_dlogprob"],
              "vllm_load_s": got["load_s"]}
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, "e2e-llama-kv4-skip.json"), "w"))
    assert result["top1_agreement"] >= 0.93, result
    assert result["mean_abs_dlogprob"] < 0.12, result
    assert result["mean_abs_dlogprob"] < result["mean_abs_dlogprob_vs_all_int4_sim"], result


def test_vllm_kv4_centered_keys(tokenizer_dir, texts, tmp_path):
    """A checkpoint with kv_center_k (Qwen2: k_proj has a bias, so its keys have an offset),
    served with Atom's INT4 cache: vLLM loads each layer's self_attn.k_center and the cache write
    stores keys minus it. Against the centered simulation; also reported: agreement with the
    uncentered one, which must be lower wherever centering moves the simulation at all."""
    calib, evaltext = texts
    ckpt = quantized_tiny("qwen2", tokenizer_dir, calib, "/tmp/atom-e2e", center=True)
    assert json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]["kv_center_k"] is True
    windows = eval_windows(ckpt, evaltext)
    sim = simulated_logprobs(ckpt, windows, kv_bits=4)["fp32"]
    sim_unc = simulated_logprobs(ckpt, windows, kv_bits=4, center=False)["fp32"]
    got = vllm_logprobs(ckpt, windows, str(tmp_path), *KV4_ARGS)
    vs_unc = agreement(windows, sim_unc, got)
    sims_apart = float(torch.cat([(a - b).abs().flatten() for a, b in zip(sim, sim_unc)]).mean())
    result = {"arch": "qwen2", "kv": "kv4-centered", **agreement(windows, sim, got),
              "top1_vs_uncentered_sim": vs_unc["top1_agreement"],
              "mean_abs_dlogprob_vs_uncentered_sim": vs_unc["mean_abs_dlogprob"],
              "centered_vs_uncentered_sim_mean_abs_dlogprob": sims_apart, "vllm_load_s": got["load_s"]}
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, "e2e-qwen2-kv4-centered.json"), "w"))
    assert result["top1_agreement"] >= 0.93, result
    assert result["mean_abs_dlogprob"] < 0.12, result
    if sims_apart > 0.02:
        assert result["mean_abs_dlogprob"] < result["mean_abs_dlogprob_vs_uncentered_sim"], result


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (device kind nvidia-h200-x2)")
@pytest.mark.parametrize("kv", ["kv16", "kv4"])
def test_vllm_atom_tensor_parallel_2(kv, tokenizer_dir, texts, tmp_path):
    """tensor_parallel_size=2 on a checkpoint quantized with row_shards=2: each rank loads its own
    reordered slice of o_proj / down_proj (with its own outliers) and half of every column-parallel
    layer; the simulation applies the same per-shard reorder on one device. Same bounds as TP=1."""
    calib, evaltext = texts
    ckpt = quantized_tiny("llama", tokenizer_dir, calib, "/tmp/atom-e2e", row_shards=2)
    assert json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]["row_shards"] == 2
    windows = eval_windows(ckpt, evaltext)
    sim = simulated_logprobs(ckpt, windows, kv_bits=4 if kv == "kv4" else None)["fp32"]
    extra = KV4_ARGS if kv == "kv4" else ()
    got = vllm_logprobs(ckpt, windows, str(tmp_path), *extra, "--tensor-parallel-size", "2")
    result = {"arch": "llama", "kv": kv, "tensor_parallel_size": 2, **agreement(windows, sim, got),
              "vllm_load_s": got["load_s"]}
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, f"e2e-llama-{kv}-tp2.json"), "w"))
    assert result["top1_agreement"] >= 0.93, result
    assert result["mean_abs_dlogprob"] < 0.12, result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_kernels_match_reference_linear_inside_vllm(arch, tokenizer_dir, texts, tmp_path):
    """The checkpoint through vLLM twice, graphs on: with the Atom kernels, and with the pure-torch
    reference op in every linear (VLLM_ATOM_REFERENCE_LINEAR=1, integer-exact GEMM). Norms,
    RoPE, attention and residuals are vLLM's own compiled code in both runs, so only the linears'
    fp32 fold order differs: this is the comparison with the simulated reference that the
    rounding noise of the test above cannot give, with issue 5's bound of 99 % top-1. Both runs
    without the fusion pass (VLLM_ATOM_FUSION=0): its fused norm kernels round the norm's sum in
    another order (`test_vllm_fusion_keeps_outputs`), which is not what this compares."""
    from vllm_atom.serve.fusion import FUSION_ENV
    from vllm_atom.serve.linear import REFERENCE_ENV

    calib, evaltext = texts
    ckpt = quantized_tiny(arch, tokenizer_dir, calib, "/tmp/atom-e2e")
    windows = eval_windows(ckpt, evaltext)
    got = vllm_logprobs(ckpt, windows, str(tmp_path), env_extra={FUSION_ENV: "0"})
    ref = vllm_logprobs(ckpt, windows, str(tmp_path), env_extra={REFERENCE_ENV: "1", FUSION_ENV: "0"})
    agree = total = 0
    dlp = []
    for a, b in zip(got["windows"], ref["windows"]):
        agree += sum(int(x == y) for x, y in zip(a["top1"], b["top1"]))
        total += len(a["top1"])
        dlp += [abs(x - y) for x, y in zip(a["logprob"], b["logprob"])]
    result = {"arch": arch, "reference": "atom_linear_reference inside vLLM", "top1_agreement": agree / total,
              "tokens": total, "mean_abs_dlogprob": sum(dlp) / len(dlp), "max_abs_dlogprob": max(dlp)}
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, f"e2e-{arch}-reference-linear.json"), "w"))
    assert result["top1_agreement"] >= 0.99, result


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_fusion_keeps_outputs(arch, tokenizer_dir, texts, tmp_path):
    """The fusion pass (`vllm_atom.serve.fusion`) through vLLM, graphs on: every qkv / gate_up /
    down linear's quantization fused into the norm or SiLU before it (only o_proj, after attention,
    stays unfused), and the outputs as without it (VLLM_ATOM_FUSION=0) up to this model's rounding
    noise: the fused kernels round as Inductor's code does (once), but sum the norm's squares in
    another order and use IEEE exp / division where Triton's are approximate, so an input element
    can land an ulp away, which the INT4 quantization and this random model amplify (the module
    docstring): prompt top-1 agreement >= 98 % between the two runs, and the fused run no further
    from the simulated reference than the unfused one. Greedy continuations are reported (measured:
    cuda/NOTES.md, results/serving-fusion-h200.json)."""
    from vllm_atom.serve.fusion import FUSION_ENV

    calib, evaltext = texts
    ckpt = quantized_tiny(arch, tokenizer_dir, calib, "/tmp/atom-e2e")
    windows = eval_windows(ckpt, evaltext)
    sim = simulated_logprobs(ckpt, windows)["fp32"]
    # the engine in the script's process, which reports the pass's counts; Inductor's own graph caches
    # off, since a cache hit (the same model compiled by an earlier test) skips the pass and its counts
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    on = vllm_logprobs(ckpt, windows, str(tmp_path), "--greedy-tokens", "24", env_extra=env)
    off = vllm_logprobs(ckpt, windows, str(tmp_path), "--greedy-tokens", "24", env_extra={**env, FUSION_ENV: "0"})
    agree = sum(int(a == b) for x, y in zip(on["windows"], off["windows"]) for a, b in zip(x["top1"], y["top1"]))
    total = sum(len(x["top1"]) for x in on["windows"])
    dlp = [abs(a - b) for x, y in zip(on["windows"], off["windows"]) for a, b in zip(x["logprob"], y["logprob"])]
    same = sum(int(a == b) for a, b in zip(on["greedy"], off["greedy"]))
    vs_sim = {"fused": agreement(windows, sim, on), "unfused": agreement(windows, sim, off)}
    result = {"arch": arch, "fused": on["fused"], "unfused_run_fused": off["fused"], "top1_agreement": agree / total,
              "mean_abs_dlogprob": sum(dlp) / len(dlp), "greedy_identical": f"{same}/{len(on['greedy'])}",
              "vs_simulation": vs_sim}
    print("e2e", json.dumps(result))
    json.dump(result, open(os.path.join(OUT, f"e2e-{arch}-fusion.json"), "w"))
    assert not off["fused"], result
    # counted per compiled piece (Inductor compiles the identical middle layers once): the first layer's
    # input norm -> qkv, fused add + norm -> qkv / gate_up, SiLU -> down; o_proj, one per piece with an MLP
    f = on["fused"]
    assert f["rms_norm"] >= 1 and f["fused_add_rms_norm"] >= 2 and f["silu_mul"] >= 1, result
    assert f["unfused"] <= f["silu_mul"], result
    assert result["top1_agreement"] >= 0.98, result
    assert vs_sim["fused"]["top1_agreement"] >= vs_sim["unfused"]["top1_agreement"] - 0.01, result
    assert vs_sim["fused"]["mean_abs_dlogprob"] <= vs_sim["unfused"]["mean_abs_dlogprob"] + 0.005, result
