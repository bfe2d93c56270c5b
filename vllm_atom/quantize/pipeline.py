"""The offline Atom quantizer, layer by layer.

Read in order: `check_model_dir` and `calibration_batches` fail fast on bad input;
`quantize` loads the model on CPU, captures the inputs of decoder layer 0, then for each
decoder layer (copied to ``device`` in fp32, one at a time) runs `quantize_layer`, one
function per phase:

1. pass 1, unquantized layer (`calibrate`): per-channel salience of each linear input
   (`calibration`) and the key channel-pair maxima, then the key smoothing folded into q/k
   (`smooth`); with INT4 KV, the attention output error it causes (`choose_kv_bits`,
   `kv_sensitivity`), which keeps the layer's KV 16-bit if over ``kv_skip_threshold``
   (``--kv-skip-layers auto``);
2. `reorder`: one index per input (q/k/v share one, gate/up share one), outliers last;
3. pass 2, quantized activations (and INT4 KV if configured), unquantized weights
   (`gptq_hessians`): one GPTQ Hessian per input, for all 7 linears in the same pass;
4. GPTQ (or RTN) per linear and shard -> checkpoint tensors (`quantize_linears`,
   `vllm_atom.format`);
5. pass 3, fully quantized layer (`quantized_outputs`): its outputs are the next layer's
   inputs.

Embeddings, norms, lm_head and biases are written unquantized, in the model dtype (q/k
biases after the key smoothing).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from vllm_atom import reference as ref
from vllm_atom.checkpoint import CheckpointWriter
from vllm_atom.config import AtomConfig
from vllm_atom.format import (KEY_CENTER, LAYERS_PREFIX, LINEAR_PATHS, QUANTIZED_LINEARS, ROW_PARALLEL_LINEARS,
                              check_linear_tensors, join_shards, linear_layout)
from vllm_atom.inputs import InputError, check_supported, read_model_config
from vllm_atom.quantize.calibration import ChannelStats, HessianAccumulator
from vllm_atom.quantize.gptq import gptq_quantize, rtn_quantize
from vllm_atom.quantize.key_center import KeyMean
from vllm_atom.quantize.kv_sensitivity import kv4_attention_error
from vllm_atom.quantize.reorder import input_groups, reorder_index
from vllm_atom.quantize.rotate import rotate_model, rotate_values
from vllm_atom.quantize.smooth import KeyPairMax, fold_key_smoothing, smoothing_factors
from vllm_atom.simulate import (ActScheme, SimLinear, SimState, permute_columns, run_layer,
                                set_kv_bits, use_sim_attention, wrap_linears)

log = logging.getLogger(__name__)



@dataclass
class QuantizeOptions:
    """How to calibrate (what to produce is `AtomConfig`)."""

    nsamples: int = 128
    seqlen: int = 2048
    device: str = "cpu"
    metric: str = "hessian"          # or "abs_mean"
    gptq: bool = True
    damp: float = 0.01
    block_size: int = 128
    clip_search: bool = False  # per-group weight clip ratio searched (gptq.searched_group_scale)
    seed: int = 0
    max_shard_bytes: int = 2 << 30
    # keep a layer's KV cache 16-bit when INT4 K/V change its attention output by more than
    # this relative L2 error (`kv_sensitivity`); None: only AtomConfig.kv_skip_layers
    kv_skip_threshold: Optional[float] = None


@dataclass
class QuantizeReport:
    out_dir: str = ""
    seconds: float = 0.0
    calib_tokens: int = 0
    layers: int = 0
    fallbacks: list = field(default_factory=list)
    # per decoder layer: attention output error with INT4 K/V (None where KV is 16-bit by request)
    kv4_attention_error: list = field(default_factory=list)
    kv_skip_layers: list = field(default_factory=list)  # what the checkpoint records
    gpu_peak_gib: Optional[float] = None  # torch.cuda.max_memory_allocated on the quantizing GPU


# ---- fail fast ----

def check_model_dir(model_dir, cfg: AtomConfig):
    """The transformers config of ``model_dir``; InputError if Atom cannot quantize it."""
    from transformers import AutoConfig

    d = Path(model_dir)
    config = read_model_config(d)  # the directory, config.json, safetensors headers
    check_supported(d, config)
    if config.get("quantization_config"):
        raise InputError(f"{d}: already quantized ({config['quantization_config']}); give the "
                         f"16-bit model")
    try:
        hf = AutoConfig.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 - surface any config problem as bad input
        raise InputError(f"{d / 'config.json'}: transformers cannot read it: {e}") from e
    bad = [i for i in cfg.kv_skip_layers if i >= hf.num_hidden_layers]
    if bad:
        raise InputError(f"--kv-skip-layers {','.join(map(str, bad))}: {d} has "
                         f"{hf.num_hidden_layers} layers (0-{hf.num_hidden_layers - 1})")
    hidden, inter = hf.hidden_size, hf.intermediate_size
    head_dim = getattr(hf, "head_dim", None) or hidden // hf.num_attention_heads
    k_of = {"q_proj": hidden, "o_proj": hf.num_attention_heads * head_dim,
            "gate_proj": hidden, "down_proj": inter}
    for name, k in k_of.items():
        shards = cfg.row_shards if name in ROW_PARALLEL_LINEARS else 1
        try:
            linear_layout(k, 1, cfg, shards)
        except ValueError as e:
            raise InputError(f"{d}: {name} has {k} inputs, which Atom cannot lay out: {e}") from e
    return hf


def calibration_batches(tokenizer, text_path, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: non-overlapping windows of the text chosen at random (seeded)."""
    p = Path(text_path)
    if not p.is_file():
        raise InputError(f"calibration text {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    need = nsamples * seqlen
    # tokenize a growing prefix: enough for ~4x the windows needed, or the whole text
    nchars = max(need * 16, 1 << 16)
    while True:
        ids = tokenizer(text[:nchars], add_special_tokens=False)["input_ids"]
        if len(ids) >= 4 * need or nchars >= len(text):
            break
        nchars *= 2
    windows = len(ids) // seqlen
    if windows < nsamples:
        raise InputError(
            f"calibration text {p} has {len(ids)} tokens = {windows} windows of {seqlen}, but "
            f"--nsamples {nsamples} x --seqlen {seqlen} = {need} tokens were asked for; use a "
            f"longer text or lower --nsamples/--seqlen")
    pick = sorted(random.Random(seed).sample(range(windows), nsamples))
    t = torch.tensor(ids[: windows * seqlen]).view(windows, seqlen)
    return t[pick]


# ---- layer-0 inputs ----

class _Caught(Exception):
    def __init__(self, hidden, kwargs):
        self.hidden, self.kwargs = hidden, kwargs


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        raise _Caught(hidden_states, kwargs)


def capture_layer_inputs(model, calib: torch.Tensor, device, io_dtype):
    """Hidden states entering decoder layer 0 ([n, seqlen, hidden], io_dtype, on device)
    and the other keyword arguments the layers get (fp32, on device)."""
    layers = model.model.layers
    first = layers[0]
    layers[0] = _Catcher(first)
    inps, kwargs = [], None
    try:
        for row in calib:
            try:
                model(row[None], use_cache=False)
            except _Caught as c:
                inps.append(c.hidden[0].to(device, io_dtype))
                kwargs = c.kwargs
    finally:
        layers[0] = first

    def to_dev(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, torch.float32) if v.is_floating_point() else v.to(device)
        if isinstance(v, tuple):
            return tuple(to_dev(x) for x in v)
        return v
    kwargs = {k: to_dev(v) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
    kwargs["use_cache"] = False
    return torch.stack(inps), kwargs


# ---- one decoder layer ----

@dataclass
class LayerResult:
    tensors: dict            # checkpoint tensors of the layer's linears
    outputs: torch.Tensor    # the quantized layer's outputs = the next layer's inputs
    notes: list              # GPTQ fallbacks
    kv_bits: Optional[int]   # KV cache bits the layer was quantized (and is to be served) with
    kv4_error: Optional[float] = None  # `kv4_attention_error`, when kv_bits was 4 on entry


# the phases of `quantize_layer`, in order (``lin``: the layer's SimLinears by short name)

def layer_on_device(layer_cpu: nn.Module, device: torch.device,
                    io_dtype: torch.dtype) -> tuple[nn.Module, dict[str, SimLinear]]:
    """A copy of the decoder layer in fp32 on ``device`` with its 7 linears wrapped as
    `SimLinear`s (unquantized), and those linears by short name."""
    layer = copy.deepcopy(layer_cpu).to(device, torch.float32)
    sims = wrap_linears(layer, [LINEAR_PATHS[m] for m in QUANTIZED_LINEARS], io_dtype)
    return layer, {m: sims[LINEAR_PATHS[m]] for m in QUANTIZED_LINEARS}


def calibrate(layer: nn.Module, lin: dict[str, SimLinear], inps: torch.Tensor, kwargs: dict,
              cfg: AtomConfig, opts: QuantizeOptions, io_dtype: torch.dtype,
              center_keys: bool = False) -> tuple[dict[str, ChannelStats], Optional[torch.Tensor]]:
    """Phase 1, unquantized layer with 16-bit KV: the salience of each input, by input group
    (`ChannelStats.value`: float64 [K]); with ``cfg.kv_smooth``, also the key channel-pair
    maxima, whose smoothing is folded into q/k (their biases rounded to the model dtype); with
    ``center_keys``, the key center (`key_center`: fp32 [kv_heads, head_dim], the mean post-RoPE
    key of the smoothed layer), else None.

    inps: [n, seqlen, hidden] layer inputs in io_dtype; kwargs: the layer's other arguments.
    """
    dev = torch.device(opts.device)
    groups = input_groups()
    stats = {g: ChannelStats(lin[g].in_features, opts.metric, dev) for g in groups}
    for g in groups:
        lin[g].observer = stats[g].add
    keys = hook = None
    if cfg.kv_smooth > 0:
        d = layer.self_attn.head_dim
        keys = KeyPairMax(lin["k_proj"].out_features // d, d, dev)
        hook = lin["k_proj"].register_forward_hook(lambda mod, inp, out: keys.add(out))
    mean = None
    if center_keys:
        d = layer.self_attn.head_dim
        mean = KeyMean(lin["k_proj"].out_features // d, d, dev)
        layer.self_attn.atom_key_observer = mean.add
    set_kv_bits([layer.self_attn], None, io_dtype)
    try:
        run_layer(layer, inps, kwargs, keep=False)
    finally:
        layer.self_attn.atom_key_observer = None
    center = None if mean is None else mean.value
    if keys is not None:
        hook.remove()
        lam = smoothing_factors(keys.value, cfg.kv_smooth)
        fold_key_smoothing(lin["q_proj"], lin["k_proj"], lam)
        for m in ("q_proj", "k_proj"):  # the checkpoint stores biases in the model dtype
            if lin[m].bias is not None:
                lin[m].bias.data = lin[m].bias.data.to(io_dtype).float()
        if center is not None:  # smoothing divides each rotary pair by one factor, so its mean too
            center = center / lam.to(center)
    for g in groups:
        lin[g].observer = None  # the salience is complete
    return stats, center


def choose_kv_bits(layer: nn.Module, inps: torch.Tensor, kwargs: dict, opts: QuantizeOptions,
              io_dtype: torch.dtype, prefix: str, kv_bits: Optional[int],
              rotate_k: bool = False, k_center: Optional[torch.Tensor] = None) -> tuple[Optional[int], Optional[float]]:
    """Phase 1, with INT4 KV: (the KV bits to use, `kv4_attention_error`, keys rotated as
    ``rotate_k`` says, centered by ``k_center``). The bits become None (16-bit) if the error is over
    ``opts.kv_skip_threshold``; the error is None unless ``kv_bits`` is 4.

    layer: after `calibrate` (smoothed, unquantized); inps: [n, seqlen, hidden] in io_dtype.
    """
    if kv_bits != 4:
        return kv_bits, None
    kv4_error = kv4_attention_error(layer, inps, kwargs, io_dtype, rotate_k=rotate_k, k_center=k_center)
    if opts.kv_skip_threshold is not None and kv4_error > opts.kv_skip_threshold:
        log.info("%s: INT4 KV attention error %.3f > %.3f, KV cache kept 16-bit", prefix,
                 kv4_error, opts.kv_skip_threshold)
        kv_bits = None
    return kv_bits, kv4_error


def reorder(lin: dict[str, SimLinear], stats: dict[str, ChannelStats], cfg: AtomConfig,
            device: torch.device) -> dict[str, ActScheme]:
    """Phase 2: one `ActScheme` per input group, shared by its members and keyed by linear;
    its index (int64 [K], shard-local, on ``device``) puts each shard's outliers last."""
    scheme = {}
    for g, members in input_groups().items():
        k = lin[g].in_features
        shards = cfg.row_shards if g in ROW_PARALLEL_LINEARS else 1
        idx = reorder_index(stats[g].value, shards).to(device, torch.long)
        s = ActScheme(idx, shards, cfg.outliers_for(k // shards), cfg.group_size, cfg.a_clip, "int8")
        for m in members:
            scheme[m] = s
    return scheme


def gptq_hessians(layer: nn.Module, lin: dict[str, SimLinear], scheme: dict[str, ActScheme],
                  inps: torch.Tensor, kwargs: dict, kv_bits: Optional[int], io_dtype: torch.dtype,
                  device: torch.device, rotate_k: bool = False,
                  k_center: Optional[torch.Tensor] = None) -> dict[str, HessianAccumulator]:
    """Phase 3: the GPTQ Hessian (``.h``: fp32 [K, K], slot order) of the activations each
    input group actually sees, quantized by ``scheme`` with ``kv_bits`` KV (keys as ``rotate_k``
    and ``k_center`` say) and unquantized weights, all 7 linears in one pass over inps
    ([n, seqlen, hidden], io_dtype)."""
    groups = input_groups()
    hess = {}
    for g in groups:
        hess[g] = HessianAccumulator(lin[g].in_features, device)
        lin[g].observer = hess[g].add
    for m in QUANTIZED_LINEARS:
        lin[m].state = SimState(scheme[m], permute_columns(lin[m].weight.float(), scheme[m]))
    set_kv_bits([layer.self_attn], kv_bits, io_dtype, rotate_k, k_center)
    run_layer(layer, inps, kwargs, keep=False)
    for g in groups:
        lin[g].observer = None
    return hess


def quantize_shards(w: torch.Tensor, h: Optional[torch.Tensor], s: ActScheme, cfg: AtomConfig,
                    opts: QuantizeOptions, prefix: str, m: str, notes: list) -> list[ref.QuantizedWeight]:
    """Phase 4 for linear ``m`` of layer ``prefix``: GPTQ with Hessian h (fp32 [K, K], slot
    order), or RTN where h is None, of each row shard of w (fp32 [N, K], slot order). GPTQ
    falls back to RTN where it must; why is logged and appended to ``notes``."""
    shard_q = []
    for si, sl in s.shard_slices(w.shape[1]):
        if h is not None:
            res = gptq_quantize(w[:, sl], h[sl, sl], s.n_outliers, cfg.group_size,
                                cfg.w_clip, opts.damp, opts.block_size, opts.clip_search)
            if res.fallback:
                notes.append(f"{prefix}.{m} shard {si}: {res.fallback}")
                log.warning("%s.%s shard %d: %s", prefix, m, si, res.fallback)
            shard_q.append(res.weight)
        else:
            shard_q.append(rtn_quantize(w[:, sl], s.n_outliers, cfg.group_size, cfg.w_clip, opts.clip_search))
    return shard_q


def quantize_linears(lin: dict[str, SimLinear], scheme: dict[str, ActScheme],
                     hess: dict[str, HessianAccumulator], cfg: AtomConfig, opts: QuantizeOptions,
                     io_dtype: torch.dtype, prefix: str) -> tuple[dict, list]:
    """Phase 4: quantize every linear's weights shard by shard (GPTQ with ``hess``, or RTN
    without ``opts.gptq``); (their checkpoint tensors on CPU by full name, GPTQ fallbacks).

    Each linear's state becomes its dequantized weights (fp32 [N, K], slot order), so the
    layer runs fully quantized afterwards.
    """
    tensors, notes = {}, []
    for g, members in input_groups().items():
        h = hess[g].h if opts.gptq else None
        for m in members:
            s = scheme[m]
            w = permute_columns(lin[m].weight.float(), s)
            name = f"{prefix}.{LINEAR_PATHS[m]}"
            shard_q = quantize_shards(w, h, s, cfg, opts, prefix, m, notes)
            for key, t in join_shards([q.packed() for q in shard_q]).items():
                tensors[f"{name}.{key}"] = t.cpu()
            tensors[f"{name}.reorder_index"] = s.index.to(torch.int32).cpu()
            if lin[m].bias is not None:  # after the key smoothing, in the model dtype
                tensors[f"{name}.bias"] = lin[m].bias.detach().to(io_dtype).cpu()
            check_linear_tensors(name, tensors, linear_layout(w.shape[1], w.shape[0], cfg, s.shards))
            lin[m].state = SimState(s, torch.cat([ref.dequantize_weight(q) for q in shard_q], 1))
    return tensors, notes


def quantized_outputs(layer: nn.Module, inps: torch.Tensor, kwargs: dict, kv_bits: Optional[int],
                      io_dtype: torch.dtype, rotate_k: bool = False,
                      k_center: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Phase 5: the fully quantized layer's outputs ([n, seqlen, hidden] in inps' dtype),
    with ``kv_bits`` KV (keys rotated as ``rotate_k`` says, centered by ``k_center``): the next
    layer's inputs."""
    set_kv_bits([layer.self_attn], kv_bits, io_dtype, rotate_k, k_center)
    return run_layer(layer, inps, kwargs, keep=True)


def quantize_layer(layer_cpu: nn.Module, inps: torch.Tensor, kwargs: dict, cfg: AtomConfig,
                   opts: QuantizeOptions, io_dtype: torch.dtype, prefix: str,
                   kv_bits: Optional[int]) -> LayerResult:
    """Quantize one decoder layer with KV cache bits ``kv_bits`` (None: 16-bit), or 16-bit KV
    if ``opts.kv_skip_threshold`` says INT4 hurts this layer too much.

    inps: [n, seqlen, hidden] layer inputs in io_dtype, on ``opts.device``; the layer itself
    (on CPU) is left as it is.
    """
    dev = torch.device(opts.device)
    layer, lin = layer_on_device(layer_cpu, dev, io_dtype)
    stats, center = calibrate(layer, lin, inps, kwargs, cfg, opts, io_dtype, cfg.kv_center_k and kv_bits == 4)
    rot = cfg.kv_rotate_k
    kv_bits, kv4_error = choose_kv_bits(layer, inps, kwargs, opts, io_dtype, prefix, kv_bits, rot, center)
    center = center if kv_bits == 4 else None  # (a layer kept 16-bit stores its keys as they are)
    scheme = reorder(lin, stats, cfg, dev)
    hess = gptq_hessians(layer, lin, scheme, inps, kwargs, kv_bits, io_dtype, dev, rot, center) if opts.gptq else {}
    tensors, notes = quantize_linears(lin, scheme, hess, cfg, opts, io_dtype, prefix)
    if center is not None:
        tensors[f"{prefix}.{KEY_CENTER}"] = center.cpu()
    outs = quantized_outputs(layer, inps, kwargs, kv_bits, io_dtype, rot, center)
    del layer
    return LayerResult(tensors, outs, notes, kv_bits, kv4_error)


# ---- the whole model ----

def check_quantize_inputs(model_dir, out_dir, cfg: AtomConfig, opts: QuantizeOptions) -> None:
    """InputError, before anything loads, if the options, the model or ``out_dir`` will not do."""
    for name in ("nsamples", "seqlen"):
        if getattr(opts, name) < 1:
            raise InputError(f"--{name} {getattr(opts, name)}: must be >= 1")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {opts.device}: CUDA is not available")
    if opts.kv_skip_threshold is not None and cfg.kv_bits != 4:
        raise InputError("--kv-skip-layers auto picks layers to keep out of an INT4 KV cache; "
                         "it needs --kv-bits 4")
    check_model_dir(model_dir, cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if out.resolve() == Path(model_dir).resolve():
        raise InputError(f"{out}: the output directory is the model directory; give another one")


def write_unquantized(model, writer: CheckpointWriter) -> None:
    """Add the tensors written as they are (model dtype) to ``writer``: embeddings, norms,
    lm_head (unless tied), and whatever else is not a quantized linear's weight or bias."""
    quantized = {f"{LAYERS_PREFIX}.{i}.{LINEAR_PATHS[m]}.{p}"  # written by quantize_layer
                 for i in range(len(model.model.layers)) for m in QUANTIZED_LINEARS for p in ("weight", "bias")}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if name not in quantized and not (tied and name == "lm_head.weight"):
            writer.add(name, t)


def quantize_layers(layers: nn.ModuleList, inps: torch.Tensor, kwargs: dict, cfg: AtomConfig,
                    opts: QuantizeOptions, io_dtype: torch.dtype, writer: CheckpointWriter,
                    report: QuantizeReport, progress: bool) -> tuple[int, ...]:
    """`quantize_layer` on each decoder layer in turn, each one's outputs the next one's inputs
    (inps: [n, seqlen, hidden] in io_dtype, on ``opts.device``); writes their tensors, adds
    their fallbacks and KV errors to ``report`` and frees each 16-bit layer once done.
    Returns the layers whose KV cache stays 16-bit (``cfg.kv_skip_layers`` and those picked
    by ``opts.kv_skip_threshold``), sorted."""
    bar = tqdm(range(len(layers)), desc="atom quantize", unit="layer", disable=not progress)
    skip = set(cfg.kv_skip_layers)
    for i in bar:
        res = quantize_layer(layers[i], inps, kwargs, cfg, opts, io_dtype, f"{LAYERS_PREFIX}.{i}",
                             cfg.kv_bits_for(i))
        inps = res.outputs
        writer.add_all(res.tensors)
        report.fallbacks += res.notes
        report.kv4_attention_error.append(None if res.kv4_error is None else round(res.kv4_error, 4))
        if cfg.kv_bits == 4 and res.kv_bits is None:
            skip.add(i)
        layers[i] = nn.Identity()  # free the 16-bit layer
    return tuple(sorted(skip))


def quantize(model_dir, out_dir, calib_text, cfg: Optional[AtomConfig] = None,
             opts: Optional[QuantizeOptions] = None, progress: bool = True) -> QuantizeReport:
    """Quantize the 16-bit causal LM in ``model_dir`` into an Atom checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or AtomConfig()
    opts = opts or QuantizeOptions()
    t0 = time.time()
    check_quantize_inputs(model_dir, out_dir, cfg, opts)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    calib = calibration_batches(tok, calib_text, opts.nsamples, opts.seqlen, opts.seed)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto").eval()
    io_dtype = next(model.parameters()).dtype
    if cfg.rotation is not None:  # before anything reads the weights (unties lm_head)
        rotate_model(model, cfg.rotation)
    if cfg.value_rotation is not None:
        rotate_values(model, cfg.value_rotation)
    use_sim_attention(model)
    writer = CheckpointWriter(out_dir, opts.max_shard_bytes)
    write_unquantized(model, writer)  # first: embeddings, norms, lm_head

    inps, kwargs = capture_layer_inputs(model, calib, torch.device(opts.device), io_dtype)
    report = QuantizeReport(out_dir=str(out_dir), calib_tokens=calib.numel())
    layers = model.model.layers
    skip = quantize_layers(layers, inps, kwargs, cfg, opts, io_dtype, writer, report, progress)
    cfg = dataclasses.replace(cfg, kv_skip_layers=skip)
    report.kv_skip_layers = list(cfg.kv_skip_layers)
    hf_config = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.rotation is not None:
        hf_config["tie_word_embeddings"] = False  # the rotation untied lm_head
    writer.finish(hf_config, cfg, source_dir=model_dir)
    report.layers = len(layers)
    report.seconds = round(time.time() - t0, 1)
    dev = torch.device(opts.device)
    if dev.type == "cuda":
        report.gpu_peak_gib = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return report
