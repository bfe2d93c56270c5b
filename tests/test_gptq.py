"""GPTQ on tiny synthetic layers (CPU): never worse than RTN, exact runtime grid,
outlier columns compensated, RTN fallback on a broken Hessian."""

import pytest
import torch

from vllm_atom import reference as ref
from vllm_atom.quantize.gptq import gptq_quantize, layer_loss, rtn_quantize


def _layer(n=64, k=384, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # correlated inputs with a few loud channels at the end (the outlier slots)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, -16:] *= 20
    return w, x, x.T @ x * (2 / tokens)


@pytest.mark.parametrize("n_outliers", [0, 128])
def test_gptq_loss_not_worse_than_rtn(n_outliers):
    w, x, h = _layer()
    g = ref.dequantize_weight(gptq_quantize(w, h, n_outliers).weight)
    r = ref.dequantize_weight(rtn_quantize(w, n_outliers))
    lg, lr = layer_loss(w, g, h), layer_loss(w, r, h)
    assert lg <= lr
    assert lg < (0.8 if n_outliers else 0.99) * lr  # correlated inputs: GPTQ helps


def test_gptq_uses_the_runtime_grid():
    w, _, h = _layer()
    q = gptq_quantize(w, h, 128, w_clip=0.85).weight
    assert q.q.dtype == torch.int8 and int(q.q.min()) >= -8 and int(q.q.max()) <= 7
    assert q.scale.dtype == torch.float16 and q.scale.shape == (64, 2)
    assert q.q_outlier.dtype == torch.int8 and q.outlier_scale.dtype == torch.float16
    # the outlier block is exactly reference INT8 RTN of some [N, O] matrix: re-quantizing
    # its own dequantization reproduces it
    deq = q.q_outlier.float() * q.outlier_scale.float()[:, None]
    qo, so = ref.quantize_outlier_weight(deq)
    assert torch.equal(qo, q.q_outlier)
    # round trip through the checkpoint packing
    back = ref.QuantizedWeight.from_packed(q.packed())
    assert torch.equal(back.q, q.q) and torch.equal(back.scale, q.scale)


def test_identity_hessian_gives_rtn_exactly():
    """With H = I there is nothing to compensate: GPTQ must equal reference RTN bit for bit."""
    w, _, _ = _layer()
    h = torch.eye(w.shape[1])
    g = gptq_quantize(w, h, 128).weight
    r = rtn_quantize(w, 128)
    for a, b in zip(g, r):
        assert torch.equal(a, b)


def test_outlier_columns_receive_compensation():
    w, _, h = _layer()
    g = gptq_quantize(w, h, 128).weight
    r = rtn_quantize(w, 128)
    # the INT4 columns' error was pushed into the outlier columns before their INT8 rounding
    assert not torch.equal(g.q_outlier, r.q_outlier)
    kn = w.shape[1] - 128
    compensated = g.q_outlier.float() * g.outlier_scale.float()[:, None]
    assert (compensated - w[:, kn:]).abs().mean() > 1e-3


def test_dead_channels_and_fallback():
    w, _, h = _layer(k=256)
    h[5, :] = 0
    h[:, 5] = 0
    res = gptq_quantize(w, h, 128)
    assert res.fallback is None
    assert int(ref.dequantize_weight(res.weight)[:, 5].abs().max()) == 0  # dead column zeroed
    bad = torch.full_like(h, float("nan"))
    res = gptq_quantize(w, bad, 128)
    assert res.fallback and "RTN" in res.fallback
    for a, b in zip(res.weight, rtn_quantize(w, 128)):
        assert torch.equal(a, b)


def _group_err(w, q, cw=None):
    d = w - ref.dequantize_weight(q)[:, :w.shape[1]]
    cw = torch.ones(w.shape[1]) if cw is None else cw
    return (d * d * cw).unflatten(1, (-1, 128)).sum(-1)


def test_clip_search_is_never_worse_than_any_fixed_ratio():
    from vllm_atom.quantize.gptq import CLIP_RATIOS, searched_group_scale
    w, x, h = _layer(k=512)
    cw = torch.diag(h)
    scale = searched_group_scale(w, 128, cw)
    assert scale.dtype == torch.float16 and scale.shape == (64, 4) and bool((scale > 0).all())
    q = ref.QuantizedWeight(ref.quantize_weight_groups(w, scale), scale, *ref.quantize_outlier_weight(w[:, :0]))
    err = _group_err(w, q, cw)
    for r in CLIP_RATIOS:
        fixed = ref.quantize_weight(w, torch.arange(512), 0, 128, r)
        assert bool((err <= _group_err(w, fixed, cw)).all()), r
    # some groups pick another ratio than the default 0.85 (else the search would be moot)
    default = ref.weight_group_scale(w, 128, 0.85)
    assert bool((scale != default).any())


@pytest.mark.parametrize("n_outliers", [0, 128])
def test_clip_search_rtn_and_gptq(n_outliers):
    w, x, h = _layer()
    kn = w.shape[1] - n_outliers
    r0, r1 = rtn_quantize(w, n_outliers), rtn_quantize(w, n_outliers, clip_search=True)
    assert bool((_group_err(w[:, :kn], r1) <= _group_err(w[:, :kn], r0)).all())
    assert torch.equal(r0.q_outlier, r1.q_outlier)  # the INT8 block does not change
    g = gptq_quantize(w, h, n_outliers, clip_search=True).weight
    assert int(g.q.min()) >= -8 and int(g.q.max()) <= 7 and g.scale.dtype == torch.float16
    assert layer_loss(w, ref.dequantize_weight(g), h) <= layer_loss(w, ref.dequantize_weight(r1), h)
