"""The sm_90a GEMM's operand layouts (`vllm_atom.kernels.layout`), checked on the CPU.

`emulate_step` reads the prepacked weights and the swizzled activations exactly as
`cuda/w4a4_sm90.cu` does (each lane's A fragment per the wgmma register layout, INT4 expanded
to 16*w with the two masks, B rows un-swizzled by address) and forms the integer dot products
of every (row, token); they must equal the reference's integer sums in slot order.
"""

from __future__ import annotations

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.kernels import layout


def _nibbles_x16(word: int) -> tuple[list[int], list[int]]:
    """The two A registers of one packed word: (w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0, as s8."""
    lo = [((word >> (8 * b)) << 4) & 0xF0 for b in range(4)]
    hi = [(word >> (8 * b)) & 0xF0 for b in range(4)]
    s8 = lambda v: v - 256 if v >= 128 else v  # noqa: E731
    return [s8(v) for v in lo], [s8(v) for v in hi]


def emulate_step(wpack: torch.Tensor, qa: torch.Tensor, slab: int, step: int, outlier: bool) -> torch.Tensor:
    """int64 [64, M]: the kernel's isum (times 16 for INT4 steps) of one slab and step."""
    chunk = wpack[slab, step * layout.CHUNK4:].tolist()
    m = qa.shape[1]
    a = torch.zeros(64, 128, dtype=torch.int64)  # A[row, k] as the registers hold it
    for w in range(4):
        for lane in range(32):
            gq, t = lane // 4, lane % 4
            for kc in range(4):
                if outlier:
                    regs = []
                    for r in range(4):
                        off = w * 2048 + kc * 512 + lane * 16 + 4 * r
                        regs.append([v - 256 if v >= 128 else v for v in chunk[off:off + 4]])
                else:
                    words = []
                    for h in range(2):
                        off = w * 1024 + h * 512 + lane * 16 + 4 * kc
                        words.append(int.from_bytes(bytes(chunk[off:off + 4]), "little"))
                    (lo0, hi0), (lo1, hi1) = _nibbles_x16(words[0]), _nibbles_x16(words[1])
                    regs = [lo0, lo1, hi0, hi1]
                for r in range(4):  # reg r: row g + 8*(r%2), k 16*(r//2) + 4t + b
                    for b in range(4):
                        a[16 * w + gq + 8 * (r % 2), 32 * kc + 16 * (r // 2) + 4 * t + b] = regs[r][b]
    bt = torch.zeros(128, m, dtype=torch.int64)  # B[k, token], un-swizzled by address
    for tok in range(m):
        row = qa[step, tok].tolist()
        for k in range(128):
            bt[k, tok] = row[((k // 16) ^ (tok % 8)) * 16 + k % 16]
    return a @ bt


@pytest.mark.parametrize("n,k,o,m", [(130, 576, 64, 3), (64, 256, 0, 9), (70, 272, 16, 1)])
def test_emulated_wgmma_step_is_the_reference_dot_product(n, k, o, m):
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen)
    idx = torch.randperm(k, generator=gen).to(torch.int32)
    w = R.quantize_weight(torch.randn(n, k, generator=gen), idx, o, 128, 0.85)
    a = R.quantize_activation(x, idx, o, 128, 0.9)
    p = w.packed()
    wpack = layout.prepack_sm90(p["qweight"], p["w_scale"], p["w_outlier"], p["w_outlier_scale"])
    qa, _ = layout.pack_activation_sm90(a)
    g = (k - o) // 128
    for slab in range(wpack.shape[0]):
        rows = slice(64 * slab, min(n, 64 * slab + 64))
        nr = rows.stop - rows.start
        if nr <= 0:
            continue
        for step in (0, g - 1):
            got = emulate_step(wpack, qa, slab, step, outlier=False)
            want = a.q[:, 128 * step:128 * step + 128].long() @ w.q[rows, 128 * step:128 * step + 128].long().T
            assert torch.equal(got[:nr], 16 * want.T)
            assert torch.equal(got[nr:], torch.zeros_like(got[nr:]))
        if o:
            got = emulate_step(wpack, qa, slab, g, outlier=True)
            want = a.q_outlier.long() @ w.q_outlier[rows].long().T
            assert torch.equal(got[:nr], want.T)


@pytest.mark.parametrize("n,k,o", [(200, 576, 64), (256, 256, 0), (8, 144, 16), (4096, 1152, 128)])
def test_prepack_round_trip(n, k, o):
    gen = torch.Generator().manual_seed(n + k)
    kn = k - o
    t = {"qweight": torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, generator=gen),
         "w_scale": torch.rand(n, kn // 128, generator=gen).half(),
         "w_outlier": torch.randint(-128, 128, (n, o), dtype=torch.int8, generator=gen),
         "w_outlier_scale": torch.rand(n, 1, generator=gen).half()}
    wpack = layout.prepack_sm90(*t.values())
    npad = (n + 127) // 128 * 128
    assert wpack.shape == (npad // 64, kn // 128 * layout.CHUNK4 + (layout.CHUNK8 if o else 0))
    back = layout.unprepack_sm90(wpack, n, o)
    for name in ("qweight", "w_scale", "w_outlier") + (("w_outlier_scale",) if o else ()):
        assert torch.equal(back[name], t[name]), name


@pytest.mark.parametrize("m,k,o", [(1, 576, 64), (13, 256, 0), (33, 1152, 128)])
def test_activation_sm90_round_trip(m, k, o):
    gen = torch.Generator().manual_seed(m + k)
    idx = torch.randperm(k, generator=gen).to(torch.int32)
    a = R.quantize_activation(torch.randn(m, k, generator=gen), idx, o, 128, 0.9)
    qa, sa = layout.pack_activation_sm90(a)
    steps = (k - o) // 128 + (o > 0)
    assert qa.shape == (steps, m, 128) and sa.shape == (steps, layout.padded_tokens(m))
    for got, want in zip(layout.unpack_activation_sm90(qa, sa, k, o), a):
        assert torch.equal(got, want)
