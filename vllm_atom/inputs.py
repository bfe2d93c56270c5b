"""Checks of the files a command reads, before any long work (standard library only).

Each failure is an `InputError` whose one-line message names the file and what is wrong
with it: a model directory that does not exist, a config.json that is not JSON, a
safetensors file shorter than its own header says (a truncated download or copy).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class InputError(ValueError):
    """Bad command input, detected before any long work."""


def read_model_config(model_dir, what: str = "model directory") -> dict:
    """config.json of ``model_dir`` as a dict, after checking that the directory, its
    config.json and its weight files (every ``*.safetensors`` header) are readable."""
    d = Path(model_dir)
    if not d.exists():
        raise InputError(f"{d}: no such {what}")
    if not d.is_dir():
        raise InputError(f"{d}: not a {what} (a file, not a directory)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{d}: not a model directory (no config.json)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    files = sorted(d.glob("*.safetensors"))
    if not files and not list(d.glob("*.bin")):
        raise InputError(f"{d}: no weight files (*.safetensors / *.bin)")
    for f in files:
        check_safetensors(f)
    return config


def check_supported(model_dir, config: dict) -> None:
    """InputError unless config.json describes a decoder Atom can quantize."""
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = f" ({', '.join(archs)})" if archs else ""
        raise InputError(f"{model_dir}: model_type {model_type!r}{arch} is not supported; "
                         f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise InputError(f"{model_dir}: architectures {archs} has no *ForCausalLM head; Atom "
                         f"quantizes causal language models")


def check_safetensors(path) -> None:
    """InputError unless ``path`` is a whole safetensors file: an 8-byte header length,
    a JSON header, and as many data bytes as the header's largest tensor offset."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{p}: not a safetensors file ({size} bytes, shorter than the "
                                 f"8-byte header length); truncated?")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise InputError(f"{p}: truncated or not a safetensors file: header of {n} bytes "
                                 f"announced, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{p}: cannot be read: {e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a safetensors file (its header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise InputError(f"{p}: not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(t["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise InputError(f"{p}: not a safetensors file (tensor {name!r} has no data_offsets)") \
                from None
    if 8 + n + end > size:
        raise InputError(f"{p}: truncated: {size} bytes, its header describes "
                         f"{8 + n + end} (copy or download it again)")
