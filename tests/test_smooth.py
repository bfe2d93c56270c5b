"""Key smoothing (vllm_atom.quantize.smooth): attention scores after RoPE are unchanged, the
per-token key range shrinks, and a quantized checkpoint carries the smoothed q/k biases."""

import math

import pytest
import torch
from torch import nn

from vllm_atom import reference as R
from vllm_atom.config import AtomConfig
from vllm_atom.quantize.smooth import KeyPairMax, fold_key_smoothing, smoothing_factors


def rope(x, pos, base=10000.0):
    """Rotate-half RoPE (HF Llama/Qwen2) of x [T, H, D] at positions pos [T]."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@pytest.mark.parametrize("q_heads,kv_heads,d", [(4, 2, 64), (12, 2, 128), (3, 3, 64)])
def test_scores_unchanged_and_key_range_shrinks(q_heads, kv_heads, d):
    torch.manual_seed(q_heads * d)
    hidden, t = 96, 40
    q_proj, k_proj = nn.Linear(hidden, q_heads * d).double(), nn.Linear(hidden, kv_heads * d).double()
    with torch.no_grad():
        k_proj.bias[d // 2 - 3] = 300.0          # Qwen2-like: a huge bias on a low-frequency pair
        k_proj.bias[d + 5] = -80.0 if kv_heads > 1 else 0.0
    x, pos = torch.randn(t, hidden, dtype=torch.float64), torch.arange(t) * 37

    def scores(kv4: bool):
        with torch.no_grad():
            q = rope(q_proj(x).view(t, q_heads, d), pos)
            k = rope(k_proj(x).view(t, kv_heads, d), pos)
            if kv4:  # Atom's INT4 cache: per (token, head) asymmetric, fp16 scale and zero
                k = R.fake_quantize_kv(k.half()).double()
            kk = k.repeat_interleave(q_heads // kv_heads, dim=1)
            return torch.einsum("thd,shd->hts", q, kk)

    s0, e0 = scores(False), scores(True)
    stats = KeyPairMax(kv_heads, d)
    stats.add(k_proj(x))
    lam = smoothing_factors(stats.value, 0.5)
    assert lam.shape == (kv_heads, d) and torch.equal(lam[:, : d // 2], lam[:, d // 2:])
    fold_key_smoothing(q_proj, k_proj, lam)
    s1, e1 = scores(False), scores(True)
    torch.testing.assert_close(s1, s0, rtol=1e-9, atol=1e-9 * float(s0.abs().max()))
    # the attention scores over INT4 keys: at least twice as close to the exact ones (2.8-8x here)
    err0, err1 = float((e0 - s0).abs().mean()), float((e1 - s0).abs().mean())
    assert err1 < err0 / 2, (err0, err1)


def test_pair_max_is_rotation_invariant():
    k = torch.randn(50, 2 * 64, dtype=torch.float64)
    a, b = KeyPairMax(2, 64), KeyPairMax(2, 64)
    a.add(k)
    b.add(rope(k.view(50, 2, 64), torch.arange(50) * 11).reshape(50, 128))
    torch.testing.assert_close(a.value, b.value, rtol=1e-6, atol=0)
    assert torch.equal(smoothing_factors(torch.zeros(2, 32), 0.5), torch.ones(2, 64))


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="KV heads"):
        fold_key_smoothing(nn.Linear(8, 6 * 16), nn.Linear(8, 4 * 16), torch.ones(4, 16))
    with pytest.raises(ValueError, match="odd"):
        KeyPairMax(1, 63)


def test_config_fields_and_old_checkpoints():
    import json
    c = AtomConfig(kv_skip_layers=[1, 0, 1])
    assert c.kv_skip_layers == (0, 1) and c.kv_bits_for(1) is None and c.kv_bits_for(2) == 4
    assert AtomConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="kv_skip_layers"):
        AtomConfig(kv_skip_layers=[-1])
    d = AtomConfig().to_dict()
    assert d["kv_smooth"] == 0.5
    del d["kv_smooth"]
    assert AtomConfig.from_dict(d).kv_smooth == 0.0   # written before smoothing existed
    with pytest.raises(ValueError, match="kv_smooth"):
        AtomConfig(kv_smooth=1.5)


def test_checkpoint_biases_carry_the_smoothing(tmp_path):
    from test_quantize import OPTS, make_tiny

    from vllm_atom.quantize import quantize
    from vllm_atom.checkpoint import load_checkpoint

    src = make_tiny(tmp_path / "qwen", arch="qwen2", layers=1, ffn=512)
    from safetensors.torch import load_file
    orig = load_file(str(src / "model.safetensors"))
    quantize(src, tmp_path / "s", src / "calib.txt", AtomConfig(n_outliers=0), OPTS, progress=False)
    quantize(src, tmp_path / "n", src / "calib.txt", AtomConfig(n_outliers=0, kv_smooth=0), OPTS, progress=False)
    _, _, ts = load_checkpoint(tmp_path / "s")
    _, _, tn = load_checkpoint(tmp_path / "n")
    a = "model.layers.0.self_attn"
    assert torch.equal(tn[f"{a}.k_proj.bias"], orig[f"{a}.k_proj.bias"])
    assert torch.equal(ts[f"{a}.v_proj.bias"], orig[f"{a}.v_proj.bias"])
    ratio_k = orig[f"{a}.k_proj.bias"].float() / ts[f"{a}.k_proj.bias"].float()   # = lam per channel
    ratio_q = ts[f"{a}.q_proj.bias"].float() / orig[f"{a}.q_proj.bias"].float()
    lam_k = ratio_k.view(2, 64)
    lam_q = ratio_q.view(2, 2, 64)                      # 4 query heads, 2 per KV head
    ok = orig[f"{a}.k_proj.bias"].view(2, 64).abs() > 0.05
    assert not torch.allclose(lam_k[ok], torch.ones_like(lam_k[ok]), atol=0.05)
    for h in range(2):
        for g in range(2):
            m = ok[h] & (orig[f"{a}.q_proj.bias"].view(2, 2, 64)[h, g].abs() > 0.05)
            torch.testing.assert_close(lam_q[h, g][m], lam_k[h][m], rtol=4e-3, atol=0)
    assert math.isclose(AtomConfig.from_dict(load_checkpoint(tmp_path / "s")[1]["quantization_config"]).kv_smooth, 0.5)
