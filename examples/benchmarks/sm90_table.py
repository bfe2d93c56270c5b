"""Entries for `gemm_plan.SM90_MID_TUNED` from a `bench_gemm.py --sweep-splits --sweep-width 64` run.

    python examples/benchmarks/sm90_table.py results/gemm-sweep-mid-h200.json [--min-gain 0.03]

For every (M, N, K) of the sweep with 64 < M <= SM90_MID_MAX_M: the fastest config among the
sweep's rows (`atom_gemm_w<wgc>c<cs>[k<ks>]`: the plan's width; `atom_gemm_b<bn>w<wgc>c<cs>k<ks>`:
another width; PIPE rows are left out, the mid table has no PIPE field) against the wave
model's pick (the `picked` row of the sweep, or its `atom_gemm` row when the plan had no mid entry). Prints the entries at least ``--min-gain`` faster,
as the dict items of the table, keyed by M's bucket, with the gain as a comment; with several M
of one bucket in the sweep, the bucket's largest M decides.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from vllm_atom.kernels import gemm_plan

_ROW = re.compile(r"atom_gemm_(?:b(?P<bn>\d+))?w(?P<wgc>\d+)c(?P<cs>\d+)(?:k(?P<ks>\d+))?(?P<pipe>p?)$")


def parse(impl: str, m: int) -> tuple[int, int, int, int] | None:
    """(bn, wgc, cs, ks) of a sweep row's name, None for PIPE rows and other rows."""
    hit = _ROW.match(impl)
    if not hit or hit["pipe"]:
        return None
    bn = int(hit["bn"]) if hit["bn"] else gemm_plan.sm90_width(m)
    return bn, int(hit["wgc"]), int(hit["cs"]), int(hit["ks"] or 1)


def entries(rows: list[dict], min_gain: float = 0.03) -> dict[tuple[int, int, int], tuple[tuple[int, ...], float]]:
    """{(bucket, N, K): ((bn, wgc, cs, ks), model pick time / best time)} for the points where the
    best measured config beats the model's pick by ``min_gain``."""
    shapes: dict[tuple[int, int, int], list[dict]] = {}
    for r in rows:
        if gemm_plan.sm90_mid_bucket(r["M"]) and r["impl"].startswith("atom_gemm"):
            shapes.setdefault((r["M"], r["N"], r["K"]), []).append(r)
    out = {}
    for (m, n, k), rs in sorted(shapes.items()):
        # the model's pick: the sweep's `picked` row, else the plan's own row (a sweep without mid entries)
        picked = [r for r in rs if r.get("picked")] or [r for r in rs if r["impl"] == "atom_gemm"]
        timed = [(r["time_us"], cfg) for r in rs if (cfg := parse(r["impl"], m))]
        if not picked or not timed:
            continue
        best_us, best = min(timed)
        gain = picked[0]["time_us"] / best_us
        key = (gemm_plan.sm90_mid_bucket(m), n, k)
        if gain >= 1 + min_gain:
            out[key] = (best, gain)
        else:
            out.pop(key, None)  # (a larger M of the bucket measured no gain)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="bench_gemm.py JSON with --sweep-splits and --sweep-width rows")
    ap.add_argument("--min-gain", type=float, default=0.03)
    args = ap.parse_args(argv)
    d = json.load(open(args.sweep))
    found = entries(d.get("detail", []) + d.get("rows", []), args.min_gain)
    print(f"# {args.sweep}: {d.get('device')}, commit {d.get('commit')}")
    for key, (cfg, gain) in found.items():
        print(f"    {key}: {cfg},  # {gain:.2f}x the model's pick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
