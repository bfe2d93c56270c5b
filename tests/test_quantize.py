"""The offline quantizer on tiny random models (CPU, seconds): reorder, shared inputs,
checkpoint format, Qwen2 biases, row shards, early errors, import boundary."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_atom.checkpoint import load_checkpoint
from vllm_atom.config import AtomConfig
from vllm_atom.format import LINEAR_PATHS, QUANTIZED_LINEARS, check_linear_tensors, linear_layout
from vllm_atom.quantize import InputError, QuantizeOptions, quantize
from vllm_atom.quantize.reorder import input_groups, reorder_index

WORDS = "the cat sat on a mat and then a dog ran far away to sleep in the warm sun".split()
TINY_CFG = AtomConfig(n_outliers=128)


def _text(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_tiny(out: Path, arch: str = "llama", layers: int = 2, ffn: int = 384) -> Path:
    """A random 2-layer model (hidden 256, FFN 384, head_dim 64) with a small BPE
    tokenizer, saved in fp16, plus calib.txt / eval.txt next to it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_text(5000, 0)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf_tok.save_pretrained(out)
    kw = dict(hidden_size=256, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=len(hf_tok),
              max_position_embeddings=512)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama"
             else Qwen2ForCausalLM(Qwen2Config(**kw)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3)
            if "input_layernorm" in name:
                p[:8] = 20.0  # loud channels 0..7 on the q/k/v input
            if name.endswith("bias"):
                p.normal_()
    model.to(torch.float16).save_pretrained(out)
    (out / "calib.txt").write_text(_text(8000, 1))
    (out / "eval.txt").write_text(_text(3000, 2))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny") / "llama")


OPTS = QuantizeOptions(nsamples=4, seqlen=128)


def test_reorder_index_sorts_ascending_per_shard():
    sal = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.0, 2.0, 8.0])
    assert reorder_index(sal).tolist() == [5, 1, 6, 3, 0, 4, 7, 2]
    assert reorder_index(sal, shards=2).tolist() == [1, 3, 0, 2, 1, 2, 0, 3]
    assert reorder_index(sal).dtype == torch.int32


def test_input_groups():
    g = input_groups()
    assert g == {"q_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                 "gate_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def test_quantize_tiny_llama_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "q"
    report = quantize(tiny_llama, out, tiny_llama / "calib.txt", TINY_CFG, OPTS, progress=False)
    assert report.layers == 2 and not report.fallbacks
    cfg, config, t = load_checkpoint(out)
    assert config["quantization_config"] == TINY_CFG.to_dict()
    assert (out / "tokenizer.json").is_file() and not (out / "calib.txt").exists()
    for i in range(2):
        p = f"model.layers.{i}"
        for m in QUANTIZED_LINEARS:
            name = f"{p}.{LINEAR_PATHS[m]}"
            k = 384 if m == "down_proj" else 256
            n = {"k_proj": 128, "v_proj": 128, "gate_proj": 384, "up_proj": 384}.get(m, 256)
            check_linear_tensors(name, t, linear_layout(k, n, cfg))
            assert f"{name}.weight" not in t
        # shared inputs share one index
        idx = lambda m: t[f"{p}.{LINEAR_PATHS[m]}.reorder_index"]  # noqa: E731
        assert torch.equal(idx("q_proj"), idx("k_proj")) and torch.equal(idx("q_proj"), idx("v_proj"))
        assert torch.equal(idx("gate_proj"), idx("up_proj"))
        # the loud channels 0..7 of the q/k/v input are salient: last slots (outliers)
        assert set(idx("q_proj")[-8:].tolist()) == set(range(8))
        assert t[f"{p}.input_layernorm.weight"].dtype == torch.float16
    assert t["model.embed_tokens.weight"].dtype == torch.float16
    assert "lm_head.weight" in t  # not tied in this model


def test_quantize_qwen2_keeps_bias_and_row_shards(tmp_path):
    src = make_tiny(tmp_path / "qwen", arch="qwen2", layers=1, ffn=512)
    cfg = AtomConfig(n_outliers=0, row_shards=2)
    quantize(src, tmp_path / "q", src / "calib.txt", cfg, OPTS, progress=False)
    _, _, t = load_checkpoint(tmp_path / "q")
    for m in ("q_proj", "k_proj", "v_proj"):
        b = t[f"model.layers.0.self_attn.{m}.bias"]
        assert b.dtype == torch.float16
    o = "model.layers.0.self_attn.o_proj"
    check_linear_tensors(o, t, linear_layout(256, 256, cfg, shards=2))
    assert t[f"{o}.reorder_index"].max() < 128  # shard-local
    assert t[f"{o}.w_outlier_scale"].shape == (256, 2)


def test_rejects_non_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=128)).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match="model_type 'bert'.*supported model types: llama"):
        quantize(tmp_path / "bert", tmp_path / "o", tmp_path / "x.txt")
    # a supported model type without a causal LM head
    cfgj = json.loads((tmp_path / "bert/config.json").read_text())
    cfgj.update(model_type="llama", architectures=["LlamaModel"])
    (tmp_path / "bert/config.json").write_text(json.dumps(cfgj))
    with pytest.raises(InputError, match="no \\*ForCausalLM head"):
        quantize(tmp_path / "bert", tmp_path / "o", tmp_path / "x.txt")


def test_rejects_unsupported_arch(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2)).save_pretrained(tmp_path / "g")
    cfgj = json.loads((tmp_path / "g/config.json").read_text())
    cfgj["architectures"] = ["GPT2ForCausalLM"]
    (tmp_path / "g/config.json").write_text(json.dumps(cfgj))
    with pytest.raises(InputError, match="not supported"):
        quantize(tmp_path / "g", tmp_path / "o", tmp_path / "x.txt")


def test_rejects_missing_dir_and_short_text(tiny_llama, tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        quantize(tmp_path, tmp_path / "o", tiny_llama / "calib.txt")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat")
    with pytest.raises(InputError, match="--nsamples"):
        quantize(tiny_llama, tmp_path / "o", short, TINY_CFG, QuantizeOptions(nsamples=128, seqlen=2048))
    assert not (tmp_path / "o").exists()  # failed before any work


@pytest.mark.parametrize("imports, forbidden", [
    ("vllm_atom.quantize, vllm_atom.evaluate, vllm_atom.cli", ("vllm", "cupy")),  # the offline path
    ("vllm_atom.evaluate", ("vllm_atom.quantize",)),  # it shares the simulator and reader, not the quantizer
])
def test_import_direction(imports, forbidden):
    code = (f"import sys, {imports}; "
            f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r})]; "
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
