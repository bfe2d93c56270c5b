"""`AtomQuantConfig`: the ``atom`` quantization method as vLLM sees it.

Importing this module registers the method with vLLM (``@register_quantization_config``),
so a spawned engine or worker process that unpickles an `AtomQuantConfig` has it
registered even before its own plugin loading runs.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.models.utils import WeightsMapper

from vllm_atom.config import QUANT_METHOD, AtomConfig
from vllm_atom.format import is_quantized_linear


logger = init_logger(__name__)

_KV_SWITCH = ("--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM (in Python: "
              "LLM(..., kv_cache_dtype='int4_per_token_head', attention_backend='CUSTOM'))")
_KV_OFF = (
    "This Atom checkpoint was quantized for an INT4 KV cache (kv_bits=4), but the KV cache is "
    "{dtype} with the {backend} attention backend. To serve Atom's INT4 KV cache (3.8x the tokens "
    "of bf16) add " + _KV_SWITCH + ".")
_KV_INTREE = (
    "--kv-cache-dtype int4_per_token_head without --attention-backend CUSTOM runs vLLM's own INT4 "
    "format (Hadamard-rotated, integer zero point), not Atom's. For Atom's numerics use " + _KV_SWITCH + ".")

_KV_SKIP = (
    "This Atom checkpoint keeps the KV cache of layers {layers} in 16 bit (kv_skip_layers: their keys "
    "do not survive per-token INT4), but they run with INT4 here. Add --kv-cache-dtype-skip-layers "
    "{layers} (in Python: kv_cache_dtype_skip_layers=[...]).")

_NOT_ATOM = (
    "--quantization atom needs an Atom checkpoint, but {model} has no "
    "quantization_config with quant_method 'atom' in its config.json. Create one with "
    "`vllm-atom quantize MODEL_DIR OUT_DIR --calib-text FILE` and serve OUT_DIR.")


@register_quantization_config(QUANT_METHOD)
class AtomQuantConfig(QuantizationConfig):
    """Wraps an `AtomConfig` read from config.json's ``quantization_config``."""

    def __init__(self, atom: AtomConfig | None = None) -> None:
        super().__init__()
        self.atom = atom if atom is not None else AtomConfig()
        self._from_checkpoint = atom is not None

    def __repr__(self) -> str:
        return f"AtomQuantConfig({self.atom})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # sm_80 / sm_89: native INT4 mma; sm_90: INT4 unpacked to INT8 mma

    @staticmethod
    def get_config_filenames() -> list[str]:
        # Empty: vLLM then reads config.json's quantization_config, or, when the
        # checkpoint has none, calls AtomQuantConfig() -> get_quant_method explains.
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AtomQuantConfig":
        return cls(AtomConfig.from_dict(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        # vLLM builds AtomQuantConfig() with no arguments when the user asked for
        # --quantization atom on a model whose config.json has no quantization_config.
        if not self._from_checkpoint:
            raise ValueError(_NOT_ATOM.format(model=model_name))

    def get_cache_scale_mapper(self) -> WeightsMapper:
        mapper = super().get_cache_scale_mapper()
        if self.atom.kv_center_k:
            from vllm_atom.serve.kv_center import CHECKPOINT_TO_VLLM

            mapper = mapper | CHECKPOINT_TO_VLLM
        return mapper

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, Attention):
            self._check_kv_cache(layer)
            from vllm.model_executor.models.utils import extract_layer_index

            if self.atom.kv_center_k and self.atom.kv_bits_for(extract_layer_index(layer.layer_name)) == 4:
                from vllm_atom.serve.kv_center import AtomKVCenterMethod

                return AtomKVCenterMethod(self)  # (the checkpoint has k_center for its INT4-KV layers only)
            return None
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head and attention stay 16-bit here
        if not self._from_checkpoint:
            raise ValueError(_NOT_ATOM.format(model="this model"))
        if not is_quantized_linear(prefix):
            return UnquantizedLinearMethod()
        from vllm_atom.serve import fusion
        from vllm_atom.serve.linear import AtomLinearMethod

        fusion.install(get_current_vllm_config_or_none())  # before vLLM builds the model's compile backend
        return AtomLinearMethod(self.atom)

    def _check_kv_cache(self, layer: Attention) -> None:
        """Tell the user how to get Atom's INT4 KV cache when it is not what runs."""
        from vllm.model_executor.models.utils import extract_layer_index

        dtype, backend = layer.kv_cache_dtype, layer.attn_backend.get_name()
        skip = self.atom.kv_skip_layers
        skipped = bool(skip) and extract_layer_index(layer.layer_name) in skip
        if dtype == "int4_per_token_head" and backend != "CUSTOM":
            logger.warning_once(_KV_INTREE)
        elif self.atom.kv_bits == 4 and skipped and dtype == "int4_per_token_head":
            logger.warning_once(_KV_SKIP.format(layers=" ".join(map(str, skip))))
        elif self.atom.kv_bits == 4 and not skipped and dtype != "int4_per_token_head":
            logger.warning_once(_KV_OFF.format(dtype=dtype, backend=backend))
