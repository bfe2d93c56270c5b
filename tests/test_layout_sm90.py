"""The sm_90a GEMM's operand layouts (`vllm_atom.kernels.layout`), checked on the CPU.

`emulate_step` reads the prepacked weights and the swizzled activations exactly as
`cuda/w4a4_sm90.cu` does (each lane's A fragment per the wgmma register layout, INT4 expanded
to 16*w with the two masks, or to the e4m3 bytes of w + 8, B rows un-swizzled by address) and
forms the integer dot products of every (row, token); they must equal the reference's integer
sums in slot order (plus 8 times the activation sums for e4m3).
"""

from __future__ import annotations

import pytest
import torch

from vllm_atom import reference as R
from vllm_atom.kernels import gemm_plan, layout


def _nibbles_x16(word: int) -> tuple[list[int], list[int]]:
    """The two A registers of one packed word: (w << 4) & 0xF0F0F0F0 and w & 0xF0F0F0F0, as s8."""
    lo = [((word >> (8 * b)) << 4) & 0xF0 for b in range(4)]
    hi = [(word >> (8 * b)) & 0xF0 for b in range(4)]
    s8 = lambda v: v - 256 if v >= 128 else v  # noqa: E731
    return [s8(v) for v in lo], [s8(v) for v in hi]


def _nibbles_e4m3(word: int) -> tuple[list[int], list[int]]:
    """The two A registers of one packed word with e4m3: (w & 0x0F0F0F0F) ^ 0x08080808 and
    ((w >> 4) & 0x0F0F0F0F) ^ 0x08080808, as the e4m3 values times 2^9."""
    lo = [((word >> (8 * b)) & 0x0F) ^ 0x08 for b in range(4)]
    hi = [((word >> (8 * b + 4)) & 0x0F) ^ 0x08 for b in range(4)]
    e4m3 = lambda v: int(torch.tensor([v], dtype=torch.uint8).view(torch.float8_e4m3fn).float() * 512)  # noqa: E731
    return [e4m3(v) for v in lo], [e4m3(v) for v in hi]


def emulate_step(wpack: torch.Tensor, qa: torch.Tensor, slab: int, step: int, outlier: bool,
                 e4m3: bool = False) -> torch.Tensor:
    """int64 [64, M]: the kernel's isum (times 16 for INT4 steps; with e4m3 the products' sum
    in units of 2^-9) of one slab and step."""
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
                    expand = _nibbles_e4m3 if e4m3 else _nibbles_x16
                    (lo0, hi0), (lo1, hi1) = expand(words[0]), expand(words[1])
                    regs = [lo0, lo1, hi0, hi1]
                for r in range(4):  # reg r: row g + 8*(r%2), k 16*(r//2) + 4t + b
                    for b in range(4):
                        a[16 * w + gq + 8 * (r % 2), 32 * kc + 16 * (r // 2) + 4 * t + b] = regs[r][b]
    bt = torch.zeros(128, m, dtype=torch.int64)  # B[k, token], un-swizzled by address
    for tok in range(m):
        row = qa[step, tok].tolist()
        for k in range(128):
            bt[k, tok] = row[((k // 16) ^ (tok % 8)) * 16 + k % 16]
    if e4m3 and not outlier:
        bt = layout.e4m3_values(bt.to(torch.int8)).long()
    return a @ bt


@pytest.mark.parametrize("e4m3", [False, True])
@pytest.mark.parametrize("n,k,o,m", [(130, 576, 64, 3), (64, 256, 0, 9), (70, 272, 16, 1)])
def test_emulated_wgmma_step_is_the_reference_dot_product(n, k, o, m, e4m3, monkeypatch):
    monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", 0 if e4m3 else gemm_plan.SM90_E4M3_OFF)
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
            got = emulate_step(wpack, qa, slab, step, outlier=False, e4m3=e4m3)
            xs = a.q[:, 128 * step:128 * step + 128].long()
            want = xs @ w.q[rows, 128 * step:128 * step + 128].long().T
            if e4m3:  # (w + 8) . x: the padding rows (w = 0) give 8X
                assert torch.equal(got[:nr], want.T + 8 * xs.sum(1))
                assert torch.equal(got[nr:], (8 * xs.sum(1)).expand(64 - nr, m))
            else:
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


@pytest.mark.parametrize("e4m3", [False, True])
@pytest.mark.parametrize("m,k,o", [(1, 576, 64), (13, 256, 0), (33, 1152, 128)])
def test_activation_sm90_round_trip(m, k, o, e4m3, monkeypatch):
    monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", 0 if e4m3 else gemm_plan.SM90_E4M3_OFF)
    gen = torch.Generator().manual_seed(m + k)
    idx = torch.randperm(k, generator=gen).to(torch.int32)
    a = R.quantize_activation(torch.randn(m, k, generator=gen), idx, o, 128, 0.9)
    qa, sa = layout.pack_activation_sm90(a)
    steps = (k - o) // 128 + (o > 0)
    assert qa.shape == (steps, m, 128) and sa.shape == (steps, 2 * layout.padded_tokens(m))
    for got, want in zip(layout.unpack_activation_sm90(qa, sa, k, o), a):
        assert torch.equal(got, want)
    scale, c = layout.sm90_entries(sa, m)
    g = (k - o) // 128
    x = a.q.unflatten(1, (g, 128)).sum(2).T.float()  # [G, M]
    assert torch.equal(c[:g], (x * scale[:g]) * 2.0 ** -6) and not c[g:].any()
    ints = layout.unpack_activation_sm90(qa, sa, k, o).q
    assert torch.equal(ints, a.q)  # e4m3 bytes decode to the same integers


def test_e4m3_bytes_are_the_kernels_encoding():
    """act_quant.cu's e4m3_of (sign | ((fp32 bits >> 20) & 0x7FF) - 960), transcribed, against torch."""
    import struct

    def kernel_byte(q: int) -> int:
        u = struct.unpack("<I", struct.pack("<f", float(q)))[0]
        return 0 if q == 0 else ((((u >> 20) & 0x7FF) - 960) | ((u >> 24) & 0x80)) & 0xFF

    q = torch.arange(-8, 8, dtype=torch.int8)
    assert [kernel_byte(v) for v in q.tolist()] == (layout.e4m3_bytes(q).view(torch.uint8)).tolist()
    assert torch.equal(layout.e4m3_values(layout.e4m3_bytes(q)), q)
    u = torch.arange(16, dtype=torch.uint8)  # weight bytes u in the low nibble: u * 2^-9
    assert torch.equal(u.view(torch.float8_e4m3fn).float() * 512, u.float())


@pytest.mark.parametrize("m", [1, 9, 200])
def test_e4m3_fold_matches_the_integer_fold(m, monkeypatch):
    """The e4m3 fold's arithmetic (fp32 on the CPU): (P * sa - C) * 512 sw with P = (isum + 8X) / 512
    equals isum * sa * sw within 2^-24 (|isum sa sw| + |8X sa sw|) per step, the extra term of
    the GPU tests' bound."""
    monkeypatch.setattr(gemm_plan, "SM90_E4M3_MIN_M", 0)
    gen = torch.Generator().manual_seed(m)
    k = 1024
    idx = torch.randperm(k, generator=gen).to(torch.int32)
    a = R.quantize_activation(torch.randn(m, k, generator=gen) * 3, idx, 0, 128, 0.9)
    _, sa = layout.pack_activation_sm90(a)
    scale, c = layout.sm90_entries(sa, m)
    w = torch.randint(-8, 8, (16, k), generator=gen)
    sw = torch.rand(16, k // 128, generator=gen).half().float()
    xs = a.q.long().unflatten(1, (-1, 128))  # [M, G, 128]
    ws = w.unflatten(1, (-1, 128))  # [N, G, 128]
    isum = torch.einsum("mgk,ngk->mng", xs, ws)
    p = ((isum + 8 * xs.sum(2)[:, None]).float() / 512)  # exact
    t = (p.double() * scale.T[:, None].double() - c.T[:, None].double()).float()  # one fma rounding
    got = t * (512 * sw)[None]
    want = isum.double() * scale.T[:, None].double() * sw[None].double()
    extra = (8 * xs.sum(2)[:, None].abs()).double() * scale.T[:, None].double() * sw[None].double()
    bound = 2.0 ** -24 * (2 * want.abs() + extra) + 1e-45
    assert ((got.double() - want).abs() <= bound).all()
