"""Bad arguments and bad input files, for ``vllm-atom`` and ``python -m vllm_atom.data``
(CPU, no model is loaded): exit status 2, one line on stderr, no traceback, the line names
the flag or the file, and nothing is written to the output directory.

The rules themselves are `vllm_atom.cli_args`; `test_parsers_follow_the_rules` holds every
option of both command lines to them, so a new option is covered without a new test here.
"""

import json
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from vllm_atom import cli
from vllm_atom.cli_args import Number, rule_violations
from vllm_atom.data import cli as data_cli
from vllm_atom.inputs import InputError, check_safetensors

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
         "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}


def _model_dir(path, config=LLAMA):
    """A directory that passes the file checks (config.json, one whole safetensors file)."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(4, 4)}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def model(tmp_path):
    return _model_dir(tmp_path / "model")


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("the cat sat on the mat " * 200)
    return p


def run(main, argv, capsys):
    """(exit status, stderr) of a command line run in-process; an exception escaping
    ``main`` fails the test, so exit 2 here also means: no traceback."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_one_line(rc, err, *names):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


# ---- numbers, at parse time ----

@pytest.mark.parametrize("flag,value,allowed", [
    ("--seqlen", "0", ">= 1"), ("--seqlen", "-16", ">= 1"), ("--nsamples", "0", ">= 1"),
    ("--nsamples", "-4", ">= 1"), ("--nsamples", "four", "an integer"),
    ("--n-outliers", "17", "multiple of 16"), ("--a-clip", "0", "(0, 1]"),
    ("--damp", "nan", "[0, 1]"), ("--seed", "-1", ">= 0"),
])
def test_quantize_bad_numbers(model, text, tmp_path, capsys, flag, value, allowed):
    out = tmp_path / "out"
    rc, err = run(cli.main, ["quantize", str(model), str(out), "--calib-text", str(text),
                             flag, value], capsys)
    assert_one_line(rc, err, f"argument {flag}", allowed, "vllm-atom quantize: error:")
    assert not out.exists()


@pytest.mark.parametrize("argv,names", [
    (["--seqlen", "0"], ["argument --seqlen", ">= 2"]),
    (["--seqlen", "1"], ["argument --seqlen", ">= 2"]),
    (["--max-tokens", "-5"], ["argument --max-tokens"]),
    (["--seqlen", "512", "--max-tokens", "256"], ["argument --max-tokens", "--seqlen 512"]),
    (["--methods", "fp16,atom-kv5"], ["argument --methods", "atom-kv5", "atom-kv4"]),
])
def test_eval_bad_arguments(model, text, capsys, argv, names):
    rc, err = run(cli.main, ["eval", str(model), "--text", str(text)] + argv, capsys)
    assert_one_line(rc, err, "vllm-atom eval: error:", *names)


def test_kv_skip_layers_parsed_at_parse_time(model, text, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run(cli.main, ["quantize", str(model), str(out), "--calib-text", str(text),
                             "--kv-skip-layers", "0,x"], capsys)
    assert_one_line(rc, err, "argument --kv-skip-layers", "'x'")
    rc, err = run(cli.main, ["quantize", str(model), str(out), "--calib-text", str(text),
                             "--kv-skip-layers", "auto", "--kv-bits", "16"], capsys)
    assert_one_line(rc, err, "argument --kv-skip-layers", "--kv-bits 4")
    assert not out.exists()


def test_every_numeric_option_rejects_out_of_range(model, capsys):
    """Every Number option of both parsers, given a value outside its range, names itself."""
    seen = 0
    for main, parser in ((cli.main, cli.build_parser()), (data_cli.main, data_cli.build_parser())):
        for sub_name, sub in parser._subparsers._group_actions[0].choices.items():
            m = str(model)
            positionals = {"quantize": [m, "o", "--calib-text", "t"], "eval": [m, "--text", "t"],
                           "check": [m]}.get(sub_name, [])
            for a in sub._actions:
                if isinstance(a.type, Number):
                    bad = "-1000000" if a.type.lo is not None else "1e9"
                    rc, err = run(main, [sub_name, *positionals, a.option_strings[0], bad], capsys)
                    assert_one_line(rc, err, f"argument {a.option_strings[0]}", a.type.describe())
                    seen += 1
    assert seen >= 13


# ---- the rules, for options added later ----

@pytest.mark.parametrize("build", [cli.build_parser, data_cli.build_parser])
def test_parsers_follow_the_rules(build):
    assert rule_violations(build()) == []


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    out = capsys.readouterr().out
    for default in ("calibration windows (default: 128)", "(default: 2048)", "(default: 0.85)",
                    "(default: hessian)"):
        assert default in " ".join(out.split()), default
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "(default: fp32)" in capsys.readouterr().out


# ---- directories and files ----

def test_missing_model_and_checkpoint_dirs(tmp_path, text, model, capsys):
    missing = tmp_path / "no-such-model"
    rc, err = run(cli.main, ["eval", str(missing), "--text", str(text)], capsys)
    assert_one_line(rc, err, "argument model", str(missing), "no such directory")
    rc, err = run(cli.main, ["quantize", str(missing), str(tmp_path / "o"), "--calib-text",
                             str(text)], capsys)
    assert_one_line(rc, err, "argument model_dir", str(missing), "no such directory")
    rc, err = run(cli.main, ["eval", str(model), "--text", str(text), "--checkpoint",
                             str(missing)], capsys)
    assert_one_line(rc, err, "argument --checkpoint", str(missing))
    # a directory that is not an Atom checkpoint
    rc, err = run(cli.main, ["eval", str(model), "--text", str(text), "--checkpoint",
                             str(model)], capsys)
    assert_one_line(rc, err, str(model), "not an Atom checkpoint")


@pytest.mark.parametrize("cmd", ["quantize", "eval"])
def test_truncated_safetensors(model, text, tmp_path, capsys, cmd):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    out = tmp_path / "out"
    argv = ([cmd, str(model), str(out), "--calib-text", str(text)] if cmd == "quantize"
            else [cmd, str(model), "--text", str(text)])
    rc, err = run(cli.main, argv, capsys)
    assert_one_line(rc, err, str(f), "truncated")
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["quantize", "eval"])
def test_unreadable_config_json(model, text, tmp_path, capsys, cmd):
    (model / "config.json").write_text('{"model_type": "llama",')
    out = tmp_path / "out"
    argv = ([cmd, str(model), str(out), "--calib-text", str(text)] if cmd == "quantize"
            else [cmd, str(model), "--text", str(text)])
    rc, err = run(cli.main, argv, capsys)
    assert_one_line(rc, err, str(model / "config.json"), "not valid JSON")
    assert not out.exists()


@pytest.mark.parametrize("cmd", ["quantize", "eval"])
def test_unsupported_architecture_lists_supported_types(tmp_path, text, capsys, cmd):
    gpt2 = _model_dir(tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    out = tmp_path / "out"
    argv = ([cmd, str(gpt2), str(out), "--calib-text", str(text)] if cmd == "quantize"
            else [cmd, str(gpt2), "--text", str(text)])
    rc, err = run(cli.main, argv, capsys)
    line = assert_one_line(rc, err, str(gpt2), "'gpt2'", "GPT2LMHeadModel",
                           "supported model types: llama, mistral, qwen2")
    assert "not a causal language model" not in line
    assert not out.exists()


def test_quantize_output_checks(model, text, tmp_path, capsys):
    rc, err = run(cli.main, ["quantize", str(model), str(model), "--calib-text", str(text)], capsys)
    assert_one_line(rc, err, str(model), "model directory")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    rc, err = run(cli.main, ["quantize", str(model), str(a_file), "--calib-text", str(text)], capsys)
    assert_one_line(rc, err, str(a_file), "not a directory")
    # a layer index the model does not have
    out = tmp_path / "out"
    rc, err = run(cli.main, ["quantize", str(model), str(out), "--calib-text", str(text),
                             "--kv-skip-layers", "0,7"], capsys)
    assert_one_line(rc, err, "--kv-skip-layers 7", "2 layers")
    assert not out.exists()


def test_check_safetensors_names_what_is_wrong(tmp_path):
    p = tmp_path / "x.safetensors"
    for body, what in [(b"", "shorter than the 8-byte"), ((10**9).to_bytes(8, "little"), "header of"),
                       ((4).to_bytes(8, "little") + b"nope", "not JSON"),
                       ((2).to_bytes(8, "little") + b"[]", "not a JSON object")]:
        p.write_bytes(body)
        with pytest.raises(InputError, match=what) as ei:
            check_safetensors(p)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value)


# ---- python -m vllm_atom.data ----

@pytest.mark.parametrize("argv,names", [
    (["check", "{model}", "--seqlen", "1"], ["argument --seqlen", ">= 2"]),
    (["check", "{model}", "--chunks", "0"], ["argument --chunks", ">= 1"]),
    (["check", "{missing}"], ["argument model_dir", "no such directory"]),
    (["austen", "--deb", "{missing}"], ["argument --deb", "no such file"]),
    (["prepare", "smollm2", "--dtype", "int4"], ["argument --dtype", "int4"]),
    (["prepare", "gpt-5"], ["argument model", "smollm2"]),
])
def test_data_cli_bad_arguments(model, tmp_path, capsys, argv, names):
    argv = [a.format(model=model, missing=tmp_path / "missing") for a in argv]
    rc, err = run(data_cli.main, argv, capsys)
    assert_one_line(rc, err, "python -m vllm_atom.data", *names)


def test_data_cli_bad_files(model, capsys):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    rc, err = run(data_cli.main, ["check", str(model)], capsys)
    assert_one_line(rc, err, str(f))


def test_real_entry_point_one_line(tmp_path):
    """The same through the interpreter, as a user runs it (argument errors import no torch)."""
    r = subprocess.run([sys.executable, "-m", "vllm_atom.cli", "quantize", str(tmp_path), "o",
                        "--calib-text", "wiki", "--seqlen", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "argument --seqlen: 0 is not an integer >= 1" in r.stderr
