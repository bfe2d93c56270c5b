"""Atom W4A4 quantization for vLLM.

Offline: `vllm_atom.quantize` (CLI ``vllm-atom quantize``). Online: the ``atom``
quantization method registered by `vllm_atom.plugin.register`. The two meet in
`vllm_atom.config` and `vllm_atom.format`; `vllm_atom.reference` defines the numerics.
This module imports neither vllm nor cupy.
"""

from vllm_atom.config import AtomConfig

__version__ = "0.1.0"
__all__ = ["AtomConfig", "__version__"]
