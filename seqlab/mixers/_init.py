"""Initialisers shared by the SSM mixers."""

from __future__ import annotations

import math

import torch
from torch import nn

from seqlab.errors import ConfigError


def no_weight_decay(*params: nn.Parameter) -> None:
    """Mark SSM parameters (A, D, step sizes) that the optimizer must not decay towards zero."""
    for p in params:
        p._no_weight_decay = True


def dt_bias_init(n: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Bias ``(n,)`` whose softplus is a step size sampled log-uniformly in [dt_min, dt_max] (Mamba, Sec. 3.6).

    dt ~ exp(U[log dt_min, log dt_max]) clamped below at ``dt_init_floor``; bias = softplus^{-1}(dt)
    = dt + log(1 - exp(-dt)).
    """
    if not 0 < dt_min <= dt_max:
        raise ConfigError(f"dt_min/dt_max: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))
