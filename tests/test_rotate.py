"""--rotate and --rotate-values (`vllm_atom.quantize.rotate`): the rotations are orthogonal, folding
them leaves the model's function unchanged (tied and untied embeddings, Llama and Qwen2 with q/k/v
biases, grouped kv heads), and a rotated checkpoint records it, stores the rotated tensors,
evaluates as it should and refuses the ladder steps that would not fit it."""

import pytest
import torch

from vllm_atom.config import AtomConfig
from vllm_atom.quantize import InputError, quantize
from vllm_atom.quantize.rotate import rotate_model, rotate_values, rotation_matrix
from test_quantize import OPTS, make_tiny  # noqa: E402  (tests/ is on sys.path)


@pytest.mark.parametrize("d", [128, 576, 1536, 4096])
def test_rotation_is_orthogonal_and_seeded(d):
    q = rotation_matrix(d, 3)
    assert q.dtype == torch.float64 and q.shape == (d, d)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(d, 3)) and not torch.equal(q, rotation_matrix(d, 4))
    assert q.abs().max() < 0.5  # spread: no channel stays on its own


def random_model(arch: str, hidden: int, tied: bool = False):
    """A random 2-layer Llama / Qwen2 (4 query heads on 2 kv heads), norms away from 1, biases
    drawn (Qwen2's q/k/v)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=hidden, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_()
    return model


def assert_same_function(model, fold) -> None:
    """``fold(model)`` (in place) leaves the logits of random tokens as they were."""
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
        fold(model)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_rotated_model_computes_the_same(arch, tied):
    model = random_model(arch, 192, tied)
    assert_same_function(model, lambda m: rotate_model(m, seed=1))
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(torch.all(layer.input_layernorm.weight == 1) for layer in model.model.layers)


def test_rotated_checkpoint(tmp_path):
    from vllm_atom.checkpoint import load_checkpoint
    from vllm_atom.evaluate import evaluate

    src = make_tiny(tmp_path / "llama", layers=1)
    out = tmp_path / "q"
    quantize(src, out, src / "calib.txt", AtomConfig(n_outliers=128, kv_bits=None, rotation=5), OPTS, progress=False)
    cfg, config, t = load_checkpoint(out)
    assert cfg.rotation == 5 and config["tie_word_embeddings"] is False and "lm_head.weight" in t
    assert torch.all(t["model.layers.0.input_layernorm.weight"] == 1)
    from safetensors.torch import load_file

    emb = load_file(str(next(src.glob("*.safetensors"))))["model.embed_tokens.weight"]
    assert torch.equal(t["model.embed_tokens.weight"], (emb.double() @ rotation_matrix(emb.shape[1], 5)).half())
    rows = evaluate(out, src / "eval.txt", seqlen=64, max_tokens=256, progress=False)
    assert rows[0]["method"] == "atom" and rows[0]["ppl"] < 1e4
    with pytest.raises(InputError, match="--rotate"):
        evaluate(src, src / "eval.txt", seqlen=64, max_tokens=256, checkpoint=out, progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_value_rotation_computes_the_same(arch):
    """rotate_values: v_proj's rows and o_proj's columns turn per head (4 query heads on 2 kv
    heads), the function stays; every head's value rows are spread (no row of v_proj kept)."""
    model = random_model(arch, 256)
    v0 = model.model.layers[0].self_attn.v_proj.weight.clone()
    assert_same_function(model, lambda m: rotate_values(m, seed=2))
    v1 = model.model.layers[0].self_attn.v_proj.weight
    q = rotation_matrix(64, 2 * 1_000_003)
    torch.testing.assert_close(v1.double()[64:128], q.T @ v0.double()[64:128])
    assert not any(torch.allclose(v1[i], v0[i]) for i in range(v0.shape[0]))


def test_value_rotated_checkpoint(tmp_path):
    """A --rotate-values checkpoint records the seed, evaluates against the 16-bit model (atom,
    atom-kv4: the same function) and refuses the ladder steps that would reuse its o_proj reorder."""
    from vllm_atom.checkpoint import load_checkpoint
    from vllm_atom.evaluate import evaluate

    src = make_tiny(tmp_path / "llama", layers=1)
    out = tmp_path / "q"
    quantize(src, out, src / "calib.txt", AtomConfig(n_outliers=128, value_rotation=3), OPTS, progress=False)
    cfg, _, _ = load_checkpoint(out)
    assert cfg.value_rotation == 3 and cfg.rotation is None
    rows = evaluate(src, src / "eval.txt", seqlen=64, max_tokens=256, checkpoint=out, progress=False)
    assert [r["method"] for r in rows] == ["fp16", "rtn", "atom", "atom-kv4"]
    assert all(r["ppl"] < 1e4 for r in rows)
    with pytest.raises(InputError, match="--rotate-values"):
        evaluate(src, src / "eval.txt", seqlen=64, max_tokens=256, checkpoint=out, methods=["clip"], progress=False)
