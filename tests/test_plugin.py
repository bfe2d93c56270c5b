"""The plugin as vLLM discovers it: entry point, registration, config selection."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

from vllm_atom.config import AtomConfig

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
         "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-5, "torch_dtype": "float16"}


def write_config(path, quantization_config=None):
    cfg = dict(LLAMA)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def test_entry_point_is_declared_and_resolves():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ep = {e.name: e for e in eps}["atom"]
    assert ep.value == "vllm_atom.plugin:register"
    from vllm_atom.plugin import register
    assert ep.load() is register


def test_register_is_idempotent_and_registers_the_method():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from vllm_atom.plugin import register
    register()
    register()
    from vllm_atom.serve.config import AtomQuantConfig
    assert get_quantization_config("atom") is AtomQuantConfig
    assert QUANTIZATION_METHODS.count("atom") == 1


def test_vllm_loads_the_plugin_in_a_fresh_process():
    code = ("import vllm.plugins as p; p.load_general_plugins();"
            "from vllm.model_executor.layers.quantization import get_quantization_config as g;"
            "print(g('atom').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "AtomQuantConfig"


@pytest.fixture(scope="module")
def model_config_cls():
    import vllm.plugins
    vllm.plugins.load_general_plugins()
    from vllm.config import ModelConfig
    return ModelConfig


def test_vllm_validation_accepts_atom_explicit_and_from_checkpoint(tmp_path, model_config_cls):
    model = write_config(tmp_path / "ckpt", AtomConfig().to_dict())
    for quantization in (None, "atom", "ATOM"):
        mc = model_config_cls(model=model, skip_tokenizer_init=True, dtype="float16", quantization=quantization)
        assert mc.quantization == "atom"
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config
    qc = get_quant_config(mc, LoadConfig())
    assert qc.atom == AtomConfig()


def test_unknown_format_version_fails_naming_the_field(tmp_path, model_config_cls):
    from vllm_atom.serve.config import AtomQuantConfig
    with pytest.raises(ValueError, match="format_version"):
        AtomQuantConfig.from_config({**AtomConfig().to_dict(), "format_version": 7})


def test_atom_flag_on_a_non_atom_checkpoint_fails_clearly(tmp_path, model_config_cls):
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config
    model = write_config(tmp_path / "plain")
    mc = model_config_cls(model=model, skip_tokenizer_init=True, dtype="float16", quantization="atom")
    qc = get_quant_config(mc, LoadConfig())
    with pytest.raises(ValueError, match="needs an Atom checkpoint.*vllm-atom quantize"):
        qc.maybe_update_config(model, hf_config=mc.hf_config)


def test_other_quant_method_is_not_claimed():
    from vllm_atom.serve.config import AtomQuantConfig
    assert AtomQuantConfig.override_quantization_method({"quant_method": "gptq"}, None) is None
    assert AtomQuantConfig.override_quantization_method({"quant_method": "Atom"}, None) == "atom"


def test_offline_half_imports_neither_vllm_nor_cupy():
    code = ("import sys, vllm_atom, vllm_atom.config, vllm_atom.format, vllm_atom.reference;"
            "print(any(m.split('.')[0] in ('vllm', 'cupy') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
