"""Atom quantization settings: what was chosen, and its `quantization_config` form.

This module is the one place where the offline quantizer and the vLLM runtime agree on
*what* a checkpoint holds. *How* it is laid out on disk is `vllm_atom.format`.
Imports: standard library only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

QUANT_METHOD = "atom"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclass(frozen=True)
class AtomConfig:
    """Atom W4A4 settings.

    Attributes:
        w_bits: weight bits of the normal (non-outlier) channels. Only 4.
        a_bits: activation bits of the normal channels (dynamic, per token). Only 4.
        group_size: channels per quantization group, for weights (per output row) and
            activations (per token), counted in reordered channel order. Only 128.
        n_outliers: target number of salient input channels kept in INT8 per linear
            input. A layer whose ``K - n_outliers`` is not a multiple of ``group_size``
            keeps fewer (see ``outliers_for``).
        outlier_bits: bits of the outlier channels (weights and activations). Only 8.
        a_clip: activation clip ratio: group scale = a_clip * absmax / 7.
        w_clip: weight clip ratio: group scale = w_clip * absmax / 7.
        kv_bits: 4 for Atom's INT4 KV cache, or None for a 16-bit cache.
        kv_smooth: exponent alpha of the key smoothing folded into q_proj/k_proj by the
            quantizer (each rotary channel pair of K divided by max|K|^alpha, Q multiplied
            by it; attention scores unchanged) so that per-token INT4 keys are not
            dominated by a few large channels. 0 = none (checkpoints that predate it).
            Informational: the runtime computes the same either way.
        kv_rotate_k: INT4 keys stored in a per-head Hadamard basis: each (token, head) key row is
            rotated after RoPE by the normalised Walsh-Hadamard matrix before it is quantized,
            and the query by the same matrix before QK^T (orthogonal, so q . k is unchanged);
            a large channel is spread over the whole head instead of stretching its token's
            INT4 range. V is not rotated. Runtime numerics: the cache write, the attention
            kernels and the simulation all follow it. Checkpoints that predate it: False.
        kv_center_k: INT4 keys stored minus a per-layer center, the calibration mean of the
            post-RoPE key of each (kv head, channel), tensor ``model.layers.{i}.self_attn.k_center``
            (`vllm_atom.format`): a constant taken from every key of a head adds the same
            -q . center to every logit of a query, which softmax removes, while the INT4 range no
            longer spans a channel's offset. The INT4 cache write subtracts it (`vllm serve`
            loads it into each attention layer, `vllm_atom.serve.kv_center`); the attention
            kernels do not change. Checkpoints that predate it: False.
        kv_skip_layers: decoder layers whose KV cache stays 16-bit when kv_bits is 4 (vLLM:
            ``--kv-cache-dtype-skip-layers``). For models whose keys carry huge biases in a
            few layers (Qwen2.5: layers 0 and 1), where per-token INT4 keys fail.
        row_shards: tensor-parallel shard count the row-parallel layers (o_proj,
            down_proj) were reordered for; each shard has its own reorder and outliers.
        rotation: the seed of the residual-stream rotation the quantizer folded into the weights
            (``vllm-atom quantize --rotate``, `vllm_atom.quantize.rotate`), or None. Informational:
            the checkpoint's embeddings, norms and lm_head are the rotated ones, so it runs as is.
        value_rotation: the seed of the per-head value rotation the quantizer folded into v_proj
            and o_proj (``vllm-atom quantize --rotate-values``, `vllm_atom.quantize.rotate.rotate_values`),
            or None. Informational: the stored weights are the rotated ones, so it runs as is.
        format_version: on-disk format version (see `vllm_atom.format`).
    """

    w_bits: int = 4
    a_bits: int = 4
    group_size: int = 128
    n_outliers: int = 128
    outlier_bits: int = 8
    a_clip: float = 0.9
    w_clip: float = 0.85
    kv_bits: int | None = 4
    kv_smooth: float = 0.5
    kv_rotate_k: bool = True
    kv_center_k: bool = False
    kv_skip_layers: tuple[int, ...] = ()
    row_shards: int = 1
    rotation: int | None = None
    value_rotation: int | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check(self.w_bits == 4, "w_bits", self.w_bits, "4")
        _check(self.a_bits == 4, "a_bits", self.a_bits, "4")
        _check(self.group_size == 128, "group_size", self.group_size, "128")
        _check(_is_int(self.n_outliers) and 0 <= self.n_outliers and self.n_outliers % 16 == 0,
               "n_outliers", self.n_outliers, "a non-negative multiple of 16")
        _check(self.outlier_bits == 8, "outlier_bits", self.outlier_bits, "8")
        for name in ("a_clip", "w_clip"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0,
                   name, v, "a number in (0, 1]")
        _check(self.kv_bits in (4, None), "kv_bits", self.kv_bits, "4 or null")
        _check(isinstance(self.kv_smooth, (int, float)) and not isinstance(self.kv_smooth, bool)
               and 0.0 <= self.kv_smooth <= 1.0, "kv_smooth", self.kv_smooth, "a number in [0, 1]")
        _check(isinstance(self.kv_rotate_k, bool), "kv_rotate_k", self.kv_rotate_k, "true or false")
        _check(isinstance(self.kv_center_k, bool) and (not self.kv_center_k or self.kv_bits == 4), "kv_center_k",
               self.kv_center_k, "true or false (true only with kv_bits 4)")
        skip = self.kv_skip_layers
        _check(isinstance(skip, (list, tuple)) and all(_is_int(i) and i >= 0 for i in skip),
               "kv_skip_layers", skip, "a list of layer indices")
        object.__setattr__(self, "kv_skip_layers", tuple(sorted(set(skip))))
        _check(_is_int(self.row_shards) and self.row_shards >= 1, "row_shards", self.row_shards,
               "a positive integer")
        _check(self.rotation is None or (_is_int(self.rotation) and self.rotation >= 0), "rotation",
               self.rotation, "null or a non-negative integer seed")
        _check(self.value_rotation is None or (_is_int(self.value_rotation) and self.value_rotation >= 0),
               "value_rotation", self.value_rotation, "null or a non-negative integer seed")
        _check(self.format_version in SUPPORTED_FORMAT_VERSIONS, "format_version",
               self.format_version, f"one of {SUPPORTED_FORMAT_VERSIONS}")

    def outliers_for(self, k: int) -> int:
        """Outlier channels kept for a linear input of ``k`` channels.

        The largest ``o <= n_outliers`` with ``(k - o) % group_size == 0``; e.g. with
        n_outliers=128: k=4096 -> 128, k=576 -> 64, k=1536 -> 128.
        """
        g = self.group_size
        o = self.n_outliers - ((self.n_outliers - k) % g)
        if k <= 0 or o < 0 or k - o <= 0:
            raise ValueError(
                f"input size {k} cannot hold {self.n_outliers} outliers plus at least one group "
                f"of {g}: need k >= {self.n_outliers % g + g} and (k - outliers) % {g} == 0")
        return o

    def kv_bits_for(self, layer: int) -> int | None:
        """KV cache bits of decoder layer ``layer`` (None = 16-bit)."""
        return None if layer in self.kv_skip_layers else self.kv_bits

    def to_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        d = {"quant_method": QUANT_METHOD}
        d.update(dataclasses.asdict(self))
        d["kv_skip_layers"] = list(self.kv_skip_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AtomConfig":
        """Inverse of `to_dict`. Unknown keys and wrong values raise ValueError naming the field."""
        if not isinstance(d, Mapping):
            raise ValueError(f"quantization_config must be a mapping, got {type(d).__name__}")
        method = d.get("quant_method", QUANT_METHOD)
        if str(method).lower() != QUANT_METHOD:
            raise ValueError(f"quantization_config.quant_method: expected '{QUANT_METHOD}', got {method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"quant_method"})
        if unknown:
            raise ValueError(f"quantization_config: unknown field(s) {unknown}; known: {sorted(known)}")
        if "format_version" not in d:
            raise ValueError("quantization_config.format_version is missing; "
                             f"this vllm-atom reads {SUPPORTED_FORMAT_VERSIONS}")
        fields = {k: v for k, v in d.items() if k in known}
        fields.setdefault("kv_smooth", 0.0)  # written before key smoothing existed
        fields.setdefault("kv_rotate_k", False)  # written before the key rotation existed
        fields.setdefault("kv_center_k", False)  # written before the key centering existed
        return cls(**fields)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"AtomConfig.{field}: expected {expected}, got {value!r}")
