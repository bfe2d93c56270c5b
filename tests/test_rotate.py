"""--rotate (`vllm_atom.quantize.rotate`): the rotation is orthogonal, folding it leaves the model's
function unchanged (tied and untied embeddings, Llama and Qwen2 with q/k/v biases), and a rotated
checkpoint records it, stores the rotated tensors, evaluates on its own and refuses the ladder."""

import pytest
import torch

from vllm_atom.config import AtomConfig
from vllm_atom.quantize import InputError, quantize
from vllm_atom.quantize.rotate import rotate_model, rotation_matrix
from test_quantize import OPTS, make_tiny  # noqa: E402  (tests/ is on sys.path)


@pytest.mark.parametrize("d", [128, 576, 1536, 4096])
def test_rotation_is_orthogonal_and_seeded(d):
    q = rotation_matrix(d, 3)
    assert q.dtype == torch.float64 and q.shape == (d, d)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation_matrix(d, 3)) and not torch.equal(q, rotation_matrix(d, 4))
    assert q.abs().max() < 0.5  # spread: no channel stays on its own


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_rotated_model_computes_the_same(arch, tied):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_()
    ids = torch.randint(0, 100, (2, 24))
    with torch.no_grad():
        want = model(ids).logits
        rotate_model(model, seed=1)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
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
