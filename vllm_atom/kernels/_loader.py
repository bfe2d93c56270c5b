"""Compile and launch the CUDA sources in ``cuda/`` with NVRTC (through CuPy's bindings).

The one module that knows where the sources are. A kernel is named by (file, defines, arch);
its cubin is compiled once per process and its module loaded once per device. Launches go on
torch's current stream with tensors passed as raw pointers, so they are CUDA-graph safe once
compiled. Compiling needs no GPU (the CI uses `compile_cubin` for sm_80/sm_89/sm_90).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
from cupy_backends.cuda.libs import nvrtc

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
SOURCES = ("act_quant.cu", "w4a4_gemm.cu", "w4a4_sm90.cu", "kv_int4.cu")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log."""


@functools.cache
def compile_cubin(file: str, defines: tuple[tuple[str, int], ...], arch: str) -> bytes:
    """cubin of ``cuda/<file>`` for ``arch`` (e.g. "sm_90a") with ``-D`` defines."""
    src = (CUDA_DIR / file).read_text()
    opts = [f"-arch={arch}", "-std=c++17", f"--include-path={CUDA_DIR}", "-lineinfo"]
    opts += [f"-D{k}={v}" for k, v in defines]
    prog = nvrtc.createProgram(src, file, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, tuple(opts))
        except nvrtc.NVRTCError as e:
            raise KernelCompileError(f"{file} {arch} {dict(defines)}:\n{nvrtc.getProgramLog(prog)}") from e
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


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


def max_active_clusters(fn, grid: tuple[int, int, int], block: int, smem: int, device_index: int) -> int:
    """How many clusters of a kernel compiled with __cluster_dims__ can be resident at once
    (cuOccupancyMaxActiveClusters): GPCs, not SMs, bound a cluster launch."""
    import cupy

    cuda = ctypes.CDLL("libcuda.so.1")
    cfg = _LaunchConfig(*grid, block, 1, 1, smem, None, None, 0)
    n = ctypes.c_int(0)
    with cupy.cuda.Device(device_index):
        rc = cuda.cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(fn.ptr), ctypes.byref(cfg))
    if rc != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed with CUresult {rc}")
    return n.value


@functools.cache
def _stream(ptr: int, device_index: int):
    import warnings

    import cupy

    with warnings.catch_warnings():  # deprecated in CuPy 14 in favour of a protocol torch lacks here
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device_index)


def launch(fn, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, smem: int, device_index: int) -> None:
    """Launch on torch's current stream. ``args``: ints are pointers unless given as np.int32/np.float32."""
    import torch

    stream = _stream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
    fn(grid, block, tuple(np.uint64(a) if isinstance(a, int) else a for a in args),
       shared_mem=smem, stream=stream)
