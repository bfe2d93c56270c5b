"""INT4 KV cache attention on CPU: the paged-attention reference against plain causal attention
over fake-quantized K/V, and the vLLM backend (registration, validation, the impl's write and
forward through vLLM's own metadata class, chunked prefill across two steps, the warnings that
tell a user how to turn Atom's INT4 KV cache on). The CUDA kernels are tested against the same
reference in tests/gpu/test_kv_int4.py."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_atom import reference as R

HD, H, G, BLOCK = 64, 2, 3, 16


def sdpa_fake_quantized(q, k, v, ctx, scale):
    """q [L, Hq, D] at positions ctx.., k/v [S, H, D] (fake-quantized here): fp32 causal attention."""
    k, v = R.fake_quantize_kv(k.float()), R.fake_quantize_kv(v.float())
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).transpose(0, 1), v.repeat_interleave(g, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ k.transpose(1, 2)) * scale
    pos = torch.arange(ctx, ctx + q.shape[0])[:, None]
    s = s.masked_fill(torch.arange(k.shape[1])[None] > pos, float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


class Paged:
    """Requests with random K/V and scattered pages of one cache (HND or NHD strides)."""

    def __init__(self, seq_lens, nhd=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        need = [math.ceil(s / BLOCK) for s in seq_lens]
        nb = sum(need) + 3
        shape = (nb, H, BLOCK, R.kv_record_bytes(HD))
        if nhd:  # memory [nb, block, H, rec], logical [nb, H, block, rec]
            self.cache = torch.full((nb, BLOCK, H, shape[3]), 0xAB, dtype=torch.uint8).transpose(1, 2)
        else:
            self.cache = torch.full(shape, 0xAB, dtype=torch.uint8)
        ids = torch.randperm(nb, generator=gen).int()
        self.block_table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
        start = 0
        for b, n in enumerate(need):
            self.block_table[b, :n] = ids[start:start + n]
            start += n
        self.k = [torch.randn(s, H, HD, generator=gen) * 2 for s in seq_lens]
        self.v = [torch.randn(s, H, HD, generator=gen) for s in seq_lens]
        self.q = [torch.randn(s, H * G, HD, generator=gen) for s in seq_lens]

    def slots(self, b, lo, hi):
        pos = torch.arange(lo, hi)
        return (self.block_table[b, pos // BLOCK].long() * BLOCK + pos % BLOCK)

    def step(self, spans, dtype=torch.float32):
        """spans: (request, first, last) token ranges computed this step -> (q, k, v, slots, qsl, seq_lens, bt)."""
        q = torch.cat([self.q[b][lo:hi] for b, lo, hi in spans]).to(dtype)
        k = torch.cat([self.k[b][lo:hi] for b, lo, hi in spans]).to(dtype)
        v = torch.cat([self.v[b][lo:hi] for b, lo, hi in spans]).to(dtype)
        slots = torch.cat([self.slots(b, lo, hi) for b, lo, hi in spans])
        qsl = torch.tensor([0] + [hi - lo for _, lo, hi in spans]).cumsum(0).int()
        seq_lens = torch.tensor([hi for _, _, hi in spans], dtype=torch.int32)
        bt = self.block_table[[b for b, _, _ in spans]]
        return q, k, v, slots, qsl, seq_lens, bt

    def expected(self, spans, dtype=torch.float32):
        return torch.cat([sdpa_fake_quantized(self.q[b][lo:hi].to(dtype), self.k[b][:hi].to(dtype),
                                              self.v[b][:hi].to(dtype), lo, HD ** -0.5) for b, lo, hi in spans])


@pytest.mark.parametrize("nhd", [False, True])
def test_paged_attention_reference_is_causal_attention_over_quantized_kv(nhd):
    p = Paged([5, 40, 17], nhd=nhd)
    first = [(0, 0, 3), (1, 0, 40), (2, 0, 16)]        # prefill / partial prefill
    q, k, v, slots, *_ = p.step(first)
    R.write_kv_cache(k, v, p.cache, slots)
    second = [(0, 3, 5), (2, 16, 17)]                   # chunked-prefill continuation, a decode
    q, k, v, slots, qsl, seq_lens, bt = p.step(second)
    R.write_kv_cache(k, v, p.cache, slots)
    got = R.paged_attention(q, p.cache, qsl, seq_lens, bt, HD ** -0.5)
    torch.testing.assert_close(got, p.expected(second), atol=1e-5, rtol=1e-5)


# ---- the vLLM backend on CPU ----

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_atom.plugin import register
    from vllm_atom.serve.attention import AtomInt4AttentionBackend

    register()
    register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_class() is AtomInt4AttentionBackend
    return AtomInt4AttentionBackend


def reasons(backend, **over):
    from vllm.platforms.interface import DeviceCapability

    kw = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="int4_per_token_head", block_size=16,
              use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
              use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0), attn_type="decoder")
    kw.update(over)
    return backend.validate_configuration(**kw)


def test_backend_validation(backend):
    assert backend.get_name() == "CUSTOM"
    assert reasons(backend) == []
    assert reasons(backend, head_size=64) == []
    assert reasons(backend, kv_cache_dtype="auto") == []  # --kv-cache-dtype-skip-layers layers
    assert "kv_cache_dtype not supported" in reasons(backend, kv_cache_dtype="fp8")
    assert "head_size not supported" in reasons(backend, head_size=96)
    assert "sliding window not supported" in reasons(backend, has_sliding_window=True)
    assert any("attention type" in r for r in reasons(backend, attn_type="encoder_only"))
    assert "block_size not supported" in reasons(backend, block_size=8)
    assert backend.get_kv_cache_shape(10, 16, 8, 128, "int4_per_token_head") == (10, 8, 16, 136)
    assert backend.get_kv_cache_stride_order() == (0, 1, 2, 3)


def make_impl(**over):
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config

    from vllm_atom.serve.attention import AtomInt4AttentionImpl

    kw = dict(num_heads=H * G, head_size=HD, scale=HD ** -0.5, num_kv_heads=H, alibi_slopes=None,
              sliding_window=None, kv_cache_dtype="int4_per_token_head")
    kw.update(over)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        return AtomInt4AttentionImpl(**kw)


@pytest.mark.parametrize("over, says", [
    (dict(sliding_window=4096), "sliding window"),
    (dict(head_size=96), "head size 96"),
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8'"),
    (dict(logits_soft_cap=30.0), "soft cap"),
])
def test_impl_rejects_what_it_cannot_run(backend, over, says):
    with pytest.raises(ValueError, match=says):
        make_impl(**over)


def metadata(q, slots, qsl, seq_lens, bt):
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

    return TritonAttentionMetadata(
        num_actual_tokens=q.shape[0], max_query_len=int((qsl[1:] - qsl[:-1]).max()), query_start_loc=qsl,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=bt, slot_mapping=slots,
        seq_threshold_3D=0, num_par_softmax_segments=0, softmax_segm_output=None, softmax_segm_max=None,
        softmax_segm_expsum=None, causal=True, use_cascade=False, common_prefix_len=0,
        cu_prefix_query_lens=None, prefix_kv_lens=None, suffix_kv_lens=None)


@pytest.mark.parametrize("nhd", [False, True])
def test_impl_write_and_forward_over_two_steps(backend, nhd):
    impl = make_impl()
    p = Paged([20, 33, 9], nhd=nhd, seed=1)
    out = None
    for spans in ([(0, 0, 12), (1, 0, 32), (2, 0, 9)], [(1, 32, 33), (0, 12, 20)]):
        q, k, v, slots, qsl, seq_lens, bt = p.step(spans, torch.bfloat16)
        pad = 3  # vLLM pads the batch: extra token rows, slot -1, a request with no tokens
        k, v, q = (torch.cat([x, torch.randn(pad, *x.shape[1:]).to(x.dtype)]) for x in (k, v, q))
        slots = torch.cat([slots, torch.full((pad,), -1)])
        impl.do_kv_cache_update(None, k, v, p.cache, slots[:-1])  # len(slot_mapping) < key rows
        md = metadata(q[:-pad], slots, torch.cat([qsl, qsl[-1:]]), torch.cat([seq_lens, seq_lens.new_zeros(1)]),
                      torch.cat([bt, bt[:1]]))
        out = torch.full((q.shape[0], H * G, HD), float("nan"), dtype=torch.bfloat16)
        impl.forward(None, q, k, v, p.cache, md, out)
        n = q.shape[0] - pad
        torch.testing.assert_close(out[:n].float(), p.expected(spans, torch.bfloat16), atol=2e-2, rtol=2e-2)
        assert out[n:].isnan().all()  # rows of no request are left alone
    assert impl.forward(None, q, k, v, p.cache, None, out) is out and (out == 0).all()  # profiling run


def test_untouched_slots_stay(backend):
    p = Paged([16])
    before = p.cache.clone()
    q, k, v, slots, *_ = p.step([(0, 0, 16)], torch.float16)
    slots[::2] = -1
    make_impl().do_kv_cache_update(None, k, v, p.cache, slots)
    changed = (p.cache != before).any(-1).any(1).flatten()  # per (block, slot)
    assert changed.sum() == 8


def test_kernels_refuse_bad_inputs():
    from vllm_atom.kernels import kv_int4

    p = Paged([16])
    q, k, v, slots, qsl, seq_lens, bt = p.step([(0, 0, 16)], torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim in"):
        kv_int4.write_kv_int4(k[..., :32], v[..., :32], p.cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        kv_int4.write_kv_int4(k, v, p.cache, slots.int())
    with pytest.raises(ValueError, match="must be uint8"):
        kv_int4.write_kv_int4(k, v, p.cache.view(torch.int8), slots)
    with pytest.raises(ValueError, match="int32"):
        kv_int4.attention_int4(q, p.cache, qsl.long(), seq_lens, bt, 16, 0.1)
    with pytest.raises(ValueError, match="is on meta but the KV cache is on cpu"):
        kv_int4.attention_int4(q, p.cache, qsl, seq_lens.to("meta"), bt, 16, 0.1)
    with pytest.raises(ValueError, match="out must be"):
        kv_int4.attention_int4(q, p.cache, qsl, seq_lens, bt, 16, 0.1, out=torch.empty_like(q, dtype=torch.float16))


class FakeAttention:
    def __init__(self, dtype, backend, layer=0):
        self.kv_cache_dtype = dtype
        self.attn_backend = type("B", (), {"get_name": staticmethod(lambda: backend)})
        self.layer_name = f"model.layers.{layer}.self_attn.attn"


@pytest.mark.parametrize("kv_bits, dtype, backend_name, skip, says", [
    (4, "auto", "FLASH_ATTN", (), "--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM"),
    (4, "fp8", "FLASH_ATTN", (), "the KV cache is fp8"),
    (None, "int4_per_token_head", "TRITON_ATTN", (), "vLLM's own INT4 format"),
    (4, "int4_per_token_head", "CUSTOM", (), None),
    (None, "auto", "FLASH_ATTN", (), None),
    (4, "auto", "CUSTOM", (0, 1), None),                       # a skip layer, kept 16-bit: right
    (4, "int4_per_token_head", "CUSTOM", (0, 1), "--kv-cache-dtype-skip-layers 0 1"),
    (4, "int4_per_token_head", "CUSTOM", (1,), None),          # layer 0 is not a skip layer
])
def test_kv_cache_advice(monkeypatch, kv_bits, dtype, backend_name, skip, says):
    from vllm_atom.config import AtomConfig
    from vllm_atom.serve import config as serve_config

    said = []
    monkeypatch.setattr(serve_config, "Attention", FakeAttention)
    monkeypatch.setattr(serve_config.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    cfg = serve_config.AtomQuantConfig(AtomConfig(kv_bits=kv_bits, kv_skip_layers=skip))
    assert cfg.get_quant_method(FakeAttention(dtype, backend_name), "model.layers.0.self_attn.attn") is None
    assert (said == []) if says is None else (len(said) == 1 and says in said[0])


@pytest.mark.parametrize("reqs", [1, 3, 16, 64, 256, 1000])
@pytest.mark.parametrize("slots", [396, 528, 1])
def test_decode_splits_fill_at_most_one_wave(reqs, slots):
    """The split factor is a multiple of the CTA's warps in [WARPS, MAX_SPLITS]; above WARPS,
    all CTAs fit in one wave and one more step of WARPS would not."""
    from vllm_atom.kernels.kv_int4 import MAX_SPLITS, WARPS, decode_splits

    s = decode_splits(reqs, 8, slots)
    assert s % WARPS == 0 and WARPS <= s <= MAX_SPLITS
    if s > WARPS:
        assert reqs * 8 * (s // WARPS) <= slots
    if s < MAX_SPLITS:
        assert reqs * 8 * (s // WARPS + 1) > slots


def test_decode_splits_examples():
    """132 SMs x 3 CTAs = 396 slots, 8 KV heads: 16 requests -> 12 splits (384 CTAs, one wave;
    16 would need a second, mostly empty one); 64 and 256 requests -> the minimum, 4."""
    from vllm_atom.kernels.kv_int4 import decode_splits

    assert [decode_splits(r, 8, 396) for r in (1, 4, 16, 64, 256)] == [64, 48, 12, 4, 4]
