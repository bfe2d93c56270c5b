import json

import pytest

from vllm_atom.config import AtomConfig


def test_defaults_are_atoms_paper_setting():
    c = AtomConfig()
    assert (c.w_bits, c.a_bits, c.group_size, c.n_outliers, c.outlier_bits) == (4, 4, 128, 128, 8)
    assert (c.a_clip, c.w_clip, c.kv_bits) == (0.9, 0.85, 4)


@pytest.mark.parametrize("cfg", [AtomConfig(), AtomConfig(kv_bits=None, n_outliers=64, a_clip=1.0, row_shards=2)])
def test_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["quant_method"] == "atom"
    assert AtomConfig.from_dict(d) == cfg


@pytest.mark.parametrize("field,value", [
    ("w_bits", 3), ("a_bits", 8), ("group_size", 64), ("n_outliers", -16), ("n_outliers", 100),
    ("outlier_bits", 16), ("a_clip", 0.0), ("a_clip", 1.5), ("w_clip", "high"), ("kv_bits", 8),
    ("row_shards", 0), ("format_version", 2), ("format_version", 0),
])
def test_invalid_field_is_named(field, value):
    d = AtomConfig().to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=field):
        AtomConfig.from_dict(d)


def test_unknown_field_and_method_and_missing_version():
    d = AtomConfig().to_dict()
    with pytest.raises(ValueError, match="bogus"):
        AtomConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="quant_method"):
        AtomConfig.from_dict({**d, "quant_method": "gptq"})
    del d["format_version"]
    with pytest.raises(ValueError, match="format_version"):
        AtomConfig.from_dict(d)


@pytest.mark.parametrize("k,want", [(576, 64), (1536, 128), (4096, 128), (8960, 128), (11008, 128),
                                    (14336, 128), (28672, 128), (200, 72)])
def test_outliers_for(k, want):
    c = AtomConfig()
    o = c.outliers_for(k)
    assert o == want and (k - o) % 128 == 0 and o <= 128


def test_outliers_for_too_small():
    with pytest.raises(ValueError, match="input size 64"):
        AtomConfig().outliers_for(64)
    assert AtomConfig(n_outliers=0).outliers_for(256) == 0
