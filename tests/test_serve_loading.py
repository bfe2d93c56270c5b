"""Synthetic Atom checkpoint tensors through vLLM's own loaders into fused layers (CPU).

Builds QKVParallelLinear / MergedColumnParallelLinear / RowParallelLinear /
ColumnParallelLinear with the atom method, loads unfused per-projection tensors through
AutoWeightsLoader and Llama's WeightsMapper (the path vLLM takes for a checkpoint), and
checks the fused parameters, the forward against the reference, and the load errors.
"""

import tempfile

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.config import AtomConfig
from vllm_atom.format import CheckpointFormatError

H, NH, NKV, HD, INTER = 576, 9, 3, 64, 1536  # SmolLM2-135M layer: 64 outliers at K=576


@pytest.fixture(scope="module")
def vllm_cpu():
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    ctx = set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu")))
    ctx.__enter__()
    if not model_parallel_is_initialized():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"file://{tempfile.mktemp()}")
        initialize_model_parallel(1, 1)
    yield
    ctx.__exit__(None, None, None)


def build_block(bias: bool):
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    from vllm_atom.serve.config import AtomQuantConfig
    qc = AtomQuantConfig(AtomConfig())
    p = "model.layers.0"
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    layer = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList([layer])
    layer.self_attn = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.self_attn.qkv_proj = QKVParallelLinear(H, HD, NH, NKV, bias=bias, quant_config=qc,
                                                 params_dtype=torch.float16, prefix=f"{p}.self_attn.qkv_proj")
    layer.self_attn.o_proj = RowParallelLinear(NH * HD, H, bias=False, quant_config=qc,
                                               params_dtype=torch.float16, prefix=f"{p}.self_attn.o_proj")
    layer.mlp.gate_up_proj = MergedColumnParallelLinear(H, [INTER, INTER], bias=False, quant_config=qc,
                                                        params_dtype=torch.float16, prefix=f"{p}.mlp.gate_up_proj")
    layer.mlp.down_proj = RowParallelLinear(INTER, H, bias=False, quant_config=qc,
                                            params_dtype=torch.float16, prefix=f"{p}.mlp.down_proj")
    return root


def quantized(n, k, idx):
    o = AtomConfig().outliers_for(k)
    return R.quantize_weight(torch.randn(n, k) / k ** 0.5, idx, o)


def synthetic_checkpoint(bias: bool):
    """Unfused per-projection tensors as the quantizer writes them, plus their QuantizedWeight."""
    p = "model.layers.0"
    idx_attn, idx_mlp = torch.randperm(H).int(), torch.randperm(H).int()
    projs = {
        "self_attn.q_proj": (NH * HD, H, idx_attn), "self_attn.k_proj": (NKV * HD, H, idx_attn),
        "self_attn.v_proj": (NKV * HD, H, idx_attn), "self_attn.o_proj": (H, NH * HD, torch.randperm(NH * HD).int()),
        "mlp.gate_proj": (INTER, H, idx_mlp), "mlp.up_proj": (INTER, H, idx_mlp),
        "mlp.down_proj": (H, INTER, torch.randperm(INTER).int()),
    }
    tensors, weights = {}, {}
    for name, (n, k, idx) in projs.items():
        q = quantized(n, k, idx)
        weights[name] = (q, idx)
        for suffix, t in q.packed().items():
            tensors[f"{p}.{name}.{suffix}"] = t.clone()
        tensors[f"{p}.{name}.reorder_index"] = idx.clone()
        if bias and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
            tensors[f"{p}.{name}.bias"] = torch.randn(n, dtype=torch.float16)
    return tensors, weights


def load(root, tensors):
    from vllm.model_executor.models.llama import LlamaModel
    from vllm.model_executor.models.utils import AutoWeightsLoader

    AutoWeightsLoader(root).load_weights(iter(tensors.items()), mapper=LlamaModel.hf_to_vllm_mapper)
    for module in root.modules():  # what vLLM's process_weights_after_loading does per module
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_layers_load_identically_and_forward_matches_reference(vllm_cpu, bias):
    tensors, weights = synthetic_checkpoint(bias)
    root = build_block(bias)
    load(root, tensors)
    layer = root.model.layers[0]
    p = "model.layers.0"
    fused = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
             "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
             "self_attn.o_proj": ["self_attn.o_proj"], "mlp.down_proj": ["mlp.down_proj"]}
    for fname, parts in fused.items():
        mod = layer.get_submodule(fname)
        for suffix in ("qweight", "w_scale", "w_outlier", "w_outlier_scale"):
            want = torch.cat([tensors[f"{p}.{part}.{suffix}"] for part in parts], 0)
            got = getattr(mod, suffix)
            assert got.dtype == want.dtype and torch.equal(got.data, want), f"{fname}.{suffix}"
        assert torch.equal(mod.reorder_index.data, tensors[f"{p}.{parts[0]}.reorder_index"])
        if bias and fname == "self_attn.qkv_proj":
            want = torch.cat([tensors[f"{p}.{part}.bias"] for part in parts])
            assert torch.equal(mod.bias.data, want)

        # forward through the method's apply (CPU: the reference op) == per-projection reference
        k = mod.reorder_index.numel()
        x = torch.randn(5, k, dtype=torch.float16)
        y = mod(x)[0] if isinstance(mod(x), tuple) else mod(x)
        refs = []
        for part in parts:
            q, idx = weights[part]
            b = tensors.get(f"{p}.{part}.bias")
            refs.append(R.atom_linear(x, q, idx, AtomConfig().outliers_for(k), b))
        torch.testing.assert_close(y, torch.cat(refs, 1), rtol=0, atol=0)


def test_reference_linear_switch(vllm_cpu, monkeypatch):
    """VLLM_ATOM_REFERENCE_LINEAR=1 makes apply run the integer-exact reference op (what the GPU
    test compares the kernels with inside vLLM); it agrees with the default CPU op to fp32 rounding."""
    from vllm_atom.serve.linear import REFERENCE_ENV

    tensors, weights = synthetic_checkpoint(False)
    monkeypatch.setenv(REFERENCE_ENV, "1")
    ref_root = build_block(False)
    monkeypatch.delenv(REFERENCE_ENV)
    root = build_block(False)
    load(ref_root, tensors)
    load(root, tensors)
    mod, ref_mod = root.model.layers[0].mlp.down_proj, ref_root.model.layers[0].mlp.down_proj
    assert ref_mod.quant_method.use_reference and not mod.quant_method.use_reference
    x = torch.randn(7, INTER, dtype=torch.float16)
    q, idx = weights["mlp.down_proj"]
    want = R.atom_linear(x, q, idx, AtomConfig().outliers_for(INTER), None, exact=True)
    y_ref = ref_mod(x)[0]
    torch.testing.assert_close(y_ref, want, rtol=0, atol=0)
    torch.testing.assert_close(mod(x)[0], y_ref, rtol=2e-3, atol=2e-3)


def _expect_load_error(vllm_cpu, mutate, match):
    tensors, _ = synthetic_checkpoint(False)
    mutate(tensors)
    with pytest.raises(CheckpointFormatError, match=match):
        load(build_block(False), tensors)


def test_missing_tensor_is_named(vllm_cpu):
    name = "model.layers.0.self_attn.k_proj.w_scale"
    _expect_load_error(vllm_cpu, lambda t: t.pop(name), rf"{name}: missing from the checkpoint; expected float16")


def test_wrong_dtype_is_named(vllm_cpu):
    name = "model.layers.0.mlp.up_proj.w_outlier"

    def mutate(t):
        t[name] = t[name].to(torch.int16)
    _expect_load_error(vllm_cpu, mutate, rf"{name}: expected dtype int8, got int16")


def test_wrong_shape_is_named(vllm_cpu):
    name = "model.layers.0.mlp.down_proj.qweight"

    def mutate(t):
        t[name] = torch.zeros(H, 100, dtype=torch.uint8)
    _expect_load_error(vllm_cpu, mutate, rf"{name}: shape \[576, 100\] does not fit")


def test_reorder_index_not_a_permutation_is_named(vllm_cpu):
    def mutate(t):
        for proj in ("q_proj", "k_proj", "v_proj"):
            t[f"model.layers.0.self_attn.{proj}.reorder_index"][3] = 0
    _expect_load_error(vllm_cpu, mutate, r"self_attn.qkv_proj.reorder_index: shard 0 is not a permutation")


def test_plain_column_parallel_layer(vllm_cpu):
    from vllm.model_executor.layers.linear import ColumnParallelLinear
    from vllm.model_executor.models.utils import AutoWeightsLoader

    from vllm_atom.serve.config import AtomQuantConfig
    root = torch.nn.Module()
    root.q_proj = ColumnParallelLinear(256, 96, bias=False, quant_config=AtomQuantConfig(AtomConfig()),
                                       params_dtype=torch.float16, prefix="q_proj")
    idx = torch.randperm(256).int()
    q = quantized(96, 256, idx)
    tensors = {f"q_proj.{k}": v for k, v in q.packed().items()} | {"q_proj.reorder_index": idx}
    AutoWeightsLoader(root).load_weights(iter(tensors.items()))
    root.q_proj.quant_method.process_weights_after_loading(root.q_proj)
    x = torch.randn(3, 256, dtype=torch.float16)
    torch.testing.assert_close(root.q_proj(x)[0], R.atom_linear(x, q, idx, 128), rtol=0, atol=0)


def test_row_shards_must_match_tensor_parallel_size(vllm_cpu):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_atom.serve.config import AtomQuantConfig
    with pytest.raises(ValueError, match="row_shards=2.*tensor_parallel_size=1"):
        RowParallelLinear(1536, 576, bias=False, quant_config=AtomQuantConfig(AtomConfig(row_shards=2)),
                          prefix="model.layers.0.mlp.down_proj")


def test_unsupported_shape_fails_at_build(vllm_cpu):
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_atom.serve.config import AtomQuantConfig
    with pytest.raises(ValueError, match="o_proj: unsupported shape for Atom"):
        RowParallelLinear(64, 128, bias=False, quant_config=AtomQuantConfig(AtomConfig()),
                          prefix="model.layers.0.self_attn.o_proj")
