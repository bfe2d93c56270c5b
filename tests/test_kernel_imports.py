"""The kernels package imports one way: ops -> cuda_ops -> _loader / layout / gemm_plan (CPU only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "vllm_atom" / "kernels"


def imports_of(path: Path) -> set[str]:
    """vllm_atom.kernels modules imported anywhere in ``path`` (also inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "vllm_atom.kernels":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm_atom.kernels."):
            out.add(node.module.split(".")[2])
    return out


def test_no_import_cycle_in_kernels():
    graph = {p.stem: imports_of(p) for p in KERNELS.glob("*.py")}
    seen, stack = set(), []

    def visit(mod):
        if mod in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(mod):] + [mod])}")
        if mod in seen:
            return
        stack.append(mod)
        for dep in graph.get(mod, ()):
            visit(dep)
        stack.pop()
        seen.add(mod)

    for mod in graph:
        visit(mod)
    assert "ops" not in graph["cuda_ops"] and "cuda_ops" in graph["ops"]


def test_gemm_plan_is_side_effect_free():
    tree = ast.parse((KERNELS / "gemm_plan.py").read_text())
    mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not mods & {"torch", "cupy", "numpy"}, mods


@pytest.mark.parametrize("name", ["atom_linear", "quantize_act", "rmsnorm_quantize_act", "silu_mul_quantize_act",
                                  "w4a4_gemm", "w4a4_gemm_sm90", "atom_linear_sm90"])
def test_every_op_has_a_cuda_kernel_function(name):
    src = (KERNELS / "cuda_ops.py").read_text()
    assert f"\ndef {name}(" in src and f"cuda_ops.{name})" in (KERNELS / "ops.py").read_text()
