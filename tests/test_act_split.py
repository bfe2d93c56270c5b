"""`cuda_ops.act_split`, the CTA split of the activation quantization, without a GPU."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from vllm_atom.config import AtomConfig  # noqa: E402
from vllm_atom.kernels import cuda_ops, layout  # noqa: E402

KS = [576, 1536, 4096, 8192, 11008, 14336, 28672]
MS = [1, 2, 7, 16, 33, 64, 128, 131, 132, 300, 1024, 4097]


@pytest.mark.parametrize("cap", [1 << 20, 4 << 20, 16 << 20])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("m", MS)
def test_split_covers_the_steps_within_the_staging_cap(m, k, cap, monkeypatch):
    monkeypatch.setattr(cuda_ops, "ACT_STAGE_BYTES", cap)
    steps = layout.sizes(k, AtomConfig().outliers_for(k))[2]
    threads, ctas = cuda_ops.act_split(m, k, steps, 132)
    assert threads in (cuda_ops.ACT_THREADS, cuda_ops.ACT_WIDE_THREADS) and 1 <= ctas <= steps
    old = max(1, min(math.ceil(2 * 132 / m), math.ceil(steps / 8)))
    staged = 2 * k * m
    if threads == cuda_ops.ACT_WIDE_THREADS:  # only where the old split staged more than the cap
        assert staged * old > cap and (ctas == 1 or staged * ctas <= cap)
    else:
        assert ctas == old and (old == 1 or staged * old <= cap)


def test_no_cap_is_the_256_thread_split(monkeypatch):
    monkeypatch.setattr(cuda_ops, "ACT_STAGE_BYTES", None)
    for m in MS:
        for k in KS:
            steps = layout.sizes(k, AtomConfig().outliers_for(k))[2]
            assert cuda_ops.act_split(m, k, steps, 132) == (256, max(1, min(math.ceil(264 / m), math.ceil(steps / 8))))
