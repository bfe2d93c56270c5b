"""Key centering for the INT4 KV cache (`AtomConfig.kv_center_k`): the numerics, what the
quantizer writes, what `vllm-atom eval` reads, the cache write that stores keys minus the center,
and how `vllm serve` finds each layer's center (tests/gpu/test_vllm_e2e.py serves one)."""

import math

import pytest
import torch

from vllm_atom import reference as ref
from vllm_atom.checkpoint import load_checkpoint
from vllm_atom.config import AtomConfig
from vllm_atom.format import KEY_CENTER, CheckpointFormatError, check_key_center
from vllm_atom.quantize import QuantizeOptions, quantize
from vllm_atom.quantize.key_center import KeyMean

from test_quantize import make_tiny  # noqa: E402  (tests/ is on sys.path under pytest)


def _keys(tokens=96, heads=2, d=64, seed=0):
    """Post-RoPE-like keys [1, heads, tokens, d] whose low channels sit far from zero."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, tokens, d, generator=g)
    k[..., :4] += 12.0 * torch.arange(1, 5, dtype=torch.float32)
    return k.to(torch.float16)


@pytest.mark.parametrize("rotate", [False, True])
def test_centering_leaves_attention_to_the_cache_and_cuts_the_error(rotate):
    """Attention over fq(k - c) + c (the simulation) equals attention over a cache of fq(k - c)
    (what a centered cache stores): the extra logit -q . c is the same for every key of a query.
    With channel offsets, the centered keys' INT4 error is several times smaller."""
    k = _keys()
    c = KeyMean(2, 64)
    c.add(k.float())
    center = c.value[None, :, None, :]
    sim = ref.fake_quantize_kv(k, rotate, center).float()
    cached = sim - center  # the centered cache, dequantized
    q = torch.randn(1, 2, 5, 64)
    v = torch.randn(1, 2, 96, 64)
    a = torch.softmax(q @ sim.transpose(-1, -2) / 8, -1) @ v
    b = torch.softmax(q @ cached.transpose(-1, -2) / 8, -1) @ v
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    err = lambda x: float((x.float() - k.float()).pow(2).mean())  # noqa: E731
    assert err(sim) * 4 < err(ref.fake_quantize_kv(k, rotate))
    assert torch.equal(ref.fake_quantize_kv(k, rotate, torch.zeros(2, 64)[None, :, None, :]),
                       ref.fake_quantize_kv(k, rotate))  # a zero center is no center


def test_key_mean_checks_its_input():
    m = KeyMean(2, 64)
    with pytest.raises(ValueError, match="no keys"):
        m.value
    with pytest.raises(ValueError, match=r"expected \[batch, 2, tokens, 64\]"):
        m.add(torch.zeros(1, 3, 4, 64))
    m.add(torch.ones(2, 2, 3, 64))
    m.add(3 * torch.ones(1, 2, 2, 64))
    assert torch.allclose(m.value, torch.full((2, 64), 12 / 8))


def test_config_needs_int4_kv():
    with pytest.raises(ValueError, match="kv_center_k"):
        AtomConfig(kv_bits=None, kv_center_k=True)
    old = {k: v for k, v in AtomConfig().to_dict().items() if k != "kv_center_k"}
    assert AtomConfig.from_dict(old).kv_center_k is False


@pytest.fixture(scope="module")
def centered(tmp_path_factory):
    """A tiny Llama quantized with kv_center_k, layer 1 kept 16-bit."""
    root = tmp_path_factory.mktemp("center")
    src = make_tiny(root / "llama")
    cfg = AtomConfig(n_outliers=0, kv_center_k=True, kv_skip_layers=(1,))
    quantize(src, root / "q", src / "calib.txt", cfg, QuantizeOptions(nsamples=4, seqlen=128), progress=False)
    return src, root / "q"


def test_quantizer_writes_one_center_per_int4_layer(centered):
    _, out = centered
    cfg, _, t = load_checkpoint(out)
    assert cfg.kv_center_k and cfg.kv_skip_layers == (1,)
    name = f"model.layers.0.{KEY_CENTER}"
    check_key_center(name, t.get(name), 2, 64)  # tiny: 2 kv heads of 64
    assert t[name].abs().max() > 0
    assert f"model.layers.1.{KEY_CENTER}" not in t  # its cache stays 16-bit


def test_eval_reads_the_centers_and_names_a_bad_one(centered, tmp_path):
    from vllm_atom.evaluate import evaluate

    src, out = centered
    rows = evaluate(src, src / "eval.txt", seqlen=64, max_tokens=128, methods=["atom-kv4"], checkpoint=out,
                    progress=False)
    row = next(r for r in rows if r["method"] == "atom-kv4")
    assert row["kv_center_k"] is True and math.isfinite(row["ppl"])
    with pytest.raises(CheckpointFormatError, match=r"model.layers.0.self_attn.k_center: expected float32 \[2, 64\]"):
        check_key_center("model.layers.0.self_attn.k_center", torch.zeros(2, 32), 2, 64)
    with pytest.raises(CheckpointFormatError, match="k_center: missing"):
        check_key_center("model.layers.0.self_attn.k_center", None, 2, 64)


@pytest.mark.parametrize("rotate", [False, True])
def test_cache_write_stores_keys_minus_the_center(rotate):
    """reference.write_kv_cache(k_center=): the cache read back plus the center is the simulation's
    fake_quantize_kv(k, rotate, center) (fp32), and a zero center writes the same bytes as none."""
    k = _keys(tokens=20).transpose(1, 2)[0]  # [T, H, D]
    v = torch.randn(20, 2, 64).half()
    center = KeyMean(2, 64)
    center.add(k.transpose(0, 1)[None].float())
    c = center.value
    cache = torch.zeros(2, 2, 16, ref.kv_record_bytes(64), dtype=torch.uint8)
    ref.write_kv_cache(k, v, cache, torch.arange(20), rotate, c)
    kq, _ = ref.read_kv_cache(cache, torch.tensor([0, 1]), 20, 64)
    got = (ref.hadamard_rotate(kq) if rotate else kq) + c
    torch.testing.assert_close(got, ref.fake_quantize_kv(k.float(), rotate, c), rtol=0, atol=1e-5)
    plain, zero = torch.zeros_like(cache), torch.zeros_like(cache)
    ref.write_kv_cache(k, v, plain, torch.arange(20), rotate)
    ref.write_kv_cache(k, v, zero, torch.arange(20), rotate, torch.zeros(2, 64))
    assert torch.equal(plain, zero) and not torch.equal(plain, cache)


def test_serve_loads_the_centers():
    """`vllm serve` takes kv_center_k checkpoints: the checkpoint's self_attn.k_center maps onto the
    attention layer's parameter, and each tensor-parallel rank gets its kv heads."""
    pytest.importorskip("vllm")
    from vllm_atom.serve.config import AtomQuantConfig
    from vllm_atom.serve.kv_center import rank_heads

    cfg = AtomQuantConfig.from_config(AtomConfig(kv_center_k=True).to_dict())
    assert cfg.atom.kv_center_k
    names = [("model.layers.3.self_attn.k_center", torch.zeros(1)), ("model.layers.3.self_attn.k_proj.qweight",
                                                                       torch.zeros(1))]
    mapped = [n for n, _ in cfg.get_cache_scale_mapper().apply(iter(names))]
    assert mapped == ["model.layers.3.self_attn.attn.k_center", "model.layers.3.self_attn.k_proj.qweight"]
    plain = AtomQuantConfig.from_config(AtomConfig().to_dict())
    assert [n for n, _ in plain.get_cache_scale_mapper().apply(iter(names[:1]))] == [names[0][0]]
    c = torch.arange(8.0)[:, None].expand(8, 4)
    assert torch.equal(rank_heads(c, 2, 1), c[4:])
    assert torch.equal(rank_heads(c[:2], 4, 3), c[1:2])  # 2 kv heads over 4 ranks: replicated
    assert torch.equal(rank_heads(c, 1, 0), c)
