"""Where the sm90 GEMM's time goes: the shipped kernel against copies of it with one part taken out.

Each variant is cuda/w4a4_sm90.cu with a text patch (below), compiled into a private kernel
directory and timed exactly like bench_gemm.py's atom_gemm row (CUDA graph, rotated buffers).
The results are wrong by construction for every variant but "base": they only bound the time.

    nofold   the per-step fold of the int32 sums into fp32 is skipped (the MMA + load ceiling)
    nomma    no wgmma is issued; the fold runs on the weight registers (the fold + load ceiling)
    noact    the activation tile is not copied (no activation traffic from L2)
    stream   nofold + nomma: the producer's copies and the barriers alone
    pp1      PINGPONG on: two consumer warpgroups take turns issuing their MMAs
    oldloop  the step loop LEAN replaced (gemm_plan.SM90_LEAN = 0: shared addresses recomputed
             every step, the outlier step inside the loop); the patches above (nofold, nomma,
             noact, stream, pp1, l2pf) edit that loop, so they run on it: compare them with oldloop
    lean     the LEAN loop wherever it applies (what base runs since it became the default)
    s8, e4m3 the shipped kernel with the INT4 groups on s8 / e4m3 wgmma at every M (the cut
             gemm_plan.SM90_E4M3_MIN_M set for the quantization and the GEMM alike); the patches
             above change the s8 path; NAME@e4m3 (nofold@e4m3, nomma@e4m3, stream@e4m3): their
             counterparts on the e4m3 path (with the cut at 0)
    git:REV  the kernel sources (cuda/) as committed at REV, unpatched
    dir:PATH the kernel sources in directory PATH (e.g. an older cuda/ exported with git archive)
    NAME+capN  variant NAME with the quantization's staging cap cuda_ops.ACT_STAGE_BYTES at N MiB
             (wide rows on fewer CTAs of 1024 threads above it); NAME+oldsplit: no cap (256 threads,
             the split of before v3.12); NAME+qinN: variant NAME with the quantization inside the GEMM
             up to N tokens (gemm_plan.SM90_QIN_MAX_M = N: one launch, cuda/NOTES.md v3.13); both
             meaningful with --linear
    linear   the unpatched kernel timed as the whole Atom linear (quantization + GEMM, as vLLM
             runs it: the GEMM a programmatic dependent launch); --linear times every variant so
    l2pf<N>  the producer prefetches its first N steps of weights into L2 before waiting for the
             quantization (N = 4, 16, 64; use with --linear)

    python examples/benchmarks/sm90_variants.py [--variants base,nofold,...] [--m-list 1,128,8192] [--out DIR]
        [--linear] [--shapes llama-3-8b:gate_up,...]

Prints one table (microseconds and TOPS per variant) and writes sm90-variants-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gemm  # noqa: E402
from vllm_atom.config import AtomConfig  # noqa: E402
from vllm_atom.kernels import _loader, cuda_ops, gemm_plan, layout  # noqa: E402  (bench_gemm registers the ops)

ISSUE = "#else\n    issue<BN, false>(c, a, smem_addr(smem + so));\n#endif\n"
FOLD = "#else\n    fold<BN>(acc, c, sw, fa);\n#endif\n"
EXPECT = "wgs * wbytes + (QIN ? 0 : rows * 128 + srows * 8)"
ACT_COPY = "        bulk_copy(st, qa + ((size_t)j * M + m0) * 128, rows * 128, &full[s], keep);\n"
NO_MMA = ("#else\n#pragma unroll\n    for (int i = 0; i < NACC; ++i) c[i] = (int)a[i & 3][(i >> 2) & 3] + i;\n#endif\n")
NO_FOLD = "#else\n    if (c[0] == 0x7fffffff) acc[0] += sw[0] * fa[0].x;\n#endif\n"
PATCHES = {
    "base": [],
    "nofold": [(FOLD, NO_FOLD)],
    "nomma": [(ISSUE, NO_MMA)],
    "noact": [(EXPECT, "wgs * wbytes + (QIN ? 0 : srows * 8)"), (ACT_COPY, "")],
    "stream": [(ISSUE, NO_MMA), (FOLD, NO_FOLD)],
    "pp1": [("#define PINGPONG 0\n", "#define PINGPONG (WGC == 2)\n")],
}
# l2pf<N>: before its programmatic-dependency wait (while the quantization runs) the producer asks
# L2 for the weights of its first N steps (no shared memory, no barrier: the real copies after the
# wait then hit L2); meaningful with --linear
WAIT = "      grid_dependency_wait();\n"
for _n in (4, 16, 64):
    PATCHES[f"l2pf{_n}"] = [(WAIT, (
        "      for (int j = j0; j < min(j1, j0 + %d); ++j)\n"
        "        for (int w = 0; w < wgs; ++w)\n"
        "          bulk_prefetch_l2(wpack + ((size_t)tn * SL + w) * slab + (size_t)j * CHUNK4, j == G ? CHUNK8 : CHUNK4);\n"
        % _n) + WAIT)]
CUTS = {"s8": gemm_plan.SM90_E4M3_OFF, "e4m3": 0}  # variants that only move the e4m3 cut (gemm_plan.SM90_E4M3_MIN_M)
ISSUE8 = "    else\n      issue<BN, true>(c, a, smem_addr(smem + so));\n"
FOLD8 = "    else\n      fold_e4m3<BN>(acc, c, sw, fa);\n"
NO_MMA8 = ("    else {\n#pragma unroll\n      for (int i = 0; i < NACC; ++i) c[i] = (int)a[i & 3][(i >> 2) & 3] + i;\n    }\n")
NO_FOLD8 = "    else if (c[0] == 0x7fffffff) acc[0] += sw[0] * fa[0].x;\n"
PATCHES["nofold@e4m3"] = [(FOLD8, NO_FOLD8)]
PATCHES["nomma@e4m3"] = [(ISSUE8, NO_MMA8)]
PATCHES["stream@e4m3"] = [(ISSUE8, NO_MMA8), (FOLD8, NO_FOLD8)]
SHAPES = [("llama-2-7b", "o", 4096, 4096), ("llama-2-7b", "gate_up", 22016, 4096),
          ("llama-2-70b", "gate_up", 57344, 8192), ("llama-2-70b", "down", 8192, 28672)]


def variant_cut(name: str, default: int) -> int:
    """The e4m3 cut a variant runs with: @e4m3 ones at 0, the s8 patches never (their targets are
    the s8 path), s8 / e4m3 their own, the rest (base, linear, git:, dir:, l2pf) as shipped."""
    if name.endswith("@e4m3"):
        return 0
    if name in CUTS:
        return CUTS[name]
    return CUTS["s8"] if name in ("nofold", "nomma", "noact", "stream") else default


def variant_lean(name: str, default: int) -> int:
    """gemm_plan.SM90_LEAN for a variant: the patched ones and oldloop run the loop their patches
    edit (LEAN off), the rest as shipped (``default``)."""
    if name == "lean":
        return 1
    return 0 if name == "oldloop" or (name in PATCHES and name != "base") else default


def variant_dir(name: str, root: Path, cuda_dir: Path) -> Path:
    d = root / name.replace(":", "-")
    shutil.copytree(cuda_dir, d)
    if name in ("linear", "oldloop", "lean") or name in CUTS:
        return d
    if name.startswith("git:"):  # (needs a git checkout)
        for f in d.iterdir():
            f.write_text(subprocess.run(["git", "show", f"{name[4:]}:cuda/{f.name}"], capture_output=True,
                                        text=True, check=True, cwd=cuda_dir).stdout)
        return d
    if name.startswith("dir:"):
        shutil.rmtree(d)
        shutil.copytree(name[4:], d)
        return d
    src = (d / "w4a4_sm90.cu").read_text()
    for old, new in PATCHES[name]:
        if src.count(old) != 1:
            raise SystemExit(f"variant {name}: patch target not found once in w4a4_sm90.cu: {old!r}")
        src = src.replace(old, new)
    (d / "w4a4_sm90.cu").write_text(src)
    return d


def use_kernels(d: Path) -> None:
    _loader.CUDA_DIR = d
    _loader.kernel.cache_clear()
    _loader.compile_cubin.cache_clear()
    cuda_ops._compile_sm90.cache_clear()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base,nofold,nomma,noact,stream")
    ap.add_argument("--m-list", default="1,16,128,1024,8192")
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", help="comma list of model:layer from bench_gemm.SHAPES (default: the four of SHAPES)")
    ap.add_argument("--linear", action="store_true",
                    help="time every variant as the whole linear (quantization, then the GEMM as a dependent launch)")
    args = ap.parse_args()
    variants, m_list = args.variants.split(","), [int(v) for v in args.m_list.split(",")]
    cfg = AtomConfig()
    root = Path(tempfile.mkdtemp(prefix="sm90-variants-"))
    cuda_dir = _loader.CUDA_DIR
    default_cut, default_lean, default_cap = gemm_plan.SM90_E4M3_MIN_M, gemm_plan.SM90_LEAN, cuda_ops.ACT_STAGE_BYTES
    default_qin = gemm_plan.SM90_QIN_MAX_M
    dirs = {}
    for v in variants:
        name = v.partition("+")[0]
        if name not in dirs:
            dirs[name] = variant_dir(name, root, cuda_dir)
    rows = []
    shapes = SHAPES if not args.shapes else [s for s in bench_gemm.SHAPES if f"{s[0]}:{s[1]}" in args.shapes.split(",")]
    if args.shapes and len(shapes) != len(args.shapes.split(",")):
        raise SystemExit(f"--shapes: not all of {args.shapes} are in bench_gemm.SHAPES")
    for model, layer, n, k in shapes:
        o = cfg.outliers_for(k)
        kn = k - o
        n_w = max(1, min(8, math.ceil(bench_gemm.ROTATE_BYTES / (n * k))))
        packs = [layout.prepack_sm90(torch.randint(0, 256, (n, kn // 2), dtype=torch.uint8, device="cuda"),
                                     (torch.rand(n, kn // 128, device="cuda") * 0.01 + 1e-3).half(),
                                     torch.randint(-127, 128, (n, o), dtype=torch.int8, device="cuda"),
                                     (torch.rand(n, 1, device="cuda") * 0.01 + 1e-3).half()) for _ in range(n_w)]
        reorder = torch.randperm(k, device="cuda").to(torch.int32)
        for m in m_list:
            n_sets = max(n_w, min(8, math.ceil(bench_gemm.ROTATE_BYTES / (2 * m * k + 2 * m * n))))
            xs = [torch.randn(m, k, device="cuda").to(torch.bfloat16) for _ in range(n_sets)]
            for v in variants:
                name, _, host = v.partition("+")
                if host not in ("", "oldsplit") and not (host[:3] in ("cap", "qin") and host[3:].isdigit()):
                    raise SystemExit(f"variant {v}: unknown suffix +{host}")
                use_kernels(dirs[name])
                gemm_plan.SM90_E4M3_MIN_M = variant_cut(name, default_cut)
                gemm_plan.SM90_LEAN = variant_lean(name, default_lean)
                cuda_ops.ACT_STAGE_BYTES = (None if host == "oldsplit" else int(host[3:]) << 20
                                            if host.startswith("cap") else default_cap)
                gemm_plan.SM90_QIN_MAX_M = int(host[3:]) if host.startswith("qin") else default_qin
                sets = [(x, *torch.ops.vllm_atom.quantize_act(x, reorder, o, cfg.a_clip, True), packs[i % n_w])
                        for i, x in enumerate(xs)]
                if v == "linear" or args.linear:
                    def fn(x, qa, sa, wp, n=n, o=o, r=reorder):
                        return torch.ops.vllm_atom.atom_linear_sm90(x, wp, r, None, n, o, cfg.a_clip)
                else:
                    def fn(x, qa, sa, wp, n=n):
                        return torch.ops.vllm_atom.w4a4_gemm_sm90(qa, sa, wp, None, n, torch.bfloat16)
                us = bench_gemm.time_us(fn, sets)
                rows.append(dict(model=model, layer=layer, M=m, N=n, K=k, variant=v, time_us=round(us, 3),
                                 tops=round(2 * m * n * k / us / 1e6, 1)))
            line = "  ".join(f"{r['variant']} {r['time_us']:8.2f} us {r['tops']:7.1f}" for r in rows[-len(variants):])
            print(f"{model:12s} {layer:8s} M={m:5d}  {line}", flush=True)
            del sets, xs
        del packs
        torch.cuda.empty_cache()
    use_kernels(cuda_dir)
    gemm_plan.SM90_E4M3_MIN_M = default_cut
    gemm_plan.SM90_LEAN = default_lean
    cuda_ops.ACT_STAGE_BYTES = default_cap
    gemm_plan.SM90_QIN_MAX_M = default_qin
    shutil.rmtree(root)
    out = Path(args.out) / f"sm90-variants-{torch.cuda.get_device_name().split()[-1].lower()}.json"
    out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), commit=bench_gemm.commit(),
                                   patches={v: PATCHES.get(v.partition("+")[0], v) for v in variants}, linear=args.linear,
                                   rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
