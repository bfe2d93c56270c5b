"""Activation quantization fused into the op before each Atom linear, inside vLLM's compiled graph.

`AtomFusionPass` is an Inductor post-grad pass (vLLM's ``post_grad_custom_post_pass`` hook, run
by its pass manager after vLLM's own passes and before its IR lowering). It rewrites

    atom_linear[_sm90](rms_norm(h, w, eps), W)              -> gemm(rmsnorm_quantize_act(h, w, eps), W)
    atom_linear[_sm90](fused_add_rms_norm(h, r, w, eps)[0]) -> gemm(fused_add_rmsnorm_quantize_act(h, r, ...))
                                                               (its third output replaces [1], the residual)
    atom_linear[_sm90](silu(x[:, :d]) * x[:, d:], W)        -> gemm(silu_mul_quantize_act(x), W)

where gemm is ``w4a4_gemm[_sm90]`` and the norms are vLLM's IR ops (``torch.ops.vllm_ir``, not yet
lowered when the pass runs) and SiLU * up is SiluAndMul's native form as Inductor decomposes it (or
``_C.silu_and_mul`` when that custom op is enabled). The fused kernels round as Inductor's code for
those ops does, once, in the 16-bit dtype (`vllm_atom.kernels.ops.rms_norm` / ``fused_add_rms_norm`` /
``silu_mul``), so one quantize launch per qkv / gate_up / down linear goes away and the norm's or
SiLU's own kernel with it.
A producer with more than one user, a norm whose weight is not in the activations' dtype or that
normalises part of the row, and anything else is left as it was.

`install` registers the pass in the vLLM config being built (called when the first Atom linear is
created, before vLLM builds its compile backend); VLLM_ATOM_FUSION=0 turns it off.
"""

from __future__ import annotations

import collections
import functools
import operator
import os
from pathlib import Path

import torch
from torch import fx
from vllm.compilation.passes.inductor_pass import InductorPass
from vllm.logger import init_logger

logger = init_logger(__name__)

FUSION_ENV = "VLLM_ATOM_FUSION"
# Atom linears this process's graphs fused, by producer, and left unfused ("unfused": o_proj, ...)
REPLACED: collections.Counter = collections.Counter()
PASS_KEY = "post_grad_custom_post_pass"

_A = torch.ops.aten
_ATOM = torch.ops.vllm_atom


@functools.cache
def _ir(name: str):
    """The functional overload of vLLM IR op ``name``, or None if this vLLM has none."""
    try:
        import vllm.ir.ops  # noqa: F401  (registers torch.ops.vllm_ir)

        return getattr(torch.ops.vllm_ir, name).default
    except (ImportError, AttributeError):
        return None


@functools.cache
def _silu_and_mul_c():
    try:
        return torch.ops._C.silu_and_mul.default
    except (AttributeError, RuntimeError):
        return None


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def _call(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target == target


def _only_user(n: fx.Node, user: fx.Node) -> bool:
    return len(n.users) == 1 and user in n.users


class AtomFusionPass(InductorPass):
    """Fuse the activation quantization of Atom linears into the norm / SiLU before them."""

    def __call__(self, graph: fx.Graph) -> None:
        counts = {"rms_norm": 0, "fused_add_rms_norm": 0, "silu_mul": 0, "unfused": 0}
        for node in list(graph.nodes):
            linear = _linear(node)
            if linear is None:
                continue
            x, args = linear
            for kind, match in (("rms_norm", _match_rms_norm), ("fused_add_rms_norm", _match_fused_add),
                                ("silu_mul", _match_silu_mul)):
                m = match(x, node)
                if m is not None:
                    _rewrite(graph, node, args, *m)
                    counts[kind] += 1
                    break
            else:
                counts["unfused"] += 1
        REPLACED.update(counts)
        if counts["unfused"] < sum(counts.values()):
            graph.eliminate_dead_code()
            logger.debug("vllm_atom fusion: %s", counts)

    def uuid(self) -> str:  # the whole module: any matcher or rewrite change recompiles
        return InductorPass.hash_source(Path(__file__).read_text())

    def __deepcopy__(self, memo):  # vLLM deep-copies the Inductor config: keep one instance
        return self


def _linear(node: fx.Node):
    """(x, how to build the quantize + GEMM) for an Atom linear node, else None."""
    if _call(node, _ATOM.atom_linear_sm90.default):
        x, wpack, reorder, bias, n, o, clip = node.args
        return x, dict(sm90=True, reorder=reorder, o=o, clip=clip,
                       gemm=lambda qa, sa, dtype: (_ATOM.w4a4_gemm_sm90.default, (qa, sa, wpack, bias, n, dtype)))
    if _call(node, _ATOM.atom_linear.default):
        x, qw, ws, wo, wos, reorder, bias, clip = node.args
        o = _val(wo).shape[1] if _val(wo) is not None else None
        if o is None:
            return None
        return x, dict(sm90=False, reorder=reorder, o=int(o), clip=clip,
                       gemm=lambda qa, sa, dtype: (_ATOM.w4a4_gemm.default, (qa, sa, qw, ws, wo, wos, bias, dtype)))
    return None


def _same_dtype_weight(x, w) -> bool:
    vx, vw = _val(x), _val(w)
    return vx is not None and vw is not None and vw.dtype == vx.dtype and vw.dim() == 1


def _match_rms_norm(x, linear):
    op = _ir("rms_norm")
    if op is None or not _call(x, op) or not _only_user(x, linear):
        return None
    h, w, eps, *rest = x.args
    if (rest and rest[0] is not None) or not _same_dtype_weight(h, w):
        return None
    return _ATOM.rmsnorm_quantize_act.default, (h, w, eps), None


def _match_fused_add(x, linear):
    op = _ir("fused_add_rms_norm")
    if op is None or not _call(x, operator.getitem) or x.args[1] != 0 or not _only_user(x, linear):
        return None
    norm = x.args[0]
    if not _call(norm, op):
        return None
    h, r, w, eps, *rest = norm.args
    if (rest and rest[0] is not None) or not _same_dtype_weight(h, w):
        return None
    res = [u for u in norm.users if _call(u, operator.getitem) and u.args[1] == 1]
    if len(norm.users) != 1 + len(res):
        return None
    return _ATOM.fused_add_rmsnorm_quantize_act.default, (h, r, w, eps), res


def _match_silu_mul(x, linear):
    if not _only_user(x, linear):
        return None
    src = _silu_source(x)
    return None if src is None else (_ATOM.silu_mul_quantize_act.default, (src,), None)


def _slice_of(n):
    """(source, start, end) if n is a unit-step slice of a 2-D tensor along its last dim, else None."""
    if not _call(n, _A.slice.Tensor):
        return None
    s, dim, start, end, step = (*n.args, *(None,) * (5 - len(n.args)))
    v = _val(s)
    if v is None or v.dim() != 2 or dim not in (1, -1) or step not in (None, 1):
        return None
    return s, start or 0, end


def _silu_source(y):
    """x if y is SiluAndMul(x) (x [M, 2d] -> y [M, d]) in one of the forms it reaches the
    post-grad graph, else None: `_C.silu_and_mul` (auto-functionalized), or the native
    silu(x[:, :d]) * x[:, d:] as aten.silu or as Inductor's decomposition
    convert(div(convert(a, f32), exp(neg(convert(a, f32))) + 1), dtype) * b."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized

    c_op = _silu_and_mul_c()
    if c_op is not None and _call(y, operator.getitem) and y.args[1] == 1:
        af = y.args[0]
        if _call(af, auto_functionalized) and af.args[0] == c_op and len(af.users) == 1:
            return af.kwargs.get("input")
    if not _call(y, _A.mul.Tensor) or len(y.args) != 2:
        return None
    for act, up in (y.args, y.args[::-1]):
        gate = _silu_input(act, y)
        g, b = _slice_of(gate), _slice_of(up)
        if g is None or b is None or g[0] is not b[0]:
            continue
        x, d = g[0], _val(g[0]).shape[-1] // 2
        if g[1] == 0 and g[2] == d and b[1] == d and (b[2] is None or b[2] >= 2 * d):
            return x
    return None


def _silu_input(act, mul):
    """a if act is silu(a) rounded to its dtype (only used by ``mul``), in either form."""
    if not isinstance(act, fx.Node) or not _only_user(act, mul):
        return None
    if _call(act, _A.silu.default):
        return act.args[0]
    conv = torch.ops.prims.convert_element_type.default
    if not _call(act, conv) or not _call(act.args[0], _A.div.Tensor):
        return None
    div = act.args[0]
    num, den = div.args
    if not (_call(num, conv) and num.args[1] == torch.float32 and _call(den, _A.add.Tensor) and den.args[1] == 1):
        return None
    e = den.args[0]
    if not (_call(e, _A.exp.default) and _call(e.args[0], _A.neg.default) and e.args[0].args[0] is num):
        return None
    a = num.args[0]
    if act.args[1] != _val(a).dtype or len(num.users) != 2 or len(div.users) != 1 or len(den.users) != 1:
        return None
    return a


def _rewrite(graph: fx.Graph, linear: fx.Node, lin: dict, quant_op, quant_args: tuple, residual_users) -> None:
    """Replace ``linear`` by quant_op(*quant_args, reorder, o, clip, sm90) -> GEMM; with
    ``residual_users`` (getitem [1] nodes of a fused add + norm), point them at output 2."""
    out = _val(linear)
    with graph.inserting_before(linear):
        q = _node(graph, quant_op, (*quant_args, lin["reorder"], lin["o"], lin["clip"], lin["sm90"]))
        qa = _node(graph, operator.getitem, (q, 0))
        sa = _node(graph, operator.getitem, (q, 1))
        target, args = lin["gemm"](qa, sa, out.dtype if out is not None else _val(quant_args[0]).dtype)
        y = _node(graph, target, args)
        if residual_users:
            res = _node(graph, operator.getitem, (q, 2))
            for u in residual_users:
                u.replace_all_uses_with(res)
    linear.replace_all_uses_with(y)
    graph.erase_node(linear)


def _node(graph: fx.Graph, target, args: tuple) -> fx.Node:
    """A call_function node with its fake value in meta["val"] (Inductor lowers from those)."""
    n = graph.call_function(target, args)
    vals = [_val(a) for a in args]
    if target is operator.getitem:
        n.meta["val"] = vals[0][vals[1]]
        return n
    fake = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if fake is not None:
        with fake:
            n.meta["val"] = target(*vals)
    return n


def enabled() -> bool:
    return os.environ.get(FUSION_ENV, "1") != "0"


def install(vllm_config) -> bool:
    """Add `AtomFusionPass` to ``vllm_config``'s Inductor post-grad hook when the model will be
    compiled by Inductor; True if it is (now) installed."""
    cc = getattr(vllm_config, "compilation_config", None)
    if cc is None or not enabled() or cc.backend not in ("inductor", ""):
        return False
    from vllm.config.compilation import CompilationMode

    if cc.mode != CompilationMode.VLLM_COMPILE:
        return False
    current = cc.inductor_compile_config.get(PASS_KEY)
    if isinstance(current, AtomFusionPass):
        return True
    if current is not None:
        logger.warning("vllm_atom: %s is already set (%r); Atom's quantization is not fused into the "
                       "norms and SiLU", PASS_KEY, current)
        return False
    cc.inductor_compile_config[PASS_KEY] = AtomFusionPass()
    return True
