"""Loading the key centers of an Atom checkpoint with ``kv_center_k`` into vLLM's attention layers.

The checkpoint stores ``model.layers.{i}.self_attn.k_center`` (fp32 [kv_heads, head_dim],
`vllm_atom.format.KEY_CENTER`). `AtomKVCenterMethod` is the quantization method of each
attention layer of such a checkpoint: it gives the layer a ``k_center`` parameter (this rank's
kv heads), which `CHECKPOINT_TO_VLLM` maps the checkpoint's name onto, and the Atom INT4 cache
write (`vllm_atom.serve.attention`) stores keys minus it. With a 16-bit or FP8 cache the keys are
not quantized to INT4 and the centers go unused.
"""

from __future__ import annotations

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod
from vllm.model_executor.models.utils import WeightsMapper

from vllm_atom.format import KEY_CENTER

# checkpoint name -> the attention layer's parameter (vLLM's Attention sits at self_attn.attn)
CHECKPOINT_TO_VLLM = WeightsMapper(orig_to_new_suffix={"." + KEY_CENTER: ".self_attn.attn.k_center"})


def rank_heads(center: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The rows of a [kv_heads, D] center that tensor-parallel rank ``tp_rank`` of ``tp_size`` holds:
    its slice when the kv heads divide over the ranks, its one (replicated) head when there are
    fewer kv heads than ranks (as vLLM's QKVParallelLinear shards k_proj)."""
    heads = center.shape[0]
    if heads >= tp_size:
        per = heads // tp_size
        return center[tp_rank * per:(tp_rank + 1) * per]
    return center[tp_rank // (tp_size // heads)][None]


class AtomKVCenterMethod(BaseKVCacheMethod):
    """vLLM's KV-cache method (scales as usual) plus the layer's ``k_center`` parameter."""

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        name = layer.layer_name.removesuffix(".attn") + ".k_center"  # as the checkpoint names it
        heads, d = layer.num_kv_heads, layer.head_size
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()

        def load(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
            if loaded.dim() != 2 or loaded.shape[1] != d or loaded.dtype != torch.float32 or (
                    loaded.shape[0] % tp_size and tp_size % loaded.shape[0]):
                raise ValueError(f"checkpoint tensor {name}: expected float32 [kv_heads, {d}] with kv_heads "
                                 f"dividing or divided by the {tp_size} tensor-parallel ranks, got "
                                 f"{loaded.dtype} {list(loaded.shape)}")
            part = rank_heads(loaded, tp_size, tp_rank)
            if part.shape != param.shape:
                raise ValueError(f"checkpoint tensor {name}: {list(loaded.shape)} gives this rank "
                                 f"{list(part.shape)}, but its attention layer has {heads} kv heads of {d}")
            param.data.copy_(part)
            layer.atom_k_center_loaded = True

        layer.k_center = torch.nn.Parameter(torch.zeros(heads, d, dtype=torch.float32), requires_grad=False)
        layer.k_center.weight_loader = load
        layer.atom_k_center_name, layer.atom_k_center_loaded = name, False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        if not layer.atom_k_center_loaded and not _dummy_weights():
            raise ValueError(f"checkpoint tensor {layer.atom_k_center_name}: missing (its config has kv_center_k, "
                             "so every INT4-KV layer needs its key center)")


def _dummy_weights() -> bool:
    """Whether vLLM fills the weights itself (--load-format dummy): no tensor is read then."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return cfg is not None and str(cfg.load_config.load_format) == "dummy"
