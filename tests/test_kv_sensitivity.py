"""INT4 KV sensitivity per layer (vllm_atom.quantize.kv_sensitivity) and --kv-skip-layers auto:
a layer whose keys carry a Qwen2.5-like huge bias is found and kept 16-bit, the others not."""

import json

import pytest
import torch

from vllm_atom.cli import _kv_skip_layers
from vllm_atom.config import AtomConfig
from vllm_atom.quantize import QuantizeOptions, quantize
from vllm_atom.quantize.kv_sensitivity import DEFAULT_KV_SKIP_THRESHOLD

from test_quantize import make_tiny  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def biased_qwen(tmp_path_factory):
    """Tiny 3-layer Qwen2 whose layer-1 k_proj bias is 400 on the slowest rotary pair of each
    KV head (Qwen2.5-1.5B: 354 in layer 0): per-token INT4 keeps one step for all else."""
    from transformers import AutoModelForCausalLM

    src = make_tiny(tmp_path_factory.mktemp("kvsens") / "qwen", arch="qwen2", layers=3)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16)
    attn = model.model.layers[1].self_attn
    d = attn.head_dim
    with torch.no_grad():
        for h in range(attn.k_proj.out_features // d):
            attn.k_proj.bias[h * d + d // 2 - 1] = 400.0
    model.save_pretrained(src)
    return src


def _quantize(src, out, threshold, skip=()):
    cfg = AtomConfig(kv_smooth=0.0, kv_skip_layers=list(skip))
    opts = QuantizeOptions(nsamples=4, seqlen=128, gptq=False, kv_skip_threshold=threshold)
    report = quantize(src, out, src / "calib.txt", cfg, opts, progress=False)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    return report, saved


def test_auto_keeps_the_biased_layer_16bit(biased_qwen, tmp_path):
    report, saved = _quantize(biased_qwen, tmp_path / "auto", DEFAULT_KV_SKIP_THRESHOLD)
    err = report.kv4_attention_error
    assert len(err) == 3 and err[1] > DEFAULT_KV_SKIP_THRESHOLD > max(err[0], err[2]), err
    assert report.kv_skip_layers == [1] and saved["kv_skip_layers"] == [1]


def test_errors_reported_without_auto_and_explicit_layers_kept(biased_qwen, tmp_path):
    report, saved = _quantize(biased_qwen, tmp_path / "plain", None)
    assert saved["kv_skip_layers"] == [] and report.kv4_attention_error[1] > DEFAULT_KV_SKIP_THRESHOLD
    # an explicit layer is not measured (its KV is 16-bit anyway) and stays in the list
    report, saved = _quantize(biased_qwen, tmp_path / "both", DEFAULT_KV_SKIP_THRESHOLD, skip=[2])
    assert report.kv4_attention_error[2] is None and saved["kv_skip_layers"] == [1, 2]


def test_auto_needs_an_int4_cache(biased_qwen, tmp_path):
    from vllm_atom.quantize import InputError

    with pytest.raises(InputError, match="needs --kv-bits 4"):
        quantize(biased_qwen, tmp_path / "o", biased_qwen / "calib.txt", AtomConfig(kv_bits=None),
                 QuantizeOptions(kv_skip_threshold=0.5), progress=False)


@pytest.mark.parametrize("spec,expected", [
    ("", ([], None)), ("0,1", ([0, 1], None)), ("auto", ([], DEFAULT_KV_SKIP_THRESHOLD)),
    ("auto=0.3, 2", ([2], 0.3)),
])
def test_cli_spec(spec, expected):
    assert _kv_skip_layers(spec) == expected


@pytest.mark.parametrize("spec", ["x", "auto=0", "auto=-1", "auto=abc", "1.5", "-1"])
def test_cli_spec_rejects(spec):
    with pytest.raises(ValueError, match="neither a layer index nor auto"):
        _kv_skip_layers(spec)
