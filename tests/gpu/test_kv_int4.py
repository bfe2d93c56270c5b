"""The INT4 KV cache kernels against `vllm_atom.reference` on the GPU.

Write: the cache bytes (nibbles, fp16 scale and zero) equal the reference quantizer's exactly,
HND and NHD strides, padded slot_mapping shorter than the key rows, untouched slots unchanged.
Attention: decode (split-K over several split counts, empty splits included) and mixed
prefill/decode batches with cached context (chunked prefill, prefix caching), random block
tables, sequence lengths 1 .. 8192, GQA 1/4/8, head dims 64/128, against fp32 attention over
the dequantized cache. Tolerance: the kernel rounds P*v_scale to fp16 (2^-11 relative) and
the output to the model dtype (bf16: 2^-9 relative), and uses ex2.approx (2 ulp); errors are
relative to the largest |V| a row averages (the injected outlier channel, ~40 here), so the
checks allow atol = tol * max|ref| and rtol = tol with tol = 2^-8 (bf16) or 2^-10 (fp16); fp16
measured up to 3.6e-4 * max|ref|. A wrong token, page, head or scale moves outputs by O(1).
CUDA graphs: the decode launch captured with seq_lens = 1 and replayed with real lengths.
rotate_k (keys stored Hadamard-rotated, queries rotated on load): the same checks against the
reference with the same flag (its rotation is the kernels' operation for operation).
"""

import math

import pytest
import torch

from vllm_atom import reference as R

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if torch.cuda.is_available():
    from vllm_atom.kernels import kv_int4

DEV = "cuda"
BLOCK = 16


def make_cache(nb, h, d, nhd, block=BLOCK, fill=0xAB):
    rec = R.kv_record_bytes(d)
    if nhd:
        return torch.full((nb, block, h, rec), fill, dtype=torch.uint8, device=DEV).transpose(1, 2)
    return torch.full((nb, h, block, rec), fill, dtype=torch.uint8, device=DEV)


def kv_values(t, h, d, dtype, gen, overflow=False):
    x = torch.randn(t, h, d, generator=gen, device=DEV) * 2
    x[::7, :, 3] *= 40                       # outlier channels
    x[5 % max(t, 1)] = 0.25                  # a constant row: scale 0
    if overflow and t > 9 and dtype == torch.bfloat16:
        x[9, 0, :] = torch.linspace(-60000, 930000, d)  # (max - min) / 15 rounds to an inf fp16 scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("h", [1, 2, 8])
@pytest.mark.parametrize("nhd", [False, True])
@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("center", [False, True])
def test_write_is_byte_exact(dtype, d, h, nhd, rotate_k, center):
    gen = torch.Generator(device=DEV).manual_seed(d * 10 + h)
    k_center = (torch.randn(h, d, generator=gen, device=DEV) * 3).contiguous() if center else None
    nb, t = 13, 150
    cache = make_cache(nb, h, d, nhd)
    key, value = kv_values(t + 5, h, d, dtype, gen, True), kv_values(t + 5, h, d, dtype, gen, True)
    slots = torch.randperm(nb * BLOCK, device=DEV)[:t].long()
    slots[::11] = -1                          # padding
    big = torch.zeros(t + 5, h + 1, d, dtype=dtype, device=DEV)  # strided views, as q/k/v splits are
    big[:, :h] = key
    key_view = big[:, :h]
    want = cache.cpu().clone()
    R.write_kv_cache(key.cpu(), value.cpu(), want, slots.cpu(), rotate_k,
                     None if k_center is None else k_center.cpu())
    kv_int4.write_kv_int4(key_view, value, cache, slots, rotate_k, k_center)
    got = cache.cpu()
    assert torch.equal(got, want), (got != want).nonzero()[:10]


@pytest.mark.parametrize("rotate_k", [False, True])
@pytest.mark.parametrize("g", [1, 4])
def test_centered_keys_leave_attention_unchanged(rotate_k, g):
    """Keys with a large per-channel offset, written minus their center (`k_center`): decode and
    prefill rows over that cache equal fp32 attention over the keys fake-quantized the centered way
    plus the center, ``fake_quantize_kv(k, rotate_k, center)`` (softmax drops the q . center every
    key of a query shares; with rotate_k both sides in the Hadamard basis, the query rounded to
    bf16 as the kernel's), and differ clearly from attention over the uncentered INT4 keys."""
    dtype, d, h, block = torch.bfloat16, 128, 2, BLOCK
    gen = torch.Generator(device=DEV).manual_seed(7 + g)
    offset = torch.randn(h, d, generator=gen, device=DEV) * 8
    seq_q = [(300, 1), (77, 20)]
    need = [math.ceil(s / block) for s, _ in seq_q]
    cache = make_cache(sum(need) + 1, h, d, False)
    bt = torch.zeros(len(seq_q), max(need), dtype=torch.int32, device=DEV)
    bt[0, :need[0]] = torch.arange(need[0], device=DEV, dtype=torch.int32)
    bt[1, :need[1]] = torch.arange(need[0], need[0] + need[1], device=DEV, dtype=torch.int32)
    keys, values = [], []
    for b, (s, _) in enumerate(seq_q):
        k = (kv_values(s, h, d, torch.float32, gen) + offset).to(dtype)
        v = kv_values(s, h, d, dtype, gen)
        pos = torch.arange(s, device=DEV)
        kv_int4.write_kv_int4(k, v, cache, bt[b, pos // block].long() * block + pos % block, rotate_k, offset)
        keys.append(k)
        values.append(v)
    qsl = torch.tensor([0] + [ql for _, ql in seq_q], device=DEV).cumsum(0).int()
    seq_lens = torch.tensor([s for s, _ in seq_q], dtype=torch.int32, device=DEV)
    q = torch.randn(int(qsl[-1]), h * g, d, generator=gen, device=DEV).to(dtype)
    out = torch.full_like(q, float("nan"))
    kv_int4.attention_int4(q, cache, qsl, seq_lens, bt, max(ql for _, ql in seq_q), d ** -0.5, out=out,
                           rotate_k=rotate_k)

    def attention(center):
        rows = []
        for b, (s, ql) in enumerate(seq_q):
            kq = R.fake_quantize_kv(keys[b].float(), rotate_k, center)  # fp32 [S, H, D]
            vq = R.fake_quantize_kv(values[b].float())
            qb = q[qsl[b]:qsl[b + 1]].float().view(ql, h, g, d)
            if rotate_k:  # in the basis the kernel works in, its query rounded to the model dtype
                kq, qb = R.hadamard_rotate(kq), R.hadamard_rotate(qb).to(dtype).float()
            logits = torch.einsum("qhgd,shd->qhgs", qb, kq) * d ** -0.5
            pos = torch.arange(s - ql, s, device=DEV)[:, None, None, None]
            logits = logits.masked_fill(torch.arange(s, device=DEV) > pos, float("-inf"))
            rows.append(torch.einsum("qhgs,shd->qhgd", logits.softmax(-1), vq).reshape(ql, h * g, d))
        return torch.cat(rows)

    want, unc = attention(offset), attention(None)
    tol = 2 ** -8
    torch.testing.assert_close(out.float(), want, atol=tol * float(want.abs().amax()), rtol=tol)
    assert float((unc - want).abs().amax()) > 4 * float((out.float() - want).abs().amax())  # centering mattered


def build(seq_q, h, g, d, dtype, nhd, seed, rotate_k=False):
    """seq_q: (seq_len, q_len) per request; all K/V written through the kernel first."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    need = [math.ceil(s / BLOCK) for s, _ in seq_q]
    nb = sum(need) + 2
    cache = make_cache(nb, h, d, nhd)
    ids = torch.randperm(nb, device=DEV, generator=gen).int()
    bt = torch.zeros(len(seq_q) + 1, max(need) + 1, dtype=torch.int32, device=DEV)  # + a padding request
    start = 0
    for b, n in enumerate(need):
        bt[b, :n] = ids[start:start + n]
        start += n
    for b, (s, _) in enumerate(seq_q):
        pos = torch.arange(s, device=DEV)
        slots = bt[b, pos // BLOCK].long() * BLOCK + pos % BLOCK
        kv_int4.write_kv_int4(kv_values(s, h, d, dtype, gen), kv_values(s, h, d, dtype, gen).div(2), cache, slots,
                              rotate_k)
    q_lens = [ql for _, ql in seq_q] + [0]
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0).int()
    seq_lens = torch.tensor([s for s, _ in seq_q] + [0], dtype=torch.int32, device=DEV)
    q = (torch.randn(int(qsl[-1]) + 3, h * g, d, generator=gen, device=DEV)).to(dtype)  # + 3 padded rows
    return cache, bt, qsl, seq_lens, q


def check(q, cache, qsl, seq_lens, bt, out, dtype, rotate_k=False):
    n = int(qsl[-1])
    ref = R.paged_attention(q[:n], cache, qsl, seq_lens, bt, q.shape[-1] ** -0.5, rotate_k)
    tol = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(out[:n].float(), ref, atol=tol * float(ref.abs().amax()), rtol=tol)
    assert out[n:].isnan().all()


CASES = {
    "decode": [(1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (1000, 1), (8192, 1), (33, 1)],
    "mixed": [(37, 37), (1, 1), (116, 16), (205, 200), (1000, 1), (48, 3), (4100, 300)],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rotate_k", [False, True])
def test_attention_matches_reference(dtype, d, g, case, rotate_k, monkeypatch):
    seq_q = CASES[case]
    nhd = g == 4  # the strided kernel; the others use the contiguous-tile (cp.async) kernel
    cache, bt, qsl, seq_lens, q = build(seq_q, 2, g, d, dtype, nhd, seed=d + g, rotate_k=rotate_k)
    max_q = max(ql for _, ql in seq_q)
    # splits 4 and 8 (and None: a multiple of 4) are merged in the CTA, 4 with no reduce launch;
    # 7, and 8 with the merge off, write one partial per split
    runs = [(None, True), (1, True), (4, True), (7, True), (8, True), (8, False)] if case == "decode" \
        else [(None, True)]
    monkeypatch.setattr(kv_int4, "MERGE_MIN_SPLITS", 1)  # merge whatever WARPS divides
    for s, merge in runs:
        monkeypatch.setattr(kv_int4, "MERGE_SPLITS", merge)
        out = torch.full_like(q, float("nan"))
        kv_int4.attention_int4(q, cache, qsl, seq_lens, bt, max_q, q.shape[-1] ** -0.5, out=out, num_splits=s,
                               rotate_k=rotate_k)
        check(q, cache, qsl, seq_lens, bt, out, dtype, rotate_k)


def test_decode_cuda_graph_replay():
    dtype, d, g = torch.bfloat16, 128, 4
    seq_q = [(3000, 1), (17, 1), (1, 1), (513, 1)]
    cache, bt, qsl, seq_lens, q = build(seq_q, 8, g, d, dtype, False, seed=3)
    real = seq_lens.clone()
    out = torch.full_like(q, float("nan"))
    kv_int4.attention_int4(q, cache, qsl, seq_lens, bt, 1, d ** -0.5, out=out)  # compiled, warm
    seq_lens.fill_(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_int4.attention_int4(q, cache, qsl, seq_lens, bt, 1, d ** -0.5, out=out)
    seq_lens.copy_(real)
    out.fill_(float("nan"))
    graph.replay()
    check(q, cache, qsl, seq_lens, bt, out, dtype)


def test_bad_inputs_are_refused():
    cache = make_cache(4, 2, 96, False)
    with pytest.raises(ValueError, match="head_dim"):
        kv_int4.check_cache(cache, 96)
    cache = make_cache(4, 2, 128, False)
    q = torch.zeros(2, 3, 128, dtype=torch.bfloat16, device=DEV)
    i32 = torch.zeros(2, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        kv_int4.attention_int4(q, cache, i32, i32[:1], i32[:1, None], 1, 1.0)
