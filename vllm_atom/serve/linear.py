"""`AtomLinearMethod`: Atom W4A4 for vLLM's linear layers.

create_weights registers the checkpoint tensors of `vllm_atom.format` as vLLM parameters,
so that vLLM's own weight loaders fill QKVParallelLinear, MergedColumnParallelLinear,
RowParallelLinear and ColumnParallelLinear (fused shards, tensor-parallel slices).
On compute capability 9.0 process_weights_after_loading replaces the four weight tensors by
one prepacked ``atom_wpack`` (`layout.prepack_sm90`) and apply runs
``vllm_atom::atom_linear_sm90`` (the wgmma kernel); elsewhere apply runs
``vllm_atom::atom_linear`` on the checkpoint layout. With VLLM_ATOM_REFERENCE_LINEAR=1 in the
environment it runs ``vllm_atom::atom_linear_reference`` (the pure-torch reference: slow, for
checking the kernels inside vLLM with everything else unchanged).
"""

from __future__ import annotations

import os

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    RowvLLMParameter,
)

from vllm_atom.config import AtomConfig
from vllm_atom.format import (
    QWEIGHT,
    REORDER_INDEX,
    W_OUTLIER,
    W_OUTLIER_SCALE,
    W_SCALE,
    CheckpointFormatError,
    LinearLayout,
    check_reorder_index,
    linear_layout,
    tensor_specs,
)
from vllm_atom.kernels import layout, ops

_PARAM_NAMES = (QWEIGHT, W_SCALE, W_OUTLIER, W_OUTLIER_SCALE, REORDER_INDEX)
REFERENCE_ENV = "VLLM_ATOM_REFERENCE_LINEAR"


@register_weight_loader_v2_supported_method
class AtomLinearMethod(LinearMethodBase):
    """INT4 weights in groups of 128 + INT8 outlier columns, dynamic per-token A4/A8."""

    def __init__(self, atom: AtomConfig) -> None:
        self.atom = atom
        self.use_reference = os.environ.get(REFERENCE_ENV, "0") == "1"

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        prefix = getattr(layer, "prefix", "")
        inner_loader = extra_weight_attrs["weight_loader"]
        row_parallel = isinstance(layer, RowParallelLinear)
        tp_size = input_size // input_size_per_partition
        if row_parallel and self.atom.row_shards != tp_size:
            raise ValueError(
                f"{getattr(layer, 'prefix', 'layer')}: this Atom checkpoint's row-parallel layers were "
                f"quantized for row_shards={self.atom.row_shards}, but tensor_parallel_size={tp_size}; "
                f"quantize again with --row-shards {tp_size} or serve with "
                f"--tensor-parallel-size {self.atom.row_shards}")
        n = sum(output_partition_sizes)
        try:
            lay = linear_layout(input_size_per_partition, n, self.atom)
        except ValueError as e:
            raise ValueError(f"{getattr(layer, 'prefix', 'layer')}: unsupported shape for Atom: {e}") from e
        specs = tensor_specs(lay)

        layer.atom_loaded = set()

        def weight(name: str, cls=ModelWeightParameter, **dims):
            spec = specs[name]
            data = torch.empty(spec.shape, dtype=spec.dtype)
            loader = _checked_loader(layer, prefix, name, spec.dtype, inner_loader)
            layer.register_parameter(name, cls(data=data, weight_loader=loader, **dims))

        # WEIGHT: INT4 normal channels, two per byte along K; INT8 outlier columns.
        weight(QWEIGHT, input_dim=1, output_dim=0)
        weight(W_OUTLIER, input_dim=1, output_dim=0)
        # SCALES: per (row, group); per row for the outliers ([N, 1], one column per shard).
        weight(W_SCALE, GroupQuantScaleParameter, input_dim=1, output_dim=0)
        weight(W_OUTLIER_SCALE, GroupQuantScaleParameter, input_dim=1, output_dim=0)
        # REORDER: one index per distinct input. Fused q/k/v and gate/up copy the same
        # whole tensor for every shard; row-parallel layers take their own TP slice.
        reorder = torch.full(specs[REORDER_INDEX].shape, -1, dtype=torch.int32)
        loader = _checked_loader(layer, prefix, REORDER_INDEX, torch.int32, inner_loader)
        if row_parallel:
            param = RowvLLMParameter(data=reorder, input_dim=0, weight_loader=loader)
        else:
            param = BasevLLMParameter(data=reorder, weight_loader=loader)
        layer.register_parameter(REORDER_INDEX, param)
        layer.atom_layout = lay
        layer.atom_act_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        lay: LinearLayout = layer.atom_layout
        prefix = getattr(layer, "prefix", "layer")
        if _is_dummy_load() and not layer.atom_loaded:
            _fill_dummy(layer, lay)
        else:
            _check_all_loaded(layer, prefix, lay)
        check_reorder_index(f"{prefix}.{REORDER_INDEX}", layer.reorder_index, lay)
        for name in (W_SCALE, W_OUTLIER_SCALE):
            if not bool(torch.isfinite(getattr(layer, name)).all()):
                raise CheckpointFormatError(f"{prefix}.{name}: holds non-finite values")
        for name in _PARAM_NAMES:
            data = getattr(layer, name).data
            delattr(layer, name)
            layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
        layer.atom_sm90 = not self.use_reference and ops.use_sm90(layer.qweight.device)
        try:  # checks the kernels support this layer and compiles them before graph capture
            if layer.atom_sm90:
                wpack = layout.prepack_sm90(layer.qweight, layer.w_scale, layer.w_outlier, layer.w_outlier_scale)
                for name in (QWEIGHT, W_SCALE, W_OUTLIER, W_OUTLIER_SCALE):
                    delattr(layer, name)
                layer.register_parameter("atom_wpack", torch.nn.Parameter(wpack, requires_grad=False))
                ops.prepare_atom_linear_sm90(wpack, lay.n, layer.reorder_index, layer.atom_act_dtype)
            else:
                ops.prepare_atom_linear(layer.qweight, layer.w_scale, layer.w_outlier, layer.w_outlier_scale,
                                        layer.reorder_index, layer.atom_act_dtype)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from e

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if layer.atom_sm90:
            lay: LinearLayout = layer.atom_layout
            y = ops.atom_linear_sm90(x2, layer.atom_wpack, layer.reorder_index, bias, lay.n, lay.n_outliers,
                                     self.atom.a_clip)
        else:
            op = ops.atom_linear_reference if self.use_reference else ops.atom_linear
            y = op(x2, layer.qweight, layer.w_scale, layer.w_outlier, layer.w_outlier_scale,
                   layer.reorder_index, bias, self.atom.a_clip)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _shard_ids(layer: torch.nn.Module) -> tuple:
    """Checkpoint shards that feed one fused layer (q/k/v, gate/up), or (None,)."""
    if isinstance(layer, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(layer, MergedColumnParallelLinear):
        return tuple(range(len(layer.output_sizes)))
    return (None,)


_FUSED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _checkpoint_name(prefix: str, suffix: str, shard_id) -> str:
    """The checkpoint tensor a (layer, parameter, shard) comes from, for error messages."""
    head, _, last = prefix.rpartition(".")
    if shard_id is not None and last in _FUSED_NAMES:
        idx = {"q": 0, "k": 1, "v": 2}.get(shard_id, shard_id)
        last = _FUSED_NAMES[last][idx]
    return f"{head + '.' if head else ''}{last}.{suffix}"


def _checked_loader(layer, prefix: str, suffix: str, dtype: torch.dtype, inner):
    """Wrap vLLM's weight loader: check dtype, name the tensor in shape errors, record it."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        name = _checkpoint_name(prefix, suffix, shard_id)
        if loaded_weight.dtype != dtype:
            raise CheckpointFormatError(
                f"{name}: expected dtype {str(dtype).replace('torch.', '')}, got "
                f"{str(loaded_weight.dtype).replace('torch.', '')} {list(loaded_weight.shape)}")
        try:
            inner(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError, ValueError) as e:
            raise CheckpointFormatError(
                f"{name}: shape {list(loaded_weight.shape)} does not fit the Atom layout of this layer "
                f"(local parameter {suffix} is {list(param.shape)}; see vllm_atom.format): {e}") from e
        layer.atom_loaded.add((suffix, shard_id))

    return load


def _check_all_loaded(layer: torch.nn.Module, prefix: str, lay: LinearLayout) -> None:
    specs = tensor_specs(lay)
    shards = _shard_ids(layer)
    for suffix in _PARAM_NAMES:
        if (suffix, None) in layer.atom_loaded:  # an already-fused checkpoint tensor
            continue
        for shard_id in shards:
            if (suffix, shard_id) not in layer.atom_loaded:
                spec = specs[suffix]
                raise CheckpointFormatError(
                    f"{_checkpoint_name(prefix, suffix, shard_id)}: missing from the checkpoint; "
                    f"expected {str(spec.dtype).replace('torch.', '')} "
                    f"(local shape of the fused layer: {list(spec.shape)})")


def _is_dummy_load() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return cfg is not None and cfg.load_config.load_format == "dummy"


@torch.no_grad()
def _fill_dummy(layer: torch.nn.Module, lay: LinearLayout, seed: int = 1234) -> None:
    """Valid random quantized weights for ``--load-format dummy`` (benchmarks without files):
    a permutation, uniform INT4/INT8 values, finite positive scales sized so the layer
    roughly preserves activation scale (weights ~ U(-1, 1) / sqrt(K))."""
    g = torch.Generator(device="cpu").manual_seed(seed + lay.k + 7 * lay.n)
    layer.reorder_index.copy_(torch.randperm(lay.k_shard, generator=g).to(torch.int32))
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, dtype=torch.uint8))
    layer.w_outlier.copy_(torch.randint(-127, 128, layer.w_outlier.shape, generator=g, dtype=torch.int8))
    layer.w_scale.fill_(1.0 / (8 * lay.k ** 0.5))
    layer.w_outlier_scale.fill_(1.0 / (127 * lay.k ** 0.5))
