"""Calibration statistics: accumulate, decide nothing.

`ChannelStats` collects, per linear input, the per-channel salience Atom sorts by:
``hessian`` = sum of squares of the activations (the diagonal of X^T X), or
``abs_mean`` = the largest per-sample mean |x|. `HessianAccumulator` collects
H = 2/n * sum x x^T for GPTQ (fp32). Both are fed through `SimLinear.observer`.
"""

from __future__ import annotations

import torch

METRICS = ("hessian", "abs_mean")


class ChannelStats:
    """Per-channel salience of one linear input over the calibration samples."""

    def __init__(self, k: int, metric: str = "hessian", device="cpu"):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.value = torch.zeros(k, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, K] of ONE calibration sample."""
        x = x.detach().float()
        if self.metric == "hessian":
            self.value += x.pow(2).sum(0).double()
        else:
            self.value = torch.maximum(self.value, x.abs().mean(0).double())


class HessianAccumulator:
    """Running H = 2/n * sum_i x_i x_i^T over all calibration tokens (fp32)."""

    def __init__(self, k: int, device="cpu"):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x [tokens, K]."""
        x = x.detach().float()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.T, x)
