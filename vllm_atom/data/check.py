"""Quick sanity check of a converted checkpoint (CPU or GPU, plain transformers): `quick_check`."""

from __future__ import annotations

import time
from typing import Optional

from vllm_atom.data.packages import PathLike
from vllm_atom.data.texts import find_text


def quick_check(
    model_dir: PathLike,
    *,
    text: PathLike = "wiki",
    seqlen: int = 1024,
    chunks: int = 4,
    prompt: str = "The capital of France is",
    max_new_tokens: int = 24,
    device: Optional[str] = None,
) -> dict:
    """Greedy-generate from ``prompt`` and measure perplexity on a text prefix.

    The perplexity is `vllm_atom.evaluate`'s for the 16-bit model (fp32 compute) over
    ``chunks`` windows of ``seqlen`` tokens from the start of the text. Returns
    ``{"generation", "ppl", "tokens", "seconds", "dtype"}``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").to(device).eval()
    if device == "cpu" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        model = model.float()  # half-precision matmuls are slow on CPU

    enc = tok(prompt, return_tensors="pt").to(device)
    with torch.no_grad():
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
        )
    generation = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    from vllm_atom.evaluate import evaluate

    dtype = str(next(model.parameters()).dtype)
    del model  # evaluate loads its own fp32 copy
    row = evaluate(model_dir, find_text(text), seqlen=seqlen, max_tokens=chunks * seqlen,
                   methods=["fp16"], device=device, progress=False)[0]
    return {
        "generation": generation,
        "ppl": row["ppl"],
        "tokens": row["predicted_tokens"],
        "seconds": round(time.time() - t0, 2),
        "dtype": dtype,
    }

