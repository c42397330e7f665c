"""Root-mean-square normalisation (Zhang & Sennrich 2019) and the gated form used by Mamba-2.

    RMSNorm(x)         = x / sqrt(mean(x^2) + eps) * weight
    GatedRMSNorm(y, z) = RMSNorm(y * silu(z))          (Mamba-2, "norm_before_gate=False")

Statistics are taken in float32 (float64 for float64 inputs); the result has the dtype of the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError
from seqlab.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim of size ``d``; ``weight=False`` gives the weightless form (Falcon Mamba)."""

    def __init__(self, d: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}, weight={self.weight is not None}"


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * silu(z))`` over groups of ``group_size`` channels (Mamba-2 normalises per B/C group)."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None):
        super().__init__()
        group_size = d if group_size is None else group_size
        if group_size < 1 or d % group_size:
            raise ConfigError(f"GatedRMSNorm: group_size must divide d={d}, got {group_size}")
        self.d, self.eps, self.group_size = d, eps, group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """``y, z (..., d)`` -> ``(..., d)`` in the dtype of ``y``."""
        dtype = y.dtype
        if z is None and self.group_size == self.d:
            return rms_norm(y, self.weight, self.eps)
        h = y.float()
        if z is not None:
            h = h * F.silu(z.float())
        with torch.autocast(y.device.type, enabled=False):
            if self.group_size == self.d:
                return F.rms_norm(h, (self.d,), self.weight.float(), self.eps).to(dtype)
            h = h.unflatten(-1, (self.d // self.group_size, self.group_size))  # (..., groups, group_size)
            h = F.rms_norm(h, (self.group_size,), None, self.eps).flatten(-2)  # (..., d)
            return (h * self.weight.float()).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}, group_size={self.group_size}"
