"""``vllm-atom`` command line: argument mapping only (the work is in `vllm_atom.quantize`
and `vllm_atom.evaluate`, imported per subcommand).

    vllm-atom quantize MODEL_DIR OUT_DIR --calib-text FILE [--nsamples 128 --seqlen 2048
        --device cpu|cuda --metric hessian|abs_mean --no-gptq --n-outliers 128
        --row-shards 1 --kv-bits 4|16 --kv-smooth 0.5 --kv-skip-layers 0,1|auto]
    vllm-atom eval MODEL_OR_CKPT --text FILE [--checkpoint CKPT --methods fp16,rtn,...
        --seqlen 2048 --max-tokens N --device cpu --json OUT]

Text arguments accept a file path or a name known to `vllm_atom.data.find_text`
(wiki, c4, tiny, austen, ...). Every option follows the rules of `vllm_atom.cli_args`: a
numeric option parses with a `Number` range, every option has a help text that --help
completes with its default, a bad value is one line and exit status 2, and inputs are
checked (`vllm_atom.inputs`) before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vllm_atom.cli_args import Number, Parser, error_line, existing_dir


def _text_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    from vllm_atom.data.texts import find_text

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

    skip, threshold = args.kv_skip_layers
    cfg = AtomConfig(n_outliers=args.n_outliers, row_shards=args.row_shards,
                     kv_bits=None if args.kv_bits == 16 else args.kv_bits,
                     a_clip=args.a_clip, w_clip=args.w_clip, kv_smooth=args.kv_smooth,
                     kv_rotate_k=args.kv_rotate_k, kv_center_k=args.kv_center_k and args.kv_bits == 4,
                     kv_skip_layers=skip, rotation=args.seed if args.rotate else None,
                     value_rotation=args.seed if args.rotate_values else None)
    opts = QuantizeOptions(nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                           metric=args.metric, gptq=not args.no_gptq, damp=args.damp,
                           clip_search=args.w_clip_search, seed=args.seed, kv_skip_threshold=threshold)
    report = quantize(args.model_dir, args.out_dir, _text_path(args.calib_text), cfg, opts)
    print(json.dumps(vars(report), indent=2))
    return 0


def _eval(args) -> int:
    from vllm_atom.evaluate import evaluate

    rows = evaluate(args.model, _text_path(args.text), seqlen=args.seqlen, max_tokens=args.max_tokens,
                    methods=args.methods, checkpoint=args.checkpoint, device=args.device,
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


def _methods(spec: str) -> list[str]:
    """argparse type of --methods: a comma list of `vllm_atom.evaluate.METHODS`."""
    from vllm_atom.evaluate import METHODS

    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(spec)}: not a method; choose "
                                         f"from {','.join(METHODS)}")
    return methods


def _kv_skip_arg(spec: str) -> tuple[list[int], float | None]:
    try:
        return _kv_skip_layers(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--kv-skip-layers: ")) from None


def build_parser() -> Parser:
    """Both subcommands; every option follows the rules of `vllm_atom.cli_args` (a numeric
    option takes a `Number` range, every option has a help text, --help shows defaults)."""
    ap = Parser(prog="vllm-atom", description="Atom W4A4 quantization for vLLM")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a 16-bit causal LM into an Atom checkpoint",
                       description="Quantize a 16-bit Llama / Mistral / Qwen2 model into an Atom "
                                   "checkpoint (calibration, reorder, INT8 outliers, GPTQ, key "
                                   "smoothing). On a CPU the defaults (128 x 2048 tokens) take an "
                                   "hour or more even for SmolLM2-135M; README has a quick CPU "
                                   "recipe (--nsamples 2).")
    q.add_argument("model_dir", type=existing_dir, help="16-bit HF model directory")
    q.add_argument("out_dir", help="output directory of the Atom checkpoint")
    q.add_argument("--calib-text", required=True, help="file, or wiki|c4|tiny|austen")
    q.add_argument("--nsamples", type=Number(int, lo=1), default=128,
                   help="calibration windows")
    q.add_argument("--seqlen", type=Number(int, lo=1), default=2048,
                   help="tokens per calibration window")
    q.add_argument("--device", default="cpu", help="cpu or cuda[:i] (one decoder layer at a time)")
    q.add_argument("--metric", choices=("hessian", "abs_mean"), default="hessian",
                   help="input channel salience for the reorder")
    q.add_argument("--no-gptq", action="store_true", help="round-to-nearest weights")
    q.add_argument("--damp", type=Number(float, 0, 1), default=0.01,
                   help="GPTQ dampening, a fraction of the Hessian's mean diagonal")
    q.add_argument("--n-outliers", type=Number(int, lo=0, multiple_of=16), default=128,
                   help="INT8 outlier input channels per linear")
    q.add_argument("--row-shards", type=Number(int, lo=1), default=1,
                   help="TP size for o_proj/down_proj")
    q.add_argument("--kv-bits", type=int, choices=(4, 16), default=4, help="KV cache bits")
    q.add_argument("--a-clip", type=Number(float, 0, 1, lo_open=True), default=0.9,
                   help="activation clip ratio")
    q.add_argument("--w-clip", type=Number(float, 0, 1, lo_open=True), default=0.85,
                   help="weight clip ratio")
    q.add_argument("--w-clip-search", action="store_true",
                   help="choose each weight group's clip ratio (0.6-1.0) by its rounding error, "
                        "weighted by the input's second moments, instead of --w-clip")
    q.add_argument("--rotate", action="store_true",
                   help="fold a random Hadamard rotation of the residual stream into the weights first "
                        "(QuaRot's R1; norms folded, lm_head untied; the checkpoint runs as usual)")
    q.add_argument("--rotate-values", action="store_true",
                   help="fold a random Hadamard rotation of each attention head's values into v_proj "
                        "and o_proj first (QuaRot's R2: the INT4 value cache and o_proj's input are "
                        "quantized in the rotated basis; the checkpoint runs as usual)")
    q.add_argument("--kv-smooth", type=Number(float, 0, 1), default=0.5,
                   help="key smoothing exponent folded into q_proj/k_proj (0 = off)")
    q.add_argument("--kv-rotate-k", action=argparse.BooleanOptionalAction, default=True,
                   help="store INT4 keys in a per-head Hadamard basis (queries rotated to match; "
                        "AtomConfig.kv_rotate_k)")
    q.add_argument("--kv-center-k", action=argparse.BooleanOptionalAction, default=False,
                   help="store INT4 keys minus their calibration mean per (kv head, channel) "
                        "(AtomConfig.kv_center_k; the INT4 cache write subtracts it)")
    q.add_argument("--kv-skip-layers", type=_kv_skip_arg, default="",
                   help="comma list of layers whose KV cache stays 16-bit (serve with vLLM's "
                        "--kv-cache-dtype-skip-layers), e.g. 0,1; 'auto' (or auto=THRESHOLD) "
                        "also keeps every layer whose attention output INT4 K/V change by more "
                        "than THRESHOLD (relative L2, default 0.5) on the calibration data")
    q.add_argument("--seed", type=Number(int, lo=0), default=0,
                   help="seed of the calibration window choice (and of the --rotate / --rotate-values rotations)")
    q.set_defaults(fn=_quantize, parser=q)

    e = sub.add_parser("eval", help="perplexity / KL / top-1 of simulated quantization",
                       description="Perplexity, KL and top-1 agreement of simulated Atom "
                                   "quantization. Every method is one more forward pass per "
                                   "window; on a CPU, a few thousand tokens take minutes (README).")
    e.add_argument("model", type=existing_dir, help="16-bit model dir, or an Atom checkpoint")
    e.add_argument("--text", required=True, help="file, or wiki|c4|tiny|austen")
    e.add_argument("--checkpoint", type=existing_dir, default=None,
                   help="Atom checkpoint (reorder + GPTQ weights)")
    e.add_argument("--methods", "--method", type=_methods, default=None,
                   help="comma list of fp16,rtn,outliers-fp16,outliers-int8,group128,clip,atom,"
                        "atom-kv4 (default: fp16,rtn and, with --checkpoint, all the others)")
    e.add_argument("--seqlen", type=Number(int, lo=2), default=2048, help="tokens per window")
    e.add_argument("--max-tokens", type=Number(int, lo=2), default=None,
                   help="evaluate the N // --seqlen windows at the start of the text "
                        "(default: the whole text)")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    e.add_argument("--model-name", default=None, help="model name in the result rows")
    e.add_argument("--pipeline", choices=("fp32", "16bit"), default="fp32",
                   help="unquantized ops in fp32 (rounding only where the runtime quantizes) or in the "
                        "model's 16-bit dtype, as vLLM computes them")
    e.add_argument("--json", default=None, help="merge rows into this JSON list")
    e.set_defaults(fn=_eval, parser=e)
    return ap


def _check_combinations(args) -> None:
    """Rules that need two options (parse time, one-line error)."""
    ap = args.parser
    if args.cmd == "eval" and args.max_tokens is not None and args.max_tokens < args.seqlen:
        ap.error(f"argument --max-tokens: {args.max_tokens} is smaller than --seqlen "
                 f"{args.seqlen} (one window)")
    if args.cmd == "quantize" and args.kv_skip_layers[1] is not None and args.kv_bits != 4:
        ap.error("argument --kv-skip-layers: auto picks layers to keep out of an INT4 KV "
                 "cache; it needs --kv-bits 4")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_combinations(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vllm_atom.inputs import InputError

    try:
        return args.fn(args)
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"vllm-atom {args.cmd}: error: {error_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
