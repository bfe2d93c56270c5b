"""examples/benchmarks/sm90_table.py without a GPU: sweep rows -> SM90_MID_TUNED entries."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))
import sm90_table  # noqa: E402


def rows(m, times, picked="atom_gemm_w2c2"):
    return [dict(M=m, N=4096, K=4096, impl=name, time_us=us, **({"picked": True} if name == picked else {}))
            for name, us in times.items()]


def test_names_parse_to_configs():
    assert sm90_table.parse("atom_gemm_w2c4", 128) == (128, 2, 4, 1)
    assert sm90_table.parse("atom_gemm_w2c2k2", 64) == (64, 2, 2, 2)
    assert sm90_table.parse("atom_gemm_b64w4c1k2", 512) == (64, 4, 1, 2)
    assert sm90_table.parse("atom_gemm_b64w2c1k1p", 128) is None  # PIPE: no field in the mid table
    assert sm90_table.parse("atom_gemm", 128) is None and sm90_table.parse("atom_gemm_s8", 128) is None


def test_entries_need_the_gain_and_the_largest_m_decides():
    sweep = (rows(128, {"atom_gemm": 17.4, "atom_gemm_w2c2": 17.4, "atom_gemm_w2c4": 22.5,
                        "atom_gemm_b64w2c2k1": 10.0, "atom_gemm_b64w2c1k1p": 9.0})
             + rows(256, {"atom_gemm_w2c2": 18.6, "atom_gemm_b64w2c1k1": 18.3})  # 1.6 %: no entry
             + rows(512, {"atom_gemm_w2c2": 30.0, "atom_gemm_b64w4c1k1": 26.0})
             + rows(64, {"atom_gemm_w2c2": 10.0, "atom_gemm_w1c2": 5.0}))  # not a mid size
    found = sm90_table.entries(sweep)
    assert set(found) == {(128, 4096, 4096), (512, 4096, 4096)}
    assert found[(128, 4096, 4096)][0] == (64, 2, 2, 1) and abs(found[(128, 4096, 4096)][1] - 1.74) < 1e-9
    assert found[(512, 4096, 4096)][0] == (64, 4, 1, 1)
    # two M of one bucket: the larger one's measurement is the entry (here: none)
    both = rows(100, {"atom_gemm_w2c2": 20.0, "atom_gemm_b64w2c2k1": 10.0}) + rows(128, {"atom_gemm_w2c2": 10.0,
                                                                                     "atom_gemm_b64w2c2k1": 10.0})
    assert sm90_table.entries(both) == {}


def test_main_prints_table_items(tmp_path, capsys):
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps(dict(device="NVIDIA H200", commit="abc", rows=[],
                                 detail=rows(128, {"atom_gemm_w2c2": 17.4, "atom_gemm_b64w2c2k1": 10.0}))))
    assert sm90_table.main([str(f)]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200, commit abc" in out and "(128, 4096, 4096): (64, 2, 2, 1),  # 1.74x" in out


def test_bench_gemm_takes_several_sweep_widths():
    """bench_gemm.py --sweep-width 64,96: one sweep over several tile widths, each a width the
    kernel compiles for (the ones only tables and sweeps pick included)."""
    import argparse

    import bench_gemm
    import pytest

    assert bench_gemm._widths("64,96") == (64, 96) and bench_gemm._widths("8") == (8,)
    with pytest.raises(argparse.ArgumentTypeError, match="not a tile width"):
        bench_gemm._widths("64,80")
