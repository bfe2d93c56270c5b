"""Tensor-core rate of the wgmma forms the sm90 GEMM can use, alone: s8 and e4m3, A from registers
(RS, what cuda/w4a4_sm90.cu does) or from shared memory (SS), m64n128k32, in the kernel's pattern
(4 chained k-chunks, commit, wait 0) or with two commit groups in flight (wait 1).

Every SM runs one CTA of WGS warpgroups; each warpgroup loops ITERS times over its pattern on zero
operands in shared memory (values do not change the rate) and stores its accumulators once. TOPS
= 2 * 64 * 128 * 32 * 4 * ITERS * WGS * CTAs / time (dense).

    python examples/benchmarks/wgmma_rate.py [--out DIR]

Prints one table and writes wgmma-rate-<gpu>.json (device, commit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gemm  # noqa: E402
from vllm_atom.kernels import _loader  # noqa: E402

N = 128
ACC = ", ".join(f"%{i}" for i in range(N // 2))
OPS = ", ".join(f'"+r"(c[{i}])' for i in range(N // 2))


def mma_asm(kind: str, form: str) -> str:
    """One inline-asm wgmma m64n128k32 (kind s8 / e4m3, form rs / ss) on accumulators c."""
    types = "s32.s8.s8" if kind == "s8" else "f32.e4m3.e4m3"
    tail = "" if kind == "s8" else ", 1, 1"
    n = N // 2
    if form == "rs":
        a = f"{{%{n}, %{n + 1}, %{n + 2}, %{n + 3}}}"
        ins = f'"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d)'
        b, p = f"%{n + 4}", f"%{n + 5}"
    else:
        a, ins = f"%{n}", '"l"(adesc), "l"(bdesc), "r"(scale_d)'
        b, p = f"%{n + 1}", f"%{n + 2}"
    return (f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, {p}, 0;\\n"\n'
            f'  "wgmma.mma_async.sync.aligned.m64n{N}k32.{types} {{{ACC}}}, {a}, {b}, p{tail};\\n}}\\n"\n'
            f'  : {OPS} : {ins});\n')


def source(kind: str, form: str) -> str:
    return f"""#include "sm90.cuh"
// WGS warpgroups per CTA; INFLIGHT 1: wait 0 after each group of 4 (the GEMM's pattern), 2: two
// commit groups in flight on two accumulator sets (wait 1).
extern "C" __global__ void __launch_bounds__(128 * WGS, 1) rate(int* out, int iters) {{
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  for (int i = threadIdx.x; i < 24 * 1024 / 16; i += blockDim.x) ((uint4*)smem)[i] = make_uint4(0, 0, 0, 0);
  asm volatile("fence.proxy.async.shared::cta;\\n" ::: "memory");
  __syncthreads();
  const u64 bdesc0 = desc_sw128(smem_addr(smem)), adesc0 = desc_sw128(smem_addr(smem + 16384));
  u32 a[4] = {{threadIdx.x & 1u, 0u, 0u, 0u}};
  int acc[2][{N // 2}];
  for (int s = 0; s < 2; ++s)
    for (int i = 0; i < {N // 2}; ++i) acc[s][i] = 0;
  for (int it = 0; it < iters; ++it) {{
#pragma unroll
    for (int s = 0; s < INFLIGHT; ++s) {{
      int (&c)[{N // 2}] = acc[s];
      fence_operand(c);
      wgmma_fence();
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) {{
        const u64 bdesc = bdesc0 + 2 * kc, adesc = adesc0 + 2 * kc;
        const int scale_d = kc > 0 || it > 0;
        (void)adesc;
        {mma_asm(kind, form)}
      }}
      wgmma_commit();
      fence_operand(c);
    }}
    if (INFLIGHT == 1) wgmma_wait<0>(); else wgmma_wait<1>();
  }}
  wgmma_wait<0>();
  int sum = 0;
  for (int s = 0; s < 2; ++s)
    for (int i = 0; i < {N // 2}; ++i) sum += acc[s][i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--iters", type=int, default=20000)
    args = ap.parse_args()
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    root = Path(tempfile.mkdtemp(prefix="wgmma-rate-"))
    for h in ("sm90.cuh", "common.cuh"):
        shutil.copy(_loader.CUDA_DIR / h, root / h)
    cuda_dir, _loader.CUDA_DIR = _loader.CUDA_DIR, root
    rows = []
    try:
        for kind in ("s8", "e4m3"):
            for form in ("rs", "ss"):
                (root / f"rate_{kind}_{form}.cu").write_text(source(kind, form))
                for wgs in (1, 2):
                    for inflight in (1, 2):
                        fn = _loader.kernel(f"rate_{kind}_{form}.cu", "rate", (("WGS", wgs), ("INFLIGHT", inflight)), dev)
                        out = torch.empty(sms * 128 * wgs, dtype=torch.int32, device="cuda")

                        def go():
                            _loader.launch(fn, (sms, 1, 1), (128 * wgs, 1, 1), (out.data_ptr(), np.int32(args.iters)),
                                           24 * 1024 + 1024, dev)

                        go()
                        torch.cuda.synchronize()
                        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        best = float("inf")
                        for _ in range(3):
                            t0.record()
                            go()
                            t1.record()
                            torch.cuda.synchronize()
                            best = min(best, t0.elapsed_time(t1) * 1e3)
                        ops = 2 * 64 * N * 32 * 4 * args.iters * inflight * wgs * sms
                        rows.append(dict(kind=kind, form=form, wgs=wgs, inflight=inflight, time_us=round(best, 1),
                                         tops=round(ops / best / 1e6, 1)))
                        r = rows[-1]
                        print(f"{kind:5s} {form}  warpgroups {wgs}  groups in flight {inflight}: "
                              f"{r['tops']:7.1f} TOPS", flush=True)
    finally:
        _loader.CUDA_DIR = cuda_dir
        shutil.rmtree(root)
    path = Path(args.out) / f"wgmma-rate-{torch.cuda.get_device_name().split()[-1].lower()}.json"
    path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), commit=bench_gemm.commit(),
                                    iters=args.iters, n=N, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
