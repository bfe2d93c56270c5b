"""Accuracy of simulated Atom quantization: perplexity, KL to the 16-bit model, top-1 agreement.

The simulation uses the runtime's quantization points and numerics (see
`vllm_atom.simulate`): every quantized linear quantizes its input per token on
the fly; the KV cache is INT4 per (token, head), quantized after RoPE where vLLM writes it.

Methods (Atom's ablation ladder, each step adds one thing to the previous):

==============  ==============================================================================
fp16            the 16-bit model (weights as stored, computed in fp32)
rtn             W4A4 round-to-nearest, per output channel / per token, no reorder, no clip
outliers-fp16   + reorder; the 128 (64 for K=576) most salient input channels kept in 16 bit
outliers-int8   + those outlier channels in INT8 (per token / per output row)
group128        + INT4 groups of 128 channels instead of whole rows
clip            + clipping (activations 0.9, weights 0.85): Atom W4A4 with RTN weights
atom            + GPTQ: the checkpoint's weights (Atom W4A4)
atom-kv4        + INT4 KV cache (Atom W4A4KV4)
==============  ==============================================================================

Every step after ``rtn`` takes its reorder index (and row shards) from an Atom checkpoint
(``checkpoint=``); ``atom``/``atom-kv4`` take its weights too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from vllm_atom import reference as ref
from vllm_atom.checkpoint import is_atom_checkpoint, load_checkpoint
from vllm_atom.config import AtomConfig
from vllm_atom.format import (KEY_CENTER, LAYERS_PREFIX, LINEAR_PATHS, QUANTIZED_LINEARS, ROW_PARALLEL_LINEARS,
                              check_key_center, check_linear_tensors, linear_layout, split_shards)
from vllm_atom.inputs import InputError, check_supported, read_model_config
from vllm_atom.simulate import (ActScheme, SimLinear, SimState, fake_quantize_weight, set_kv_bits,
                                use_sim_attention, wrap_linears)

METHODS = ("fp16", "rtn", "outliers-fp16", "outliers-int8", "group128", "clip", "atom", "atom-kv4")
LABELS = {
    "fp16": "FP16",
    "rtn": "RTN W4A4 (per-channel / per-token)",
    "outliers-fp16": "+ 128 outlier channels in 16 bit (reorder)",
    "outliers-int8": "+ outliers INT8",
    "group128": "+ group size 128",
    "clip": "+ clipping (a 0.9, w 0.85)",
    "atom": "+ GPTQ = Atom W4A4",
    "atom-kv4": "+ KV cache INT4 = Atom W4A4KV4",
}
# method -> (outliers, group_size, a_clip, w_clip) for the RTN steps
_RTN_STEPS = {
    "outliers-fp16": ("fp", None, 1.0, 1.0),
    "outliers-int8": ("int8", None, 1.0, 1.0),
    "group128": ("int8", 128, 1.0, 1.0),
    "clip": ("int8", 128, None, None),  # None: the checkpoint's a_clip / w_clip
}


def eval_windows(tokenizer, text_path, seqlen: int, max_tokens: Optional[int] = None) -> torch.Tensor:
    """[n, seqlen] consecutive windows from the start of the text (no special tokens).

    n = max_tokens // seqlen, or every whole window of the text if max_tokens is None.
    """
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    if max_tokens is not None and max_tokens < seqlen:
        raise ValueError(f"--max-tokens {max_tokens} is smaller than --seqlen {seqlen}")
    nchars = len(text) if max_tokens is None else max(max_tokens * 8, 1 << 16)
    while True:
        ids = tokenizer(text[:nchars], add_special_tokens=False)["input_ids"]
        if max_tokens is None or len(ids) > max_tokens or nchars >= len(text):
            break
        nchars *= 2
    n = len(ids) // seqlen
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    if n < 1:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen]).view(n, seqlen)


class SimModel:
    """A causal LM whose decoder linears are `SimLinear`s, with one state per method."""

    def __init__(self, model, io_dtype: torch.dtype):
        self.model = model
        self.io_dtype = io_dtype
        self.layers = list(model.model.layers)
        self.linears: list[dict[str, SimLinear]] = []
        for layer in self.layers:
            sims = wrap_linears(layer, [LINEAR_PATHS[m] for m in QUANTIZED_LINEARS], io_dtype)
            self.linears.append({m: sims[LINEAR_PATHS[m]] for m in QUANTIZED_LINEARS})
        use_sim_attention(model)
        self.states: dict[str, list[dict[str, SimState]]] = {}
        self.kv: dict[str, Optional[int]] = {}
        self.kv_skip: dict[str, tuple] = {}
        self.kv_rotate_k: dict[str, bool] = {}
        self.kv_center: dict[str, Optional[list]] = {}
        self.has_fp_weights = True

    def add_method(self, method: str, states: Optional[list], kv_bits: Optional[int] = None,
                   kv_skip_layers: Sequence[int] = (), kv_rotate_k: bool = False,
                   kv_center: Optional[list] = None) -> None:
        """kv_center: per layer the key center (fp32 [kv_heads, head_dim]) or None, or None."""
        self.states[method] = states
        self.kv[method] = kv_bits
        self.kv_skip[method] = tuple(kv_skip_layers)
        self.kv_rotate_k[method] = kv_rotate_k
        self.kv_center[method] = kv_center

    def activate(self, method: str) -> None:
        states = self.states[method]
        for i, lins in enumerate(self.linears):
            for m, lin in lins.items():
                lin.state = None if states is None else states[i][m]
        for i, layer in enumerate(self.layers):
            kv = None if i in self.kv_skip[method] else self.kv[method]
            center = self.kv_center[method][i] if self.kv_center[method] else None
            set_kv_bits([layer.self_attn], kv, self.io_dtype, self.kv_rotate_k[method], center)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return self.model(ids[None].to(dev), use_cache=False).logits[0].float()


def load_model(path, device="cpu"):
    """(fp32 model on device, io dtype). An Atom checkpoint loads its unquantized tensors only;
    its linears keep placeholder weights until `checkpoint_states` fills their states."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_atom_checkpoint(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
        io_dtype = next(model.parameters()).dtype
        return model.to(device, torch.float32).eval(), io_dtype
    hf = AutoConfig.from_pretrained(str(path))
    io_dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float16
    if isinstance(io_dtype, str):
        io_dtype = getattr(torch, io_dtype)
    del hf.quantization_config
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    _, _, tensors = load_checkpoint(path)
    plain = {k: v for k, v in tensors.items() if k in dict(model.state_dict())}
    missing, _ = model.load_state_dict(plain, strict=False)
    quantized = {f"{LAYERS_PREFIX}.{i}.{LINEAR_PATHS[m]}.weight"
                 for i in range(hf.num_hidden_layers) for m in QUANTIZED_LINEARS}
    missing = [k for k in missing if k not in quantized
               and not (k == "lm_head.weight" and getattr(hf, "tie_word_embeddings", False))]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:5]}")
    if getattr(hf, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(device).eval(), io_dtype


def checkpoint_states(sim: SimModel, ckpt_dir, device="cpu") -> tuple[AtomConfig, list]:
    """Per-layer SimStates holding the checkpoint's weights, exactly as stored."""
    cfg, states, _ = checkpoint_model(sim, ckpt_dir, device)
    return cfg, states


def checkpoint_model(sim: SimModel, ckpt_dir, device="cpu") -> tuple[AtomConfig, list, Optional[list]]:
    """(config, `checkpoint_states`, per-layer key centers: fp32 [kv_heads, head_dim] for the
    INT4-KV layers of a ``kv_center_k`` checkpoint, else None; None without kv_center_k)."""
    cfg, _, tensors = load_checkpoint(ckpt_dir)
    centers = None
    if cfg.kv_center_k:
        centers = []
        for i, layer in enumerate(sim.layers):
            if cfg.kv_bits_for(i) != 4:
                centers.append(None)
                continue
            name = f"{LAYERS_PREFIX}.{i}.{KEY_CENTER}"
            d = layer.self_attn.head_dim
            check_key_center(name, tensors.get(name), sim.linears[i]["k_proj"].out_features // d, d)
            centers.append(tensors[name].to(device))
    states = []
    for i, lins in enumerate(sim.linears):
        layer_states = {}
        for m, lin in lins.items():
            name = f"{LAYERS_PREFIX}.{i}.{LINEAR_PATHS[m]}"
            shards = cfg.row_shards if m in ROW_PARALLEL_LINEARS else 1
            lay = linear_layout(lin.in_features, lin.out_features, cfg, shards)
            check_linear_tensors(name, tensors, lay)
            t = {k: tensors[f"{name}.{k}"] for k in ("qweight", "w_scale", "w_outlier", "w_outlier_scale")}
            parts = [ref.dequantize_weight(ref.QuantizedWeight.from_packed(shard))
                     for shard in split_shards(t, lay)]
            index = tensors[f"{name}.reorder_index"].to(device, torch.long)
            act = ActScheme(index, shards, lay.n_outliers, cfg.group_size, cfg.a_clip, "int8")
            bias = tensors.get(f"{name}.bias")
            layer_states[m] = SimState(act, torch.cat(parts, 1).to(device),
                                       None if bias is None else bias.to(device, torch.float32))
        states.append(layer_states)
    return cfg, states, centers


def ladder_states(sim: SimModel, method: str, atom_states: Optional[list], cfg: Optional[AtomConfig]):
    """SimStates of an RTN ladder step, from the FP weights (and the checkpoint's reorder)."""
    states = []
    for i, lins in enumerate(sim.linears):
        layer_states = {}
        for m, lin in lins.items():
            w = lin.weight.float()
            if method == "rtn":
                act = ActScheme(torch.arange(w.shape[1], device=w.device), 1, 0, None, 1.0, "int8")
                w_clip = 1.0
            else:
                if atom_states is None:
                    raise ValueError(f"method {method!r} needs the reorder of an Atom checkpoint "
                                     f"(--checkpoint)")
                outliers, group, a_clip, w_clip = _RTN_STEPS[method]
                a = atom_states[i][m].act
                act = ActScheme(a.index, a.shards, a.n_outliers, group,
                                cfg.a_clip if a_clip is None else a_clip, outliers)
                w_clip = cfg.w_clip if w_clip is None else w_clip
            layer_states[m] = SimState(act, fake_quantize_weight(w, act, w_clip))
        states.append(layer_states)
    return states


def _rotated(ckpt, field: str = "rotation") -> bool:
    """Whether the checkpoint's quantization_config records a rotation (``rotation``: --rotate,
    ``value_rotation``: --rotate-values)."""
    q = read_model_config(ckpt, "checkpoint directory").get("quantization_config") or {}
    return q.get(field) is not None


def check_eval_inputs(model_path, checkpoint, seqlen: int, max_tokens: Optional[int],
                      methods: Optional[Sequence[str]], pipeline: str) -> tuple:
    """Fail before the model loads: ValueError / InputError on bad arguments or directories.

    Returns (the Atom checkpoint to read, or None; whether ``model_path`` is that checkpoint).
    """
    if pipeline not in ("fp32", "16bit"):
        raise ValueError(f"pipeline must be 'fp32' or '16bit', got {pipeline!r}")
    if seqlen < 2 or (max_tokens is not None and max_tokens < 2):
        raise ValueError(f"--seqlen {seqlen} / --max-tokens {max_tokens}: need at least 2 tokens "
                         f"(one prediction) per window")
    check_supported(model_path, read_model_config(model_path))
    if checkpoint is not None:
        read_model_config(checkpoint, "checkpoint directory")
        if not is_atom_checkpoint(checkpoint):
            raise InputError(f"{checkpoint}: not an Atom checkpoint (config.json has no "
                             f"quantization_config with quant_method 'atom')")
    ckpt_only = is_atom_checkpoint(model_path)
    if checkpoint is not None and not ckpt_only and _rotated(checkpoint):
        raise InputError(f"{checkpoint}: quantized with --rotate, so its linears only fit its own (rotated) "
                         f"embeddings and norms; evaluate it on its own: vllm-atom eval {checkpoint}")
    if ckpt_only:
        if checkpoint is not None:
            raise ValueError("give either an Atom checkpoint as MODEL or --checkpoint, not both")
        checkpoint = model_path
    for m in methods or ():
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if m in _RTN_STEPS and checkpoint is not None and _rotated(checkpoint, "value_rotation"):
            raise InputError(f"{checkpoint}: quantized with --rotate-values, so its o_proj reorder belongs to "
                             f"the rotated values; method {m!r} would apply it to the 16-bit model's o_proj "
                             f"(use fp16, rtn, atom, atom-kv4)")
        if m in ("atom", "atom-kv4") and checkpoint is None:
            raise ValueError(f"method {m!r} needs an Atom checkpoint (--checkpoint)")
        if m in _RTN_STEPS and checkpoint is None:
            raise ValueError(f"method {m!r} needs the reorder of an Atom checkpoint (--checkpoint)")
    return checkpoint, ckpt_only


def choose_methods(methods: Optional[Sequence[str]], ckpt_only: bool, cfg: Optional[AtomConfig],
                   atom: Optional[list]) -> list[str]:
    """``methods``, or by default every method the inputs allow; ValueError for one they do not.

    cfg, atom: the checkpoint's config and `checkpoint_states` (None without a checkpoint).
    """
    if methods is None:
        if ckpt_only:
            methods = ["atom-kv4" if cfg.kv_bits == 4 else "atom"]
        else:
            methods = ["fp16", "rtn"] + ([m for m in METHODS[2:]] if atom is not None else [])
            if cfg is not None and cfg.value_rotation is not None:  # (see check_eval_inputs)
                methods = [m for m in methods if m not in _RTN_STEPS]
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if ckpt_only and m not in ("atom", "atom-kv4"):
            raise ValueError(f"method {m!r} needs the 16-bit model; give it as MODEL and the "
                             f"checkpoint as --checkpoint")
        if m in ("atom", "atom-kv4") and atom is None:
            raise ValueError(f"method {m!r} needs an Atom checkpoint (--checkpoint)")
    return methods


def add_methods(sim: SimModel, methods: Sequence[str], ckpt_only: bool, cfg: Optional[AtomConfig],
                atom: Optional[list], centers: Optional[list] = None) -> None:
    """Give ``sim`` the states of each method (``fp16`` as well, the reference for KL and
    top-1, unless the model is a checkpoint)."""
    if not ckpt_only:
        sim.add_method("fp16", None)
    for m in methods:
        if m == "atom":
            sim.add_method(m, atom)
        elif m == "atom-kv4":
            sim.add_method(m, atom, 4, cfg.kv_skip_layers, cfg.kv_rotate_k, centers)
        elif m != "fp16":
            sim.add_method(m, ladder_states(sim, m, atom, cfg))


def next_token_logp(sim: SimModel, method: str, ids: torch.Tensor) -> torch.Tensor:
    """fp32 [seqlen - 1, vocab] log-probabilities of each next token of ``ids`` ([seqlen]
    token ids) under ``method``."""
    sim.activate(method)
    return torch.log_softmax(sim.logits(ids)[:-1].float(), -1)


def add_window(a: dict, logp: torch.Tensor, target: torch.Tensor,
               logp_fp: Optional[torch.Tensor]) -> None:
    """Add one window to one method's totals ``a``: its NLL, and with ``logp_fp`` (the fp16
    method's `next_token_logp`) its KL and top-1 matches. logp: fp32 [seqlen - 1, vocab];
    target: int64 [seqlen - 1] next token ids."""
    nll = -float(logp.gather(1, target[:, None]).sum())
    a["nll"] += nll
    a["window_nll"].append(round(nll, 4))
    if logp_fp is not None:
        a["kl"] += float((logp_fp.exp() * (logp_fp - logp)).sum())
        a["top1"] += int((logp.argmax(-1) == logp_fp.argmax(-1)).sum())


def score_windows(sim: SimModel, windows: torch.Tensor, methods: Sequence[str], ckpt_only: bool,
                  device: str, progress: bool) -> tuple[dict, int]:
    """Run every method on each of ``windows`` ([n, seqlen] token ids).

    Returns (per method: summed ``nll``, ``kl`` and ``top1`` over all predictions and the
    ``window_nll`` list; the number of predictions, n * (seqlen - 1)).
    """
    from tqdm.auto import tqdm

    acc = {m: {"nll": 0.0, "kl": 0.0, "top1": 0, "window_nll": []} for m in methods}
    n_pred = 0
    bar = tqdm(windows, desc="atom eval", unit="window", disable=not progress)
    for ids in bar:
        target = ids[1:].to(device)
        logp_fp = None if ckpt_only else next_token_logp(sim, "fp16", ids)
        for m in methods:
            logp = logp_fp if m == "fp16" and logp_fp is not None else next_token_logp(sim, m, ids)
            add_window(acc[m], logp, target, logp_fp)
        n_pred += ids.numel() - 1
        if "atom-kv4" in acc:
            bar.set_postfix(ppl_atom_kv4=f"{math.exp(acc['atom-kv4']['nll'] / n_pred):.3f}")
    return acc, n_pred


def result_rows(sim: SimModel, methods: Sequence[str], acc: dict, n_pred: int, ckpt_only: bool, *,
                model: str, text: str, seqlen: int, tokens: int, pipeline: str,
                seconds: float) -> list[dict]:
    """One result row per method from `score_windows`' totals (see `evaluate`)."""
    rows = []
    for m in methods:
        a = acc[m]
        rows.append({
            "model": model,
            "method": m,
            "label": LABELS[m],
            "text": text,
            "seqlen": seqlen,
            "tokens": tokens,
            "predicted_tokens": n_pred,
            "ppl": round(math.exp(a["nll"] / n_pred), 4),
            "kl": None if ckpt_only else round(a["kl"] / n_pred, 5),
            "top1": None if ckpt_only else round(a["top1"] / n_pred, 4),
            "kv_bits": sim.kv[m],
            **({"kv_skip_layers": list(sim.kv_skip[m])} if sim.kv_skip[m] else {}),
            **({"kv_rotate_k": True} if sim.kv[m] == 4 and sim.kv_rotate_k[m] else {}),
            **({"kv_center_k": True} if sim.kv[m] == 4 and sim.kv_center[m] else {}),
            "pipeline": pipeline,
            "seconds_total": seconds,
            "window_nll": a["window_nll"],
        })
    return rows


def evaluate(model_path, text, seqlen: int = 2048, max_tokens: Optional[int] = None,
             methods: Optional[Sequence[str]] = None, checkpoint=None, device: str = "cpu",
             model_name: Optional[str] = None, text_name: Optional[str] = None,
             progress: bool = True, pipeline: str = "fp32") -> list[dict]:
    """Evaluate ``methods`` on ``text``; one result row per method.

    ``pipeline``: "fp32" computes the unquantized ops (norms, RoPE, attention, residuals) in
    fp32 and rounds only where the runtime quantizes; "16bit" computes them in the model's
    16-bit dtype, as vLLM does. INT4 rounding turns 1-ulp differences into whole steps, so the
    two differ by a few percent of perplexity on small models (docs/accuracy.md).

    ``model_path`` is the 16-bit model (then ``checkpoint`` supplies reorder and GPTQ
    weights for the ladder steps that need them) or an Atom checkpoint (then the only
    method is the checkpoint itself, ``atom`` or ``atom-kv4`` by its kv_bits, and KL /
    top-1 are not available).

    Each row also holds ``window_nll``: the summed NLL of every window (seqlen - 1
    predictions each), in window order, for paired comparisons (`paired_ppl_ratio`).
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    checkpoint, ckpt_only = check_eval_inputs(model_path, checkpoint, seqlen, max_tokens, methods,
                                              pipeline)
    model, io_dtype = load_model(model_path, device)
    sim = SimModel(model, io_dtype)
    cfg = atom = centers = None
    if checkpoint is not None:
        cfg, atom, centers = checkpoint_model(sim, checkpoint, device)
    methods = choose_methods(methods, ckpt_only, cfg, atom)
    add_methods(sim, methods, ckpt_only, cfg, atom, centers)
    if pipeline == "16bit":
        model.to(io_dtype)

    tok = AutoTokenizer.from_pretrained(str(model_path))
    windows = eval_windows(tok, text, seqlen, max_tokens)
    acc, n_pred = score_windows(sim, windows, methods, ckpt_only, device, progress)
    return result_rows(sim, methods, acc, n_pred, ckpt_only,
                       model=model_name or Path(model_path).name, text=text_name or Path(text).name,
                       seqlen=seqlen, tokens=int(windows.numel()), pipeline=pipeline,
                       seconds=round(time.time() - t0, 1))


def paired_ppl_ratio(window_nll_a: Sequence[float], window_nll_b: Sequence[float],
                     predictions_per_window: int) -> dict:
    """Perplexity of A relative to B over the same windows, with its noise.

    ``window_nll_*``: summed NLL per window (same windows, same order, ``predictions_per_window``
    predictions each). Returns ``rel`` = ppl_A / ppl_B - 1 and ``rel_se``, the standard error
    of that ratio from the spread of the per-window log ratios (delta method; 0 for one
    window). Two pipelines that differ only in rounding make INT4 round differently and
    disagree window by window; ``rel_se`` says how far apart that alone moves them.
    """
    if len(window_nll_a) != len(window_nll_b) or not window_nll_a:
        raise ValueError(f"need the same non-zero number of windows, got {len(window_nll_a)} "
                         f"and {len(window_nll_b)}")
    d = torch.tensor([(a - b) / predictions_per_window for a, b in zip(window_nll_a, window_nll_b)],
                     dtype=torch.float64)
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"rel": math.exp(mean) - 1, "rel_se": math.exp(mean) * se, "windows": len(d)}
