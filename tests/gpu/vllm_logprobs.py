"""Prompt logprobs of token windows through vLLM (run in its own process by the GPU tests).

    python tests/gpu/vllm_logprobs.py CKPT IDS.json OUT.json [--enforce-eager] [--kv-cache-dtype D]
        [--attention-backend B] [--max-num-batched-tokens N] [--max-num-seqs N] [--tensor-parallel-size N]
        [--greedy-tokens N]

IDS.json: a list of token-id lists. OUT.json: per window, for positions 1.., the logprob
vLLM gives the actual next token and vLLM's own top-1 token id, plus the run's settings, the
greedy continuations (--greedy-tokens) and the linears whose quantization the fusion pass fused
(`vllm_atom.serve.fusion.REPLACED`; empty unless the engine ran in this process,
VLLM_ENABLE_V1_MULTIPROCESSING=0).
CUDA graphs and torch.compile stay on (vLLM's defaults) unless --enforce-eager.
With --tensor-parallel-size > 1 the all-reduce is NCCL's with NVLink multicast off
(the GPU machines forbid multicast; vLLM's symmetric-memory all-reduce would use it).
"""

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("ids")
    ap.add_argument("out")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--kv-cache-dtype-skip-layers", nargs="*", default=[])
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--greedy-tokens", type=int, default=0,
                    help="also generate this many tokens greedily after each window's first 32")
    args = ap.parse_args()
    if args.tensor_parallel_size > 1:
        os.environ["VLLM_ALLREDUCE_USE_SYMM_MEM"] = "0"
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = json.load(open(args.ids))
    t0 = time.time()
    llm = LLM(model=args.ckpt, dtype=args.dtype, max_model_len=max(len(w) for w in windows) + 16,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              kv_cache_dtype=args.kv_cache_dtype, attention_backend=args.attention_backend,
              kv_cache_dtype_skip_layers=args.kv_cache_dtype_skip_layers,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.max_num_seqs, tensor_parallel_size=args.tensor_parallel_size,
              enable_prefix_caching=False, seed=0)
    load_s = time.time() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    gen_s = time.time() - t0
    result = {"settings": vars(args), "load_s": load_s, "generate_s": gen_s, "windows": []}
    for w, out in zip(windows, outs):
        lp, top1 = [], []
        for pos, d in enumerate(out.prompt_logprobs[1:], start=1):
            lp.append(d[w[pos]].logprob)
            top1.append(next(t for t, v in d.items() if v.rank == 1))
        result["windows"].append({"logprob": lp, "top1": top1})
    if args.greedy_tokens:
        greedy = SamplingParams(max_tokens=args.greedy_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w[:32]) for w in windows], greedy, use_tqdm=False)
        result["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
    from vllm_atom.serve import fusion
    result["fused"] = dict(fusion.REPLACED)  # filled when the engine runs in this process
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(f"vllm_logprobs: {len(windows)} windows, load {load_s:.0f} s, generate {gen_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
    # The results are on disk. Skip interpreter teardown: once in ~20 runs on the H100 the engine
    # core's threads aborted there ("terminate called without an active exception", SIGABRT)
    # after a complete, correct run.
    os._exit(0)
