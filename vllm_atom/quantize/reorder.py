"""Channel reordering: rank each linear input's channels by calibration salience.

Atom sorts the input channels of every linear by a salience statistic, ascending, so
the most salient (outlier) channels land in the last slots, which are kept in INT8.
Linears that read the same input (`format.SHARED_INPUT_GROUPS`) share one order.
Pure functions; statistics come from `calibration.ChannelStats`.
"""

from __future__ import annotations

import torch

from vllm_atom.format import SHARED_INPUT_GROUPS, QUANTIZED_LINEARS


def reorder_index(salience: torch.Tensor, shards: int = 1) -> torch.Tensor:
    """int32 [K] shard-local permutation sorting ``salience`` [K] ascending within each shard.

    Slot j of shard s reads channel ``s*K/S + index[s*K/S + j]`` (`vllm_atom.format`).
    Ties keep channel order (stable sort), so the result is deterministic.
    """
    k = salience.numel()
    if k % shards:
        raise ValueError(f"{k} channels cannot be split into {shards} shards")
    chunks = salience.detach().float().cpu().view(shards, k // shards)
    return torch.sort(chunks, dim=1, stable=True).indices.flatten().to(torch.int32)


def input_groups(linear_names=QUANTIZED_LINEARS) -> dict[str, tuple[str, ...]]:
    """Group the linears of a decoder layer by the input they read.

    Keyed by the first member: {"q_proj": (q, k, v), "o_proj": (o,), "gate_proj": (gate, up),
    "down_proj": (down,)} (short names, without the ``self_attn.``/``mlp.`` prefix).
    """
    groups: dict[str, tuple[str, ...]] = {}
    grouped = {n for g in SHARED_INPUT_GROUPS for n in g}
    for name in linear_names:
        for g in SHARED_INPUT_GROUPS:
            if name == g[0]:
                groups[name] = g
        if name not in grouped:
            groups[name] = (name,)
    return groups
