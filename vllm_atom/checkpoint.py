"""Write and read Atom checkpoints (`vllm_atom.format`): safetensors + config.json.

`CheckpointWriter` streams tensors into safetensors shards of at most ``max_shard_bytes``
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` when more than one), then writes config.json with
``quantization_config`` and copies the tokenizer and generation files of the source.
The quantizer writes with it; `is_atom_checkpoint` and `load_checkpoint` read for the
evaluation and the tests (vLLM reads checkpoints with its own loaders).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_atom.config import AtomConfig

# Files of a source model directory copied into the checkpoint (tokenizer, generation).
_SIDE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges",
                  "chat_template", "generation_config")
_SIDE_SUFFIXES = (".model", ".tiktoken")


class CheckpointWriter:
    def __init__(self, out_dir, max_shard_bytes: int = 2 << 30):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for old in list(self.out.glob("*.safetensors")) + list(self.out.glob("*.safetensors.index.json")):
            old.unlink()
        self.max_shard_bytes = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        t = t.detach().to("cpu").contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buf[name] = t
        self._buf_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def _flush(self) -> None:
        if not self._buf:
            return
        path = self.out / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(path), metadata={"format": "pt"})
        self._shards.append((path, sorted(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self, hf_config: dict, cfg: AtomConfig, source_dir=None) -> Path:
        """Write the last shard, rename shards, write the index, config.json, tokenizer files."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.out / "model.safetensors")
        else:
            weight_map = {}
            for i, (path, names) in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                path.rename(self.out / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(hf_config)
        config["quantization_config"] = cfg.to_dict()
        (self.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if source_dir is not None:
            copy_side_files(source_dir, self.out)
        return self.out


def copy_side_files(src, dst) -> None:
    """Copy the tokenizer files, chat template and generation config of ``src``."""
    for f in Path(src).iterdir():
        if f.is_file() and (f.name.startswith(_SIDE_PREFIXES) or f.name.endswith(_SIDE_SUFFIXES)):
            shutil.copy2(f, Path(dst) / f.name)


def is_atom_checkpoint(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    return str(q.get("quant_method", "")).lower() == "atom"


def load_checkpoint(path) -> tuple[AtomConfig, dict, dict[str, torch.Tensor]]:
    """(AtomConfig, config.json dict, all tensors on CPU) of an Atom checkpoint."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"{path}: config.json has no quantization_config; not an Atom checkpoint")
    cfg = AtomConfig.from_dict(config["quantization_config"])
    tensors = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return cfg, config, tensors
