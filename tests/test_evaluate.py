"""Simulated evaluation: a saved checkpoint run through `vllm_atom.reference` (exact
kernel-order GEMM) gives the logits of the simulated eval; ladder bookkeeping."""

import math

import pytest
import torch
from torch import nn

from vllm_atom import reference as ref
from vllm_atom.checkpoint import load_checkpoint
from vllm_atom.config import AtomConfig
from vllm_atom.evaluate import SimModel, checkpoint_states, evaluate, load_model, paired_ppl_ratio
from vllm_atom.format import LINEAR_PATHS, QUANTIZED_LINEARS, ROW_PARALLEL_LINEARS, linear_layout
from vllm_atom.quantize import QuantizeOptions, quantize

from test_quantize import make_tiny  # noqa: E402  (tests/ is on sys.path under pytest)

OPTS = QuantizeOptions(nsamples=4, seqlen=128)


class RefLinear(nn.Module):
    """A quantized linear straight from checkpoint tensors, through reference.atom_linear."""

    def __init__(self, t: dict, name: str, k: int, n: int, cfg: AtomConfig, shards: int, dtype):
        super().__init__()
        self.lay = linear_layout(k, n, cfg, shards)
        self.t = {s: t[f"{name}.{s}"] for s in ("qweight", "w_scale", "w_outlier", "w_outlier_scale",
                                                  "reorder_index")}
        self.bias = t.get(f"{name}.bias")
        self.cfg, self.dtype = cfg, dtype

    def forward(self, x):
        lay, t = self.lay, self.t
        x2 = x.reshape(-1, x.shape[-1]).to(self.dtype)
        y = 0
        for s in range(lay.shards):
            w = ref.QuantizedWeight.from_packed({
                "qweight": t["qweight"][:, s * lay.k_normal // 2:(s + 1) * lay.k_normal // 2],
                "w_scale": t["w_scale"][:, s * lay.n_groups:(s + 1) * lay.n_groups],
                "w_outlier": t["w_outlier"][:, s * lay.n_outliers:(s + 1) * lay.n_outliers],
                "w_outlier_scale": t["w_outlier_scale"][:, s:s + 1]})
            xs = x2[:, s * lay.k_shard:(s + 1) * lay.k_shard]
            idx = t["reorder_index"][s * lay.k_shard:(s + 1) * lay.k_shard]
            a = ref.quantize_activation(xs, idx, lay.n_outliers, self.cfg.group_size, self.cfg.a_clip)
            y = y + ref.w4a4_linear_exact(a, w, None, torch.float32)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(self.dtype).float().reshape(*x.shape[:-1], -1)


def _reference_model(ckpt):
    cfg, _, t = load_checkpoint(ckpt)
    model, io_dtype = load_model(ckpt)
    sim = SimModel(model, io_dtype)  # for its KV-quantizing attention only
    for i, layer in enumerate(model.model.layers):
        for m in QUANTIZED_LINEARS:
            parent, attr = LINEAR_PATHS[m].split(".")
            old = getattr(getattr(layer, parent), attr)
            shards = cfg.row_shards if m in ROW_PARALLEL_LINEARS else 1
            setattr(getattr(layer, parent), attr, RefLinear(
                t, f"model.layers.{i}.{LINEAR_PATHS[m]}", old.in_features, old.out_features, cfg,
                shards, io_dtype))
    sim.linears = []  # no SimLinears left
    sim.add_method("atom-kv4", None, cfg.kv_bits)
    return sim


def _check_same_logits(src, ckpt):
    ids = torch.randint(0, 300, (96,))
    sim = SimModel(*load_model(ckpt))
    _, states = checkpoint_states(sim, ckpt)
    sim.add_method("atom-kv4", states, 4)
    sim.activate("atom-kv4")
    a = sim.logits(ids)
    refm = _reference_model(ckpt)
    refm.activate("atom-kv4")
    b = refm.logits(ids)
    # The two differ in fp32 summation order only, so most positions agree to rounding; where an
    # activation sits on an INT4 rounding boundary one side flips and the tiny random model amplifies
    # it at that and later positions (how often depends on the CPU's BLAS kernels). A wrong scale,
    # layout or reorder moves every position.
    row_err = (a - b).abs().amax(-1)
    assert row_err.median() <= 1e-3 * a.abs().max(), row_err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


def test_checkpoint_through_reference_matches_simulation(tmp_path):
    src = make_tiny(tmp_path / "llama")
    quantize(src, tmp_path / "q", src / "calib.txt", AtomConfig(), OPTS, progress=False)
    _check_same_logits(src, tmp_path / "q")


def test_row_sharded_qwen_checkpoint_through_reference(tmp_path):
    src = make_tiny(tmp_path / "qwen", arch="qwen2", layers=1, ffn=512)
    quantize(src, tmp_path / "q", src / "calib.txt", AtomConfig(n_outliers=0, row_shards=2), OPTS,
             progress=False)
    _check_same_logits(src, tmp_path / "q")


def test_ladder_rows_and_rtn_checkpoint_equals_clip_step(tmp_path):
    src = make_tiny(tmp_path / "llama")
    quantize(src, tmp_path / "rtn", src / "calib.txt", AtomConfig(kv_smooth=0),
             QuantizeOptions(nsamples=4, seqlen=128, gptq=False), progress=False)
    rows = evaluate(src, src / "eval.txt", seqlen=128, max_tokens=512, checkpoint=tmp_path / "rtn",
                    progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["fp16", "rtn", "outliers-fp16", "outliers-int8", "group128", "clip", "atom",
                        "atom-kv4"]
    assert by["fp16"]["kl"] == 0 and by["fp16"]["top1"] == 1
    # a --no-gptq checkpoint without key smoothing is exactly the "clip" step of the ladder
    assert by["atom"]["ppl"] == by["clip"]["ppl"] and by["atom"]["kl"] == by["clip"]["kl"]
    assert by["rtn"]["kl"] > by["clip"]["kl"]
    for r in rows:
        assert r["tokens"] == 512 and r["seqlen"] == 128 and r["ppl"] > 1
        # per-window NLLs add up to the perplexity
        assert len(r["window_nll"]) == 4
        assert math.isclose(math.exp(sum(r["window_nll"]) / r["predicted_tokens"]), r["ppl"], rel_tol=1e-4)
    # the checkpoint alone: PPL only, same number as in the ladder
    alone = evaluate(tmp_path / "rtn", src / "eval.txt", seqlen=128, max_tokens=512, progress=False)
    assert [r["method"] for r in alone] == ["atom-kv4"] and alone[0]["kl"] is None
    assert alone[0]["ppl"] == by["atom-kv4"]["ppl"]
    # unquantized ops in the model's 16-bit dtype (vLLM's numerics): close, not identical
    half = evaluate(tmp_path / "rtn", src / "eval.txt", seqlen=128, max_tokens=512, progress=False,
                    pipeline="16bit")
    assert half[0]["pipeline"] == "16bit" and alone[0]["pipeline"] == "fp32"
    assert half[0]["ppl"] != alone[0]["ppl"] and abs(half[0]["ppl"] / alone[0]["ppl"] - 1) < 0.1
    paired = paired_ppl_ratio(half[0]["window_nll"], alone[0]["window_nll"], 127)
    assert paired["windows"] == 4 and paired["rel_se"] > 0
    assert math.isclose(paired["rel"], half[0]["ppl"] / alone[0]["ppl"] - 1, abs_tol=1e-4)


def test_paired_ppl_ratio():
    # B = A + 0.1 nats per prediction in every window: ratio exp(-0.1) - 1 with no spread
    a, b = [100.0, 120.0, 90.0], [110.0, 130.0, 100.0]
    r = paired_ppl_ratio(a, b, 100)
    assert math.isclose(r["rel"], math.exp(-0.1) - 1) and r["rel_se"] < 1e-12
    # only the last window disagrees (by 4 nats per prediction): mean log ratio -1, and a
    # standard error from the spread of the four
    r = paired_ppl_ratio([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 40.0], 10)
    d = torch.tensor([0.0, 0.0, 0.0, -4.0], dtype=torch.float64)
    assert math.isclose(r["rel"], math.exp(-1.0) - 1)
    assert math.isclose(r["rel_se"], math.exp(-1.0) * float(d.std()) / 2)
    with pytest.raises(ValueError, match="same non-zero number of windows"):
        paired_ppl_ratio([1.0], [1.0, 2.0], 10)
