"""The paged INT4 KV cache reference: the byte layout and numerics kernels must reproduce."""

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.format import pack_int4


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,block_size", [(1, 16), (4, 16), (8, 32)])
def test_write_then_read_round_trips_with_padding(head_dim, heads, block_size):
    num_blocks, seq_len = 9, 70
    cache = torch.full((num_blocks, heads, block_size, R.kv_record_bytes(head_dim)), 0xA5, dtype=torch.uint8)
    poison = cache.clone()
    block_table = torch.randperm(num_blocks)[: (seq_len + block_size - 1) // block_size]
    pos = torch.arange(seq_len)
    slots = block_table[pos // block_size] * block_size + pos % block_size
    k = torch.randn(seq_len + 3, heads, head_dim, dtype=torch.float16) * 3
    v = torch.randn(seq_len + 3, heads, head_dim, dtype=torch.float16)
    # padded slot_mapping: two -1 entries; tokens beyond len(slot_mapping) are not written
    order = torch.randperm(seq_len)
    slot_mapping = torch.cat((slots[order], torch.tensor([-1, -1])))
    k_in = torch.cat((k[:seq_len][order], k[seq_len:seq_len + 2]))
    v_in = torch.cat((v[:seq_len][order], v[seq_len:seq_len + 2]))
    R.write_kv_cache(torch.cat((k_in, k[-1:])), torch.cat((v_in, v[-1:])), cache, slot_mapping)

    k_out, v_out = R.read_kv_cache(cache, block_table, seq_len, head_dim)
    torch.testing.assert_close(k_out, R.dequantize_kv(R.quantize_kv(k[:seq_len])), rtol=0, atol=0)
    torch.testing.assert_close(v_out, R.dequantize_kv(R.quantize_kv(v[:seq_len])), rtol=0, atol=0)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    written[slots // block_size, slots % block_size] = True
    assert torch.equal(cache.permute(0, 2, 1, 3)[~written], poison.permute(0, 2, 1, 3)[~written])


def test_record_bytes_are_the_documented_layout():
    head_dim = 64
    cache = torch.zeros(1, 1, 16, R.kv_record_bytes(head_dim), dtype=torch.uint8)
    k = torch.randn(1, 1, head_dim)
    v = torch.randn(1, 1, head_dim)
    R.write_kv_cache(k, v, cache, torch.tensor([5]))
    rec = cache[0, 0, 5]
    qk, qv = R.quantize_kv(k), R.quantize_kv(v)
    assert rec.shape[0] == 2 * (head_dim // 2 + 4) == 72
    assert torch.equal(rec[:32], pack_int4(qk.q)[0, 0])
    assert torch.equal(rec[32:36].view(torch.float16), torch.stack((qk.scale[0, 0], qk.zero[0, 0])))
    assert torch.equal(rec[36:68], pack_int4(qv.q)[0, 0])
    assert torch.equal(rec[68:72].view(torch.float16), torch.stack((qv.scale[0, 0], qv.zero[0, 0])))


@pytest.mark.parametrize("d", [64, 128])
def test_hadamard_rotate_is_the_normalised_sylvester_matrix(d):
    from vllm_atom.quantize.rotate import hadamard

    x = torch.randn(7, 3, d, dtype=torch.bfloat16)
    y = R.hadamard_rotate(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, (x.double() @ hadamard(d)).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(R.hadamard_rotate(y), x.float(), rtol=0, atol=1e-5)  # its own inverse
    with pytest.raises(ValueError, match="power-of-two"):
        R.hadamard_rotate(torch.zeros(2, 96))


def _sequence(head_dim, seq_len, outlier):
    torch.manual_seed(head_dim)
    k = torch.randn(seq_len, 2, head_dim)
    k[:, :, 5] += outlier                      # one large channel: per-token INT4 keys suffer
    v = torch.randn(seq_len, 2, head_dim)
    q = torch.randn(seq_len, 4, head_dim).to(torch.bfloat16)
    return q, k.to(torch.bfloat16), v.to(torch.bfloat16)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotated_keys_store_the_rotation_and_attend_as_the_simulation(head_dim):
    seq_len, block = 40, 16
    q, k, v = _sequence(head_dim, seq_len, outlier=30.0)
    cache = torch.zeros(3, 2, block, R.kv_record_bytes(head_dim), dtype=torch.uint8)
    bt = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    pos = torch.arange(seq_len)
    R.write_kv_cache(k, v, cache, (bt[0, pos // block] * block + pos % block).long(), rotate_k=True)
    k_out, v_out = R.read_kv_cache(cache, bt[0], seq_len, head_dim)
    assert torch.equal(k_out, R.dequantize_kv(R.quantize_kv(R.hadamard_rotate(k))))
    assert torch.equal(v_out, R.dequantize_kv(R.quantize_kv(v)))  # V is not rotated

    qsl, lens = torch.tensor([0, seq_len], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32)
    got = R.paged_attention(q, cache, qsl, lens, bt, head_dim ** -0.5, rotate_k=True)
    # the simulation's form: keys quantized in the rotated basis and rotated back, q unrotated
    kf = R.fake_quantize_kv(k, rotate=True).float().repeat_interleave(2, 1).transpose(0, 1)
    vf = R.fake_quantize_kv(v).float().repeat_interleave(2, 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ kf.transpose(1, 2)) * head_dim ** -0.5
    s = s.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    sim = (s.softmax(-1) @ vf).transpose(0, 1)
    torch.testing.assert_close(got, sim, rtol=0, atol=0.02)  # they differ by the query's bf16 rounding


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotation_reduces_the_key_error_of_an_outlier_channel(head_dim):
    q, k, _ = _sequence(head_dim, 64, outlier=30.0)

    def scores(keys):
        return torch.einsum("ihd,jhd->hij", q.float(), keys.float().repeat_interleave(2, 1))

    exact = scores(k)
    err = {rot: float((scores(R.fake_quantize_kv(k, rotate=rot)) - exact).pow(2).mean()) for rot in (False, True)}
    assert err[True] < 0.5 * err[False], err
