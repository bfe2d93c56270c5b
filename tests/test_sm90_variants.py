"""examples/benchmarks/sm90_variants.py without a GPU: every patch still finds its target in
cuda/w4a4_sm90.cu exactly once, and each variant runs the step loop its patch edits."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))
import sm90_variants  # noqa: E402
from vllm_atom.kernels import _loader  # noqa: E402


@pytest.mark.parametrize("name", sorted(sm90_variants.PATCHES))
def test_patch_applies_once(name, tmp_path):
    d = sm90_variants.variant_dir(name, tmp_path, _loader.CUDA_DIR)
    src = (d / "w4a4_sm90.cu").read_text()
    shipped = (_loader.CUDA_DIR / "w4a4_sm90.cu").read_text()
    assert (src == shipped) == (not sm90_variants.PATCHES[name])


def test_variants_run_the_loop_their_patch_edits():
    lean = {n: sm90_variants.variant_lean(n, 1) for n in ("base", "lean", "oldloop", "linear", "nofold", "pp1", "l2pf4")}
    assert lean == {"base": 1, "lean": 1, "oldloop": 0, "linear": 1, "nofold": 0, "pp1": 0, "l2pf4": 0}
    assert sm90_variants.variant_lean("base", 0) == 0  # (as shipped: VLLM_ATOM_SM90_LEAN=0)
