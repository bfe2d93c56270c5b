"""The on-disk cubin cache of `vllm_atom.kernels._loader`: a second process loads what the
first compiled without calling NVRTC; the key follows sources, headers, defines and arch but
not where the sources sit; damaged files are recompiled; concurrent writers are harmless."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.kernels import _loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ACT = ("act_quant.cu", (("DTYPE_BF16", 1),), "sm_90")
TINY = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n'

# Prints the sha256 of a cubin from compile_cubin; argv: file, arch, cuda dir or "", "no-nvrtc".
SCRIPT = """
import hashlib, sys
from pathlib import Path
from cupy_backends.cuda.libs import nvrtc
from vllm_atom.kernels import _loader
file, arch, cuda_dir, mode = sys.argv[1:]
if cuda_dir:
    _loader.CUDA_DIR = Path(cuda_dir)
if mode == "no-nvrtc":
    def refuse(*args):
        raise AssertionError("NVRTC called")
    nvrtc.createProgram = nvrtc.compileProgram = refuse
defines = (("DTYPE_BF16", 1),) if file == "act_quant.cu" else ()
print(hashlib.sha256(_loader.compile_cubin(file, defines, arch)).hexdigest())
"""


def run(cache: Path, file: str, arch: str, cuda_dir: str = "", mode: str = "") -> subprocess.Popen:
    env = dict(os.environ, VLLM_ATOM_KERNEL_CACHE=str(cache), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, file, arch, cuda_dir, mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.strip()


def test_second_process_loads_from_cache(tmp_path):
    first = output(run(tmp_path, ACT[0], ACT[2]))
    assert len(list(tmp_path.glob("act_quant-sm_90-*.cubin"))) == 1
    assert output(run(tmp_path, ACT[0], ACT[2], mode="no-nvrtc")) == first


def test_key_follows_inputs_not_location(tmp_path, monkeypatch):
    monkeypatch.setenv(_loader.CACHE_ENV, str(tmp_path / "cache"))
    base = _loader._cache_path(*ACT)
    assert base.parent == tmp_path / "cache" and base.name.startswith("act_quant-sm_90-")
    assert _loader._cache_path(ACT[0], (("DTYPE_BF16", 0),), ACT[2]) != base
    assert _loader._cache_path(ACT[0], ACT[1], "sm_80") != base
    copy = tmp_path / "copy"
    shutil.copytree(_loader.CUDA_DIR, copy)
    monkeypatch.setattr(_loader, "CUDA_DIR", copy)
    assert _loader._cache_path(*ACT) == base  # installed wheel and source tree share the cache
    with open(copy / "common.cuh", "a") as f:  # an included header
        f.write("// changed\n")
    assert _loader._cache_path(*ACT) != base


def test_damaged_cache_file_is_recompiled(tmp_path, monkeypatch):
    monkeypatch.setenv(_loader.CACHE_ENV, str(tmp_path))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.cu").write_text(TINY)
    monkeypatch.setattr(_loader, "CUDA_DIR", tmp_path / "src")
    compiles = []
    nvrtc_compile = _loader._nvrtc_compile
    monkeypatch.setattr(_loader, "_nvrtc_compile", lambda *a: compiles.append(a) or nvrtc_compile(*a))
    compile_cubin = _loader.compile_cubin.__wrapped__  # without the per-process cache
    cubin = compile_cubin("tiny.cu", (), "sm_90")
    path = _loader._cache_path("tiny.cu", (), "sm_90")
    assert compile_cubin("tiny.cu", (), "sm_90") == cubin and len(compiles) == 1
    for damaged in (path.read_bytes()[:-100], b"", b"\0" * 32 + cubin):  # truncated, empty, wrong digest
        path.write_bytes(damaged)
        assert compile_cubin("tiny.cu", (), "sm_90") == cubin
        assert path.read_bytes()[32:] == cubin
    assert len(compiles) == 4


def test_processes_starting_at_once(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.cu").write_text(TINY)
    cache = tmp_path / "cache"
    procs = [run(cache, "tiny.cu", "sm_90", str(tmp_path / "src")) for _ in range(4)]
    digests = {output(p) for p in procs}
    assert len(digests) == 1
    (path,) = cache.iterdir()  # one cubin, no temp files left
    assert hashlib.sha256(path.read_bytes()[32:]).hexdigest() in digests
