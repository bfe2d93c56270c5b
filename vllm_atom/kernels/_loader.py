"""Compile and launch the CUDA sources in ``cuda/`` with NVRTC (through CuPy's bindings).

The one module that knows where the sources are (`CUDA_DIR`: ``cuda/`` in a source tree,
``vllm_atom/_cuda`` in an installed wheel; setup.py maps one to the other). A kernel is named
by (file, defines, arch). Its cubin is compiled once, then kept on disk (`cache_dir`) under a
hash of everything that goes into it, so later processes (vLLM workers, TP ranks, restarts)
load it without compiling; each process also keeps it in memory, and loads its module once
per device. Launches go on torch's current stream with tensors passed as raw pointers, so they
are CUDA-graph safe once compiled. Compiling needs no GPU (the CI uses `compile_cubin` for
sm_80/sm_89/sm_90).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from cupy_backends.cuda.libs import nvrtc

log = logging.getLogger(__name__)

CACHE_ENV = "VLLM_ATOM_KERNEL_CACHE"
PDL_ENV = "VLLM_ATOM_PDL"  # the level of programmatic dependent launch, "0" none (see `launch`)
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _find_cuda_dir() -> Path:
    """``vllm_atom/_cuda`` when installed from a wheel or ``pip install .``, else ``cuda/`` beside
    the package (source tree: editable install, PYTHONPATH). Paths from this file, not
    importlib: a PYTHONPATH checkout has no ``vllm_atom._cuda`` package, and setuptools'
    editable finder would map one to the tree it was installed from."""
    package = Path(__file__).resolve().parents[1]
    for d in (package / "_cuda", package.parent / "cuda"):
        if any(d.glob("*.cu")):
            return d
    raise FileNotFoundError(f"no CUDA kernel sources (*.cu) in {package / '_cuda'} or {package.parent / 'cuda'}")


CUDA_DIR = _find_cuda_dir()


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log."""


def sources() -> list[str]:
    """The kernel sources, by file name (every ``*.cu`` in `CUDA_DIR`)."""
    return sorted(p.name for p in CUDA_DIR.glob("*.cu"))


def cache_dir() -> Path:
    """Where cubins are kept: ``$VLLM_ATOM_KERNEL_CACHE``, else ``~/.cache/vllm-atom/kernels``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/vllm-atom/kernels").expanduser()


def _local_headers(file: str) -> list[Path]:
    """The ``#include "..."`` files of ``file`` found in `CUDA_DIR`, recursively (each once)."""
    seen: list[Path] = []
    todo = [CUDA_DIR / file]
    while todo:
        for name in _INCLUDE_RE.findall(todo.pop().read_text()):
            h = CUDA_DIR / name
            if h.is_file() and h not in seen:
                seen.append(h)
                todo.append(h)
    return sorted(seen)


_FLAGS = ("-std=c++17", "-lineinfo")


def _cache_path(file: str, defines: tuple[tuple[str, int], ...], arch: str) -> Path:
    """``<stem>-<arch>-<key>.cubin``; key: sha256 of the source and its local headers (by
    content, wherever `CUDA_DIR` is), the flags, defines and arch, and the NVRTC version."""
    h = hashlib.sha256(repr((file, arch, defines, _FLAGS, nvrtc.getVersion())).encode())
    for path in [CUDA_DIR / file] + _local_headers(file):
        h.update(str(path.relative_to(CUDA_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return cache_dir() / f"{Path(file).stem}-{arch}-{h.hexdigest()[:32]}.cubin"


def _read_cached(path: Path) -> bytes | None:
    """The cubin stored at ``path`` (sha256 of the cubin, then the cubin), or None if absent or
    damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, cubin = data[:32], data[32:]
    return cubin if cubin and hashlib.sha256(cubin).digest() == digest else None


def _write_cached(path: Path, cubin: bytes) -> None:
    """Atomically: a temp file in the same directory, renamed over ``path``, so concurrent
    processes read either nothing or a whole file (the last writer wins; all write the same)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(cubin).digest() + cubin)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log.warning("vllm-atom: cannot cache kernel %s (%s); set %s to a writable directory", path, e, CACHE_ENV)


def _nvrtc_compile(file: str, defines: tuple[tuple[str, int], ...], arch: str) -> bytes:
    opts = [f"-arch={arch}", *_FLAGS, f"--include-path={CUDA_DIR}"] + [f"-D{k}={v}" for k, v in defines]
    prog = nvrtc.createProgram((CUDA_DIR / file).read_text(), file, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(opts))
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(f"{file} {arch} {dict(defines)}:\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def compile_cubin(file: str, defines: tuple[tuple[str, int], ...], arch: str) -> bytes:
    """cubin of ``cuda/<file>`` for ``arch`` (e.g. "sm_90") with ``-D`` defines, from the disk
    cache when it holds one for exactly these inputs, else compiled and stored there."""
    path = _cache_path(file, defines, arch)
    cubin = _read_cached(path)
    if cubin is None:
        cubin = _nvrtc_compile(file, defines, arch)
        _write_cached(path, cubin)
    return cubin


def device_arch(device) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    # sm_90a: Hopper's wgmma / setmaxnreg; such a cubin runs on compute capability 9.0 only.
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


@functools.cache
def kernel(file: str, name: str, defines: tuple[tuple[str, int], ...], device_index: int):
    """A loaded CuPy function, allowed all the dynamic shared memory the device has."""
    import cupy
    import torch
    from cupy_backends.cuda.api import driver

    with cupy.cuda.Device(device_index):
        mod = cupy.cuda.function.Module()
        mod.load(compile_cubin(file, defines, device_arch(device_index)))
        fn = mod.get_function(name)
        static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn.ptr)
        optin = torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
        driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin - static)
    return fn


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig of the CUDA driver API
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        name = ctypes.c_char_p()
        _libcuda().cuGetErrorName(rc, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {name.value.decode() if name.value else rc}")


def max_active_clusters(fn, grid: tuple[int, int, int], block: int, smem: int, device_index: int) -> int:
    """How many clusters of a kernel compiled with __cluster_dims__ can be resident at once
    (cuOccupancyMaxActiveClusters): GPCs, not SMs, bound a cluster launch."""
    import cupy

    cfg = _LaunchConfig(*grid, block, 1, 1, smem, None, None, 0)
    n = ctypes.c_int(0)
    with cupy.cuda.Device(device_index):
        _check(_libcuda().cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(fn.ptr), ctypes.byref(cfg)),
               "cuOccupancyMaxActiveClusters")
    return n.value


@functools.cache
def _stream(ptr: int, device_index: int):
    import warnings

    import cupy

    with warnings.catch_warnings():  # deprecated in CuPy 14 in favour of a protocol torch lacks here
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


def launch(fn, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int, device_index: int,
           dependent: int = 0) -> None:
    """Launch on torch's current stream. ``args``: ints are pointers unless given as np.int32/np.float32.

    ``dependent`` > 0: a programmatic dependent launch (`cuLaunchKernelEx` with programmatic stream
    serialization; kept in CUDA graphs) when VLLM_ATOM_PDL (default 1) is at least ``dependent``:
    the kernel may start while the kernel before it on the stream still runs, once that one has
    executed `griddepcontrol.launch_dependents` (or exited), and must itself execute
    `griddepcontrol.wait` before touching that kernel's output. Levels: 1 the sm90 GEMM after its
    quantization, 2 also the quantization after a GEMM; 0 none."""
    import torch

    stream = torch.cuda.current_stream(device_index).cuda_stream
    if 0 < dependent <= pdl_level():
        return _launch_dependent(fn, grid, block, args, smem, stream)
    fn(grid, block, tuple(np.uint64(a) if isinstance(a, int) else a for a in args),
       shared_mem=smem, stream=_stream(stream, device_index))


def pdl_level() -> int:
    """VLLM_ATOM_PDL as an integer (default 1; see `launch`)."""
    value = os.environ.get(PDL_ENV, "1")
    if not value.isdigit():
        raise ValueError(f"{PDL_ENV} must be 0, 1 or 2, got {value!r}")
    return int(value)


def _launch_dependent(fn, grid, block, args, smem: int, stream: int) -> None:
    for a in args:
        if not isinstance(a, (int, np.int32, np.float32)):
            raise TypeError(f"kernel argument of type {type(a).__name__}: expected int, np.int32 or np.float32")
    values = [ctypes.c_uint64(a) if isinstance(a, int) else
              ctypes.c_int32(int(a)) if isinstance(a, np.int32) else ctypes.c_float(float(a)) for a in args]
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attr = _LaunchAttribute(_ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1  # programmaticStreamSerializationAllowed
    cfg = _LaunchConfig(*grid, *block, smem, ctypes.c_void_p(stream), ctypes.cast(ctypes.pointer(attr), ctypes.c_void_p),
                        1)
    _check(_libcuda().cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(fn.ptr), params, None), "cuLaunchKernelEx")
