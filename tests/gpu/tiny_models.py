"""Tiny random Llama / Qwen2 checkpoints with injected activation outliers, for GPU e2e tests.

The tokenizer is taken from a directory made by the device bundle's make_tiny_llama.py
(a byte-level BPE trained offline). Outlier channels are injected by scaling a few
channels of every RMSNorm weight (so q/k/v and gate/up inputs carry them), and lm_head is
scaled so that the next-token distribution is peaked enough for top-1 comparisons.
"""

from __future__ import annotations

import glob
import os
import shutil
import sysconfig

import torch


def stdlib_text(out_path: str, first: int, count: int) -> str:
    """Concatenate ``count`` Python stdlib sources (sorted, from index ``first``) into a file."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[first:first + count]
    with open(out_path, "w", encoding="utf-8") as f:
        for p in files:
            with open(p, encoding="utf-8", errors="replace") as src:
                f.write(src.read())
    return out_path


def make_tiny(out: str, tokenizer_dir: str, arch: str = "llama", hidden: int = 512, layers: int = 4,
              heads: int = 8, kv_heads: int = 4, intermediate: int = 1536, outlier_channels: int = 6,
              outlier_gain: float = 25.0, logit_gain: float = 8.0, branch_gain: float = 1.0,
              qk_gain: float = 1.0, emb_gain: float = 1.0, seed: int = 0) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # Qwen2: q/k/v have biases
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    else:
        raise ValueError(arch)
    with torch.no_grad():
        ch = torch.randperm(hidden)[:outlier_channels]
        for layer in model.model.layers:
            layer.input_layernorm.weight[ch] *= outlier_gain
            layer.post_attention_layernorm.weight[ch] *= outlier_gain
            layer.self_attn.q_proj.weight *= qk_gain
            layer.self_attn.k_proj.weight *= qk_gain
            layer.self_attn.o_proj.weight *= branch_gain
            layer.mlp.down_proj.weight *= branch_gain
        model.lm_head.weight *= logit_gain
        model.model.embed_tokens.weight *= emb_gain
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def fresh_dir(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path
