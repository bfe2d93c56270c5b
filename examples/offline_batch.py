"""Offline batch generation with an Atom checkpoint: a prompts file in, JSONL out.

    python examples/offline_batch.py CKPT prompts.txt out.jsonl [--max-tokens 128]

prompts.txt holds one prompt per line. Each output line is
{"prompt": ..., "text": ..., "tokens": n}. The checkpoint's config.json selects the atom
method; --quantization atom is implied.
"""

import argparse
import json

from vllm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    args = ap.parse_args()

    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    llm = LLM(model=args.checkpoint, quantization="atom", max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    outputs = llm.generate(prompts, params)
    with open(args.out, "w", encoding="utf-8") as f:
        for out in outputs:
            gen = out.outputs[0]
            f.write(json.dumps({"prompt": out.prompt, "text": gen.text, "tokens": len(gen.token_ids)}) + "\n")
    print(f"wrote {len(outputs)} completions to {args.out}")


if __name__ == "__main__":
    main()
