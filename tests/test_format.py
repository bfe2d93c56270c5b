import pytest
import torch

from vllm_atom.config import AtomConfig
from vllm_atom.format import (
    CheckpointFormatError,
    check_linear_tensors,
    is_quantized_linear,
    linear_layout,
    pack_int4,
    tensor_specs,
    unpack_int4,
)

SHAPES = [(1, 2), (3, 8), (7, 130), (16, 576), (5, 4, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_signed_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_unsigned_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q), signed=False), q.to(torch.int8))


def test_nibble_order_is_documented_one():
    # element 2j -> low nibble, 2j+1 -> high nibble, two's complement
    p = pack_int4(torch.tensor([[1, -2, -8, 7]]))
    assert p.tolist() == [[0x1 | (0xE << 4), 0x8 | (0x7 << 4)]]


def test_pack_rejects_odd_and_unpack_rejects_non_uint8():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


def test_layout_and_specs_with_row_shards():
    lay = linear_layout(1536, 576, AtomConfig(), shards=2)  # down_proj of SmolLM2 at TP=2
    assert (lay.k_shard, lay.n_outliers, lay.k_normal, lay.n_groups) == (768, 128, 640, 5)
    specs = tensor_specs(lay)
    assert specs["qweight"].shape == (576, 640) and specs["qweight"].dtype == torch.uint8
    assert specs["w_scale"].shape == (576, 10)
    assert specs["w_outlier"].shape == (576, 256)
    assert specs["w_outlier_scale"].shape == (576, 2)
    assert specs["reorder_index"].shape == (1536,)


def _tensors(prefix, lay):
    t = {f"{prefix}.{k}": torch.zeros(s.shape, dtype=s.dtype) for k, s in tensor_specs(lay).items()}
    t[f"{prefix}.reorder_index"] = torch.cat(
        [torch.randperm(lay.k_shard) for _ in range(lay.shards)]).to(torch.int32)
    return t


def test_check_linear_tensors_names_the_bad_tensor():
    lay = linear_layout(576, 192, AtomConfig())
    p = "model.layers.0.self_attn.k_proj"
    good = _tensors(p, lay)
    check_linear_tensors(p, good, lay)
    with pytest.raises(CheckpointFormatError, match=rf"{p}.w_scale: missing; expected float16 \[192, 4\]"):
        check_linear_tensors(p, {k: v for k, v in good.items() if not k.endswith("w_scale")}, lay)
    with pytest.raises(CheckpointFormatError, match=rf"{p}.qweight: expected uint8 \[192, 256\], got uint8 \[192, 288\]"):
        check_linear_tensors(p, {**good, f"{p}.qweight": torch.zeros(192, 288, dtype=torch.uint8)}, lay)
    with pytest.raises(CheckpointFormatError, match=rf"{p}.w_outlier: expected int8"):
        check_linear_tensors(p, {**good, f"{p}.w_outlier": torch.zeros(192, 64, dtype=torch.float16)}, lay)
    bad = good[f"{p}.reorder_index"].clone()
    bad[0] = bad[1]
    with pytest.raises(CheckpointFormatError, match="not a permutation"):
        check_linear_tensors(p, {**good, f"{p}.reorder_index": bad}, lay)


def test_quantized_linear_names():
    assert is_quantized_linear("model.layers.0.self_attn.q_proj")
    assert is_quantized_linear("model.layers.0.self_attn.qkv_proj")
    assert is_quantized_linear("model.layers.11.mlp.gate_up_proj")
    assert not is_quantized_linear("lm_head")
    assert not is_quantized_linear("model.embed_tokens")
    assert not is_quantized_linear("model.layers.0.self_attn.q_proj_extra")
