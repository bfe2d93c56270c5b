"""Atom's INT4 KV cache as a vLLM attention backend (``AttentionBackendEnum.CUSTOM``).

Turned on with ``--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM``. vLLM then
allocates its ``int4_per_token_head`` page budget (D/2 + 4 bytes per token and head, for K and
for V); this backend fills each record with Atom's numerics (asymmetric INT4, fp16 scale and
zero, quantized after RoPE when vLLM writes the cache) and attends over it with the kernels
of `vllm_atom.kernels.kv_int4`. Prefill reads the pages it has just written, so prompt tokens
see the same quantized K/V as later decode steps (and as ``vllm-atom eval``'s KV4 simulation).

It subclasses vLLM's Triton backend for everything else (cache shape, metadata), with:
  * the cache in HND order (a (block, head) tile is contiguous);
  * full CUDA graphs for uniform single-token decode batches only (the split-K grid depends on
    the batch size alone there); mixed batches run piecewise;
  * decoder self-attention without sliding window, ALiBi, soft cap or sinks; head size 64/128;
  * layers that ``--kv-cache-dtype-skip-layers`` keeps 16-bit (kv_cache_dtype "auto") run the
    Triton backend's own cache write and attention;
  * keys stored Hadamard-rotated (and queries rotated to match) when the model is an Atom
    checkpoint with ``kv_rotate_k`` (`vllm_atom.config.AtomConfig`); otherwise unrotated.
See docs/kv_int4_design.md for the vLLM 0.26 details this relies on.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadata,
    TritonAttentionMetadataBuilder,
)

from vllm_atom.kernels import kv_int4

logger = init_logger(__name__)

KV_CACHE_DTYPE = "int4_per_token_head"


def _rotate_k_of_current_model() -> bool:
    """``AtomConfig.kv_rotate_k`` of the Atom checkpoint being served; False for other models."""
    from vllm.config import get_current_vllm_config

    from vllm_atom.serve.config import AtomQuantConfig

    quant = get_current_vllm_config().quant_config
    return isinstance(quant, AtomQuantConfig) and quant.atom.kv_rotate_k


def _compile_for_current_model(head_size: int, rotate_k: bool) -> None:
    """Compile the kernels for the model being built now, before any CUDA-graph capture."""
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    dtype = model_config.dtype if model_config is not None else None
    if torch.cuda.is_available() and dtype in (torch.float16, torch.bfloat16):
        kv_int4.prepare(head_size, dtype, torch.device("cuda", torch.cuda.current_device()), rotate_k)


class AtomInt4MetadataBuilder(TritonAttentionMetadataBuilder):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


class AtomInt4AttentionBackend(TritonAttentionBackend):
    # "auto": layers kept 16-bit by --kv-cache-dtype-skip-layers run vLLM's Triton attention
    supported_kv_cache_dtypes: ClassVar[list] = [KV_CACHE_DTYPE, "auto"]
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["AtomInt4AttentionImpl"]:
        return AtomInt4AttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AtomInt4MetadataBuilder]:
        return AtomInt4MetadataBuilder

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # HND: memory order [num_blocks, (layers,) H, block, record], logical (num_blocks, H, block, record).
        return (1, 2, 0, 3, 4) if include_num_layers_dimension else (0, 1, 2, 3)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in kv_int4.HEAD_DIMS

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class AtomInt4AttentionImpl(TritonAttentionImpl):
    """Cache write and attention through `vllm_atom.kernels.kv_int4`."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: AttentionType = AttentionType.DECODER,
                 kv_sharing_target_layer_name: int | None = None, sinks: torch.Tensor | None = None,
                 use_alibi_sqrt: bool = False, chunk_lookback: int = -1) -> None:
        self.atom_int4 = kv_cache_dtype == KV_CACHE_DTYPE  # else a 16-bit skip layer: Triton's path
        unsupported = {
            f"kv_cache_dtype {kv_cache_dtype!r} (needs {KV_CACHE_DTYPE!r}, or 'auto' for layers in "
            f"--kv-cache-dtype-skip-layers)": kv_cache_dtype not in (KV_CACHE_DTYPE, "auto"),
            f"head size {head_size} (supported: {kv_int4.HEAD_DIMS})": head_size not in kv_int4.HEAD_DIMS,
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "chunked local attention": chunk_lookback not in (-1, None),
        }
        bad = [what for what, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError("The Atom INT4 KV cache backend (--attention-backend CUSTOM) does not support "
                             + ", ".join(bad))
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                         kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
                         use_alibi_sqrt, chunk_lookback)
        self.supports_quant_query_input = False
        self.rotate_k = self.atom_int4 and _rotate_k_of_current_model()
        if self.atom_int4:
            _compile_for_current_model(head_size, self.rotate_k)
            logger.info_once("Atom INT4 KV cache attention is active (per token and head, fp16 scale and zero%s)."
                             % (", keys Hadamard-rotated" if self.rotate_k else ""))

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if not self.atom_int4:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        kv_int4.write_kv_int4(key, value, kv_cache, slot_mapping, self.rotate_k, getattr(layer, "k_center", None))

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TritonAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.atom_int4:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("The Atom INT4 KV cache backend does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        kv_int4.attention_int4(query[:n], kv_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                               attn_metadata.block_table, attn_metadata.max_query_len, self.scale,
                               out=output[:n], rotate_k=self.rotate_k)
        return output
