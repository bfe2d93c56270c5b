"""Offline Atom quantizer (torch + transformers + safetensors; never imports vllm or cupy).

Path through the code: `pipeline.quantize` -> `calibration` -> `reorder` -> `gptq`
-> `vllm_atom.format` packing -> `vllm_atom.checkpoint.CheckpointWriter`; the layers run
simulated (`vllm_atom.simulate`, shared with `vllm_atom.evaluate`).
"""

from vllm_atom.quantize.pipeline import InputError, QuantizeOptions, QuantizeReport, quantize

__all__ = ["InputError", "QuantizeOptions", "QuantizeReport", "quantize"]
