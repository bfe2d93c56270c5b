"""The programmatic-dependent launch of `vllm_atom.kernels._loader`, without a GPU: the ctypes
structures have the driver ABI's layout (cuda.h, CUDA 12/13), and `cuLaunchKernelEx` receives the
grid, block, shared memory, stream, the one launch attribute and every argument by address."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.kernels import _loader  # noqa: E402


def test_struct_layout_matches_the_driver_abi():
    # sizeof / offsetof from cuda.h (CUlaunchAttribute, CUlaunchConfig), checked with gcc once
    assert ctypes.sizeof(_loader._LaunchAttribute) == 72
    assert _loader._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_loader._LaunchConfig) == 56
    assert (_loader._LaunchConfig.hStream.offset, _loader._LaunchConfig.attrs.offset,
            _loader._LaunchConfig.numAttrs.offset) == (32, 40, 48)


class _FakeFn:
    ptr = 0xF00D


class _FakeDriver:
    """Records each launch; reads the arguments during the call (as the driver does: they may
    be freed once it returns) as the ctypes types in `arg_types`."""

    def __init__(self, rc=0, arg_types=()):
        self.rc, self.calls, self.arg_types = rc, [], arg_types

    def cuLaunchKernelEx(self, cfg_ref, fn, params, extra):  # noqa: N802  (the driver's name)
        cfg = ctypes.cast(cfg_ref, ctypes.POINTER(_loader._LaunchConfig)).contents
        attr = ctypes.cast(cfg.attrs, ctypes.POINTER(_loader._LaunchAttribute)).contents
        self.calls.append(dict(
            grid=(cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ), block=(cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ),
            smem=cfg.sharedMemBytes, stream=cfg.hStream, n_attrs=cfg.numAttrs, attr=(attr.id, attr.value[0]),
            fn=fn.value, extra=extra,
            args=[ctypes.cast(params[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(self.arg_types)]))
        return self.rc

    def cuGetErrorName(self, rc, out):
        return 0


def test_dependent_launch_passes_everything(monkeypatch):
    drv = _FakeDriver(arg_types=(ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_uint64))
    monkeypatch.setattr(_loader, "_libcuda", lambda: drv)
    args = (0x1234_5678_9ABC, np.int32(-7), np.float32(0.5), 0)
    _loader._launch_dependent(_FakeFn(), (3, 2, 1), (384, 1, 1), args, 200_000, 0xBEEF)
    (c,) = drv.calls
    assert c["grid"] == (3, 2, 1) and c["block"] == (384, 1, 1) and c["smem"] == 200_000
    assert c["stream"] == 0xBEEF and c["fn"] == 0xF00D and c["extra"] is None
    assert c["n_attrs"] == 1 and c["attr"] == (6, 1)  # programmatic stream serialization allowed
    assert c["args"] == [0x1234_5678_9ABC, -7, 0.5, 0]


def test_dependent_launch_errors(monkeypatch):
    monkeypatch.setattr(_loader, "_libcuda", lambda: _FakeDriver(rc=1))
    with pytest.raises(RuntimeError, match="cuLaunchKernelEx failed"):
        _loader._launch_dependent(_FakeFn(), (1, 1, 1), (32, 1, 1), (0,), 0, 0)
    with pytest.raises(TypeError, match="np.int32"):
        _loader._launch_dependent(_FakeFn(), (1, 1, 1), (32, 1, 1), (np.int64(3),), 0, 0)


@pytest.mark.parametrize("env, launched", [(None, {1}), ("0", set()), ("1", {1}), ("2", {1, 2})])
def test_pdl_levels(monkeypatch, env, launched):
    """VLLM_ATOM_PDL picks which launches are programmatic dependents: level 1 the sm90 GEMM after
    its quantization (default), 2 also the quantization after a GEMM; the others launch normally."""
    import torch

    class _Stream:
        cuda_stream = 0xBEEF

    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: _Stream())
    monkeypatch.setattr(_loader, "_stream", lambda stream, index: stream)
    dependent = []
    monkeypatch.setattr(_loader, "_launch_dependent", lambda fn, *a: dependent.append(fn.level))
    if env is None:
        monkeypatch.delenv(_loader.PDL_ENV, raising=False)
    else:
        monkeypatch.setenv(_loader.PDL_ENV, env)
    normal = []

    class _Fn:
        def __init__(self, level):
            self.level = level

        def __call__(self, grid, block, args, shared_mem, stream):
            normal.append(self.level)

    for level in (0, 1, 2):
        _loader.launch(_Fn(level), (1, 1, 1), (32, 1, 1), (), 0, 0, dependent=level)
    assert set(dependent) == launched and set(normal) == {0, 1, 2} - launched


def test_pdl_level_must_be_a_number(monkeypatch):
    monkeypatch.setenv(_loader.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="VLLM_ATOM_PDL must be 0, 1 or 2"):
        _loader.pdl_level()
