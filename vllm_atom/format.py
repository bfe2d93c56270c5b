"""The Atom checkpoint format (format_version 1): tensor names, shapes, dtypes, packing.

This is the only contract between the offline quantizer (`vllm_atom.quantize`) and the
runtime (`vllm_atom.serve`). A checkpoint is a Hugging Face model directory whose
config.json carries ``"quantization_config": AtomConfig.to_dict()`` and whose
safetensors hold, for every quantized linear ``P`` (e.g.
``model.layers.3.self_attn.q_proj``), in place of ``P.weight``:

==========================  =======  ==================  ======================================
tensor                      dtype    shape               meaning
==========================  =======  ==================  ======================================
``P.qweight``               uint8    [N, S*(Ks-Os)/2]    INT4 weights of the normal channels,
                                                         two per byte along K (see packing)
``P.w_scale``               float16  [N, S*(Ks-Os)/G]    one scale per output row and group
``P.w_outlier``             int8     [N, S*Os]           INT8 weights of the outlier channels
``P.w_outlier_scale``       float16  [N, S]              one scale per output row (and shard)
``P.reorder_index``         int32    [K]                 input channel gathered into each slot
``P.bias`` (if the model    model    [N]                 unquantized; q/k after the key smoothing
has one, Qwen2 q/k/v)       dtype                        (``kv_smooth``), v as in the source
==========================  =======  ==================  ======================================

q_proj / k_proj weights and biases carry the key smoothing the quantizer folds in
(`vllm_atom.quantize.smooth`): q . k is unchanged, so readers need not undo it.

With ``AtomConfig.kv_center_k``, every decoder layer i whose KV cache is INT4 (not in
``kv_skip_layers``) also has ``model.layers.{i}.self_attn.k_center``, float32 [kv_heads,
head_dim]: subtracted from each post-RoPE key (before the rotation of ``kv_rotate_k``) when it
is written to the INT4 cache (`vllm_atom.quantize.key_center`; `reference.fake_quantize_kv`).

Symbols: K input channels, N output channels, G = group_size (128), S = row shards
(``AtomConfig.row_shards`` for o_proj / down_proj, 1 for every other linear), Ks = K / S
the channels of one shard, Os = ``AtomConfig.outliers_for(Ks)`` its outlier count
(128 when Ks - 128 is a multiple of 128; e.g. Ks = 576 gives 64).

Reorder. ``reorder_index`` is a permutation in S contiguous chunks of Ks entries; chunk
s holds values in [0, Ks) relative to that chunk (shard-local). Slot j of shard s reads
input channel ``s*Ks + reorder_index[s*Ks + j]``. Channels are sorted by calibration
salience, ascending, so the last Os slots of each shard are its outliers. Slots
[0, Ks-Os) are the normal channels, grouped 128 at a time in slot order; slots
[Ks-Os, Ks) are the outliers. Each shard's tensors are stored one after the other
along the input dimension, so vLLM's row-parallel loader hands TP rank r exactly
shard r (TP size must equal S for o_proj / down_proj; column-parallel layers see
the whole K and always have S = 1).

Fused inputs. q/k/v_proj read the same input and share one reorder index and one
outlier set (the quantizer writes identical ``reorder_index`` tensors for the three);
gate_proj / up_proj likewise; o_proj and down_proj have their own.

Packing. ``qweight[n, j]`` holds weight slot 2j in its low nibble and slot 2j+1 in its
high nibble, each a two's-complement INT4 in [-8, 7] (`pack_int4` / `unpack_int4`).
The INT4 KV cache uses the same nibble order with unsigned values in [0, 15].

Numerics (`vllm_atom.reference` is the executable definition):
weight group scale = fp16(w_clip * absmax / 7) and q = clamp(round(w / scale), -8, 7);
outliers: scale = fp16(absmax / 127), q = clamp(round(w / scale), -128, 127).
Activations are quantized at run time per token with fp32 scales in the same way
(a_clip for the INT4 groups, no clip for the INT8 outliers).

Not quantized, stored as in the source model: embeddings, lm_head, norms, biases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from vllm_atom.config import AtomConfig

QWEIGHT = "qweight"
W_SCALE = "w_scale"
W_OUTLIER = "w_outlier"
W_OUTLIER_SCALE = "w_outlier_scale"
REORDER_INDEX = "reorder_index"
TENSOR_SUFFIXES = (QWEIGHT, W_SCALE, W_OUTLIER, W_OUTLIER_SCALE, REORDER_INDEX)

# Per decoder layer with kv_center_k: the key center, float32 [kv_heads, head_dim].
KEY_CENTER = "self_attn.k_center"

# Linear layers of Llama-family and Qwen2 decoders that Atom quantizes.
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Where they sit: decoder layer i is ``f"{LAYERS_PREFIX}.{i}"``, linear m inside it ``LINEAR_PATHS[m]``.
LAYERS_PREFIX = "model.layers"
LINEAR_PATHS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# Linears that read one shared input and therefore share reorder index and outliers.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Linears whose input is split across tensor-parallel ranks.
ROW_PARALLEL_LINEARS = ("o_proj", "down_proj")
# vLLM's names for the fused q/k/v and gate/up linears.
FUSED_LINEARS = ("qkv_proj", "gate_up_proj")
_LINEAR_RE = re.compile(r"(^|\.)(" + "|".join(QUANTIZED_LINEARS + FUSED_LINEARS) + r")$")


class CheckpointFormatError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape or dtype."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class LinearLayout:
    """Sizes of one quantized linear (one shard of it when ``shards > 1``).

    ``k`` and ``n`` are the full input and output sizes; ``k_shard = k // shards``,
    ``n_outliers`` is the outlier count of one shard, ``k_normal`` its INT4 channels.
    """

    k: int
    n: int
    shards: int
    k_shard: int
    n_outliers: int
    k_normal: int
    group_size: int

    @property
    def n_groups(self) -> int:
        """INT4 groups per shard."""
        return self.k_normal // self.group_size


def is_quantized_linear(module_name: str) -> bool:
    """True for the names of linears Atom quantizes (``...self_attn.q_proj``, and vLLM's
    fused ``qkv_proj`` / ``gate_up_proj``)."""
    return _LINEAR_RE.search(module_name) is not None


def is_row_parallel(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in ROW_PARALLEL_LINEARS


def linear_layout(k: int, n: int, cfg: AtomConfig, shards: int = 1) -> LinearLayout:
    """Sizes of a linear with ``k`` inputs and ``n`` outputs; raises ValueError if unsupported."""
    if k % shards:
        raise ValueError(f"input size {k} is not divisible by row_shards={shards}")
    ks = k // shards
    o = cfg.outliers_for(ks)
    return LinearLayout(k=k, n=n, shards=shards, k_shard=ks, n_outliers=o, k_normal=ks - o,
                        group_size=cfg.group_size)


def tensor_specs(layout: LinearLayout) -> dict[str, TensorSpec]:
    """Expected checkpoint tensors of one linear (all shards), keyed by suffix."""
    s, n = layout.shards, layout.n
    return {
        QWEIGHT: TensorSpec((n, s * layout.k_normal // 2), torch.uint8),
        W_SCALE: TensorSpec((n, s * layout.n_groups), torch.float16),
        W_OUTLIER: TensorSpec((n, s * layout.n_outliers), torch.int8),
        W_OUTLIER_SCALE: TensorSpec((n, s), torch.float16),
        REORDER_INDEX: TensorSpec((layout.k,), torch.int32),
    }


def check_linear_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], layout: LinearLayout) -> None:
    """Raise CheckpointFormatError naming the first tensor of ``prefix`` that is missing,
    mis-shaped, of the wrong dtype, or (reorder_index) not a shard-local permutation."""
    for suffix, spec in tensor_specs(layout).items():
        name = f"{prefix}.{suffix}"
        t = tensors.get(name)
        if t is None:
            raise CheckpointFormatError(f"{name}: missing; expected {_describe(spec)}")
        if tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
            raise CheckpointFormatError(
                f"{name}: expected {_describe(spec)}, got {_describe(TensorSpec(tuple(t.shape), t.dtype))}")
    check_reorder_index(f"{prefix}.{REORDER_INDEX}", tensors[f"{prefix}.{REORDER_INDEX}"], layout)


def check_key_center(name: str, t: torch.Tensor | None, kv_heads: int, head_dim: int) -> None:
    """CheckpointFormatError naming ``name`` unless t is float32 [kv_heads, head_dim] and finite."""
    if t is None:
        raise CheckpointFormatError(f"{name}: missing (the checkpoint has kv_center_k: every INT4-KV layer needs "
                                    f"float32 [{kv_heads}, {head_dim}])")
    if t.dtype != torch.float32 or tuple(t.shape) != (kv_heads, head_dim):
        raise CheckpointFormatError(f"{name}: expected float32 [{kv_heads}, {head_dim}], got "
                                    f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise CheckpointFormatError(f"{name}: not finite")


def check_reorder_index(name: str, index: torch.Tensor, layout: LinearLayout) -> None:
    """Each of the ``shards`` chunks of ``index`` must be a permutation of range(k_shard)."""
    chunks = index.detach().to("cpu", torch.int64).view(layout.shards, layout.k_shard)
    want = torch.arange(layout.k_shard)
    for s in range(layout.shards):
        if not torch.equal(chunks[s].sort().values, want):
            raise CheckpointFormatError(
                f"{name}: shard {s} is not a permutation of 0..{layout.k_shard - 1}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack INT4 values along the last dim: [..., K] (int, values in [-8, 15]) -> uint8 [..., K/2].

    Element 2j goes to the low nibble of byte j, element 2j+1 to the high nibble.
    Signed values are stored as two's complement nibbles, so both [-8, 7] and [0, 15] pack.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dim must be even, got {q.shape[-1]}")
    b = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return b[..., 0::2] | (b[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (or [0, 15] unsigned)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    if signed:
        out = out - ((out >= 8).to(torch.int8) << 4)
    return out


def pack_weight(q: torch.Tensor, scale: torch.Tensor, q_outlier: torch.Tensor,
                outlier_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """One shard's weights, unpacked (`reference.QuantizedWeight`: q int8 [N, Kn] in [-8, 7],
    scale fp16 [N, Kn/G], q_outlier int8 [N, O], outlier_scale fp16 [N]) -> its checkpoint
    tensors, keyed by suffix (``reorder_index`` is not included)."""
    return {QWEIGHT: pack_int4(q), W_SCALE: scale, W_OUTLIER: q_outlier,
            W_OUTLIER_SCALE: outlier_scale.reshape(-1, 1)}


def unpack_weight(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Inverse of `pack_weight`: (q, scale, q_outlier, outlier_scale) of one shard."""
    return (unpack_int4(tensors[QWEIGHT]), tensors[W_SCALE], tensors[W_OUTLIER],
            tensors[W_OUTLIER_SCALE].reshape(-1))


_SHARDED = (QWEIGHT, W_SCALE, W_OUTLIER, W_OUTLIER_SCALE)


def join_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-shard weight tensors (keyed by suffix) -> one linear's tensors, shard after
    shard along the input dimension (``reorder_index`` is not included)."""
    return {key: torch.cat([sh[key] for sh in shards], 1) for key in _SHARDED}


def split_shards(tensors: Mapping[str, torch.Tensor], layout: LinearLayout) -> list[dict[str, torch.Tensor]]:
    """Inverse of `join_shards` for a linear of ``layout`` (keys are suffixes)."""
    widths = {QWEIGHT: layout.k_normal // 2, W_SCALE: layout.n_groups,
              W_OUTLIER: layout.n_outliers, W_OUTLIER_SCALE: 1}
    return [{key: tensors[key][:, s * w:(s + 1) * w] for key, w in widths.items()}
            for s in range(layout.shards)]


def _describe(spec: TensorSpec) -> str:
    return f"{str(spec.dtype).replace('torch.', '')} {list(spec.shape)}"
