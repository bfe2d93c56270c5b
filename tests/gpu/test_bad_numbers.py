"""Non-finite and huge inputs into the Atom kernels (issue 17, part 4): one bad token must not
change any other token's output, and nothing outside the outputs may be written.

The Atom linear (quantization + GEMM, every GEMM path by M) and the INT4 KV cache write, each with
one token of the batch holding NaN, +-Inf or values near the bf16 maximum. What that token itself
gets is printed (``bad-numbers`` lines) for docs/ and the reliability JSON, not asserted: it is
the documented behaviour once measured. Run under compute-sanitizer memcheck by
examples/benchmarks/reliability.py (part ``sanitizer``) for out-of-bounds accesses.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.config import AtomConfig
from vllm_atom.kernels import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
CFG = AtomConfig()
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 3.0e38}


def _spoil(x: torch.Tensor, t: int, kind: str) -> torch.Tensor:
    bad = x.clone()
    cols = torch.arange(3, x.shape[1], 97, device=x.device)  # a few channels, INT4 groups and outliers
    bad[t, cols] = BAD[kind] if kind != "huge" else (torch.sign(bad[t, cols]).float() * BAD[kind]).to(x.dtype)
    return bad


def _describe(row: torch.Tensor) -> str:
    r = row.float()
    return f"nan {int(r.isnan().sum())}, inf {int(r.isinf().sum())}, finite {int(r.isfinite().sum())} of {r.numel()}"


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("m", [1, 5, 64, 300])
@pytest.mark.parametrize("n,k", [(4096, 4096), (960, 576)])
def test_bad_token_leaves_the_others_alone_in_the_linear(kind, m, n, k):
    gen = torch.Generator(device=DEV).manual_seed(m * 7 + n)
    o = CFG.outliers_for(k)
    x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
    idx = torch.randperm(k, device=DEV, generator=gen).to(torch.int32)
    w = R.quantize_weight(torch.randn(n, k, device=DEV, generator=gen) / math.sqrt(k), idx, o, 128, CFG.w_clip)
    p = w.packed()
    ops.prepare_atom_linear(p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"], idx, x.dtype)

    def run(inp):
        return torch.ops.vllm_atom.atom_linear(inp, p["qweight"], p["w_scale"], p["w_outlier"],
                                               p["w_outlier_scale"], idx, None, CFG.a_clip)

    t = m // 2
    good, bad = run(x), run(_spoil(x, t, kind))
    torch.cuda.synchronize()
    others = torch.arange(m, device=DEV) != t
    assert torch.equal(good[others], bad[others])
    assert good.isfinite().all()
    print(f"bad-numbers linear {kind} m={m} n={n} k={k}: token row {_describe(bad[t])}")


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("rotate_k", [False, True])
def test_bad_token_leaves_the_others_alone_in_the_cache_write(kind, rotate_k):
    from vllm_atom.kernels import kv_int4

    h, d, nb, t_bad = 4, 128, 8, 5
    gen = torch.Generator(device=DEV).manual_seed(3)
    key = torch.randn(40, h, d, device=DEV, generator=gen).to(torch.bfloat16)
    value = torch.randn(40, h, d, device=DEV, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(nb * 16, device=DEV, generator=gen)[:40].long()
    cache = torch.full((nb, h, 16, R.kv_record_bytes(d)), 0xAB, dtype=torch.uint8, device=DEV)
    want = cache.clone()
    kv_int4.write_kv_int4(key, value, want, slots, rotate_k)
    bad_key, bad_value = key.clone(), value.clone()
    bad_key[t_bad, 1, ::9] = BAD[kind]
    bad_value[t_bad, 2, ::9] = BAD[kind]
    kv_int4.write_kv_int4(bad_key, bad_value, cache, slots, rotate_k)
    torch.cuda.synchronize()
    s = slots[t_bad]
    mask = torch.ones_like(cache, dtype=torch.bool)
    mask[s // 16, :, s % 16] = False  # the bad token's records (all its heads)
    assert torch.equal(cache[mask], want[mask])  # every other record, and every unwritten byte
    rec, ref = cache[s // 16, :, s % 16], want[s // 16, :, s % 16]  # [H, R]: K half, then V half
    half = d // 2 + 4
    assert torch.equal(rec[[0, 3]], ref[[0, 3]])  # the token's clean heads
    assert torch.equal(rec[1, half:], ref[1, half:]) and torch.equal(rec[2, :half], ref[2, :half])
    k_sz = rec[1, d // 2:half].contiguous().view(torch.float16)
    v_sz = rec[2, half + d // 2:].contiguous().view(torch.float16)
    print(f"bad-numbers kv-write {kind} rotate_k={rotate_k}: K scale/zero {k_sz.tolist()}, "
          f"V scale/zero {v_sz.tolist()}")
