"""``vllm-atom`` command line: argument mapping only (the work is in `vllm_atom.quantize`
and `vllm_atom.evaluate`, imported per subcommand).

    vllm-atom quantize MODEL_DIR OUT_DIR --calib-text FILE [--nsamples 128 --seqlen 2048
        --device cpu|cuda --metric hessian|abs_mean --no-gptq --n-outliers 128
        --row-shards 1 --kv-bits 4|16 --kv-smooth 0.5 --kv-skip-layers 0,1|auto]
    vllm-atom eval MODEL_OR_CKPT --text FILE [--checkpoint CKPT --methods fp16,rtn,...
        --seqlen 2048 --max-tokens N --device cpu --json OUT]

Text arguments accept a file path or a name known to `vllm_atom.data.find_text`
(wiki, c4, tiny, austen, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _text_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    from vllm_atom.data import find_text

    return find_text(name)


def _kv_skip_layers(spec: str) -> tuple[list[int], float | None]:
    """'0,1' -> ([0, 1], None); 'auto' / 'auto=0.4' (alone or with indices) -> a threshold
    for `vllm_atom.quantize.kv_sensitivity` (default DEFAULT_KV_SKIP_THRESHOLD)."""
    from vllm_atom.quantize.kv_sensitivity import DEFAULT_KV_SKIP_THRESHOLD

    layers, threshold = [], None
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name == "auto" and (not value or _is_positive_float(value)):
            threshold = float(value) if value else DEFAULT_KV_SKIP_THRESHOLD
        elif item.isdigit():
            layers.append(int(item))
        else:
            raise ValueError(f"--kv-skip-layers: {item!r} is neither a layer index nor "
                             f"auto[=THRESHOLD > 0]")
    return layers, threshold


def _is_positive_float(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def _quantize(args) -> int:
    from vllm_atom.config import AtomConfig
    from vllm_atom.quantize import QuantizeOptions, quantize

    skip, threshold = _kv_skip_layers(args.kv_skip_layers)
    cfg = AtomConfig(n_outliers=args.n_outliers, row_shards=args.row_shards,
                     kv_bits=None if args.kv_bits == 16 else args.kv_bits,
                     a_clip=args.a_clip, w_clip=args.w_clip, kv_smooth=args.kv_smooth,
                     kv_skip_layers=skip)
    opts = QuantizeOptions(nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                           metric=args.metric, gptq=not args.no_gptq, damp=args.damp,
                           seed=args.seed, kv_skip_threshold=threshold)
    report = quantize(args.model_dir, args.out_dir, _text_path(args.calib_text), cfg, opts)
    print(json.dumps(vars(report), indent=2))
    return 0


def _eval(args) -> int:
    from vllm_atom.evaluate import evaluate

    methods = args.methods.split(",") if args.methods else None
    rows = evaluate(args.model, _text_path(args.text), seqlen=args.seqlen, max_tokens=args.max_tokens,
                    methods=methods, checkpoint=args.checkpoint, device=args.device,
                    model_name=args.model_name, text_name=args.text if not Path(args.text).is_file()
                    else None, pipeline=args.pipeline)
    for r in rows:
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}%"
        print(f"{r['method']:>14}  ppl {r['ppl']:9.3f}  kl {kl:>8}  top1 {top1:>7}  "
              f"({r['tokens']} tokens, {r['text']})")
    if args.json:
        out = Path(args.json)
        old = json.loads(out.read_text()) if out.is_file() else []
        key = lambda r: (r["model"], r["method"], r["text"], r["seqlen"],  # noqa: E731
                         r.get("pipeline", "fp32"))
        new_keys = {key(r) for r in rows}
        merged = [r for r in old if key(r) not in new_keys] + rows
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(merged, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-atom", description="Atom W4A4 quantization for vLLM")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a 16-bit causal LM into an Atom checkpoint")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--calib-text", required=True, help="file, or wiki|c4|tiny|austen")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--device", default="cpu", help="cpu or cuda[:i] (one decoder layer at a time)")
    q.add_argument("--metric", choices=("hessian", "abs_mean"), default="hessian")
    q.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights")
    q.add_argument("--damp", type=float, default=0.01)
    q.add_argument("--n-outliers", type=int, default=128)
    q.add_argument("--row-shards", type=int, default=1, help="TP size for o_proj/down_proj")
    q.add_argument("--kv-bits", type=int, choices=(4, 16), default=4)
    q.add_argument("--a-clip", type=float, default=0.9)
    q.add_argument("--w-clip", type=float, default=0.85)
    q.add_argument("--kv-smooth", type=float, default=0.5,
                   help="key smoothing exponent folded into q_proj/k_proj (0 = off)")
    q.add_argument("--kv-skip-layers", default="",
                   help="comma list of layers whose KV cache stays 16-bit (serve with vLLM's "
                        "--kv-cache-dtype-skip-layers), e.g. 0,1; 'auto' (or auto=THRESHOLD) "
                        "also keeps every layer whose attention output INT4 K/V change by more "
                        "than THRESHOLD (relative L2, default 0.5) on the calibration data")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(fn=_quantize)

    e = sub.add_parser("eval", help="perplexity / KL / top-1 of simulated quantization")
    e.add_argument("model", help="16-bit model dir, or an Atom checkpoint")
    e.add_argument("--text", required=True, help="file, or wiki|c4|tiny|austen")
    e.add_argument("--checkpoint", default=None, help="Atom checkpoint (reorder + GPTQ weights)")
    e.add_argument("--methods", "--method", default=None,
                   help="comma list of fp16,rtn,outliers-fp16,outliers-int8,group128,clip,atom,atom-kv4")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-tokens", type=int, default=None, help="default: the whole text")
    e.add_argument("--device", default="cpu")
    e.add_argument("--model-name", default=None, help="model name in the result rows")
    e.add_argument("--pipeline", choices=("fp32", "16bit"), default="fp32",
                   help="unquantized ops in fp32 (rounding only where the runtime quantizes) or in the "
                        "model's 16-bit dtype, as vLLM computes them")
    e.add_argument("--json", default=None, help="merge rows into this JSON list")
    e.set_defaults(fn=_eval)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vllm_atom.quantize.pipeline import InputError

    try:
        return args.fn(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"vllm-atom {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
