"""The GEMM dispatch table (`vllm_atom.kernels.gemm_plan`): every pick is a config the kernels
support (CPU only: no CUDA needed)."""

from __future__ import annotations

import math

import pytest

from vllm_atom.kernels import gemm_plan as gp

LAYERS = [(4096, 4096), (22016, 4096), (12288, 4096), (4096, 11008), (57344, 8192), (8192, 28672), (960, 576),
          (8, 144), (136, 256)]


@pytest.mark.parametrize("n,k", LAYERS)
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 33, 64, 65, 128, 129, 256, 1000, 4096, 8193])
def test_sm90_plan_is_valid(m, n, k):
    steps = (k - 128) // 128 + 1 if k > 256 else k // 128
    cfg, per_split = gp.sm90_plan(m, n, k, steps, 132)
    assert cfg.bn in gp.SM90_WIDTHS and cfg.cs in gp.SM90_SPLITS
    assert cfg.bn >= min(m, 128) and (cfg.bn == 8 or cfg.bn // 2 < m)  # the narrowest width that holds M
    assert cfg.rows % (2 * cfg.cs) == 0 and cfg.smem_bytes <= gp.SM90_SMEM
    assert per_split * cfg.cs >= steps and per_split * (cfg.cs - 1) < steps  # every rank has work
    assert cfg in gp.sm90_configs(n, k, steps, 132, max_m=max(m, 128))


def test_tuned_entry_wins(monkeypatch):
    monkeypatch.setitem(gp.SM90_TUNED, (8, 4096, 4096), 8)
    assert gp.sm90_plan(1, 4096, 4096, 32, 132)[0].cs == 8
    assert gp.sm90_plan(1, 4096, 4096, 3, 132)[0].cs == 1  # never more splits than steps allow


def test_split_model_fills_one_wave_for_small_layers():
    # 32 tiles of 128 rows x 32 steps: 4 splits put 128 CTAs on 132 SMs
    assert gp.sm90_splits_model(32, 32, 132) == 4
    assert gp.sm90_splits_model(1000, 64, 132) == 1


def test_mma_plan_unchanged():
    cfg, splits, per = gp.gemm_plan(1, 4096, 32, 132)
    assert cfg == "small" and splits * per >= 32 and math.ceil(32 / per) == splits
