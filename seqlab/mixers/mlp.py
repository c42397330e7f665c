"""SwiGLU feed-forward block (Shazeer 2020; Llama): ``down(silu(gate(x)) * up(x))``, no biases."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError


def default_d_ff(d_model: int) -> int:
    """Llama's hidden size: 8/3 * d_model rounded up to a multiple of 64 (keeps ~8 d^2 parameters)."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


class SwiGLU(nn.Module):
    """Position-wise channel mixer ``x (B, L, d_model) -> (B, L, d_model)``; stateless."""

    def __init__(self, d_model: int, d_ff: int | None = None):
        super().__init__()
        d_ff = default_d_ff(d_model) if d_ff is None else d_ff
        if d_ff < 1:
            raise ConfigError(f"SwiGLU: d_ff must be >= 1, got {d_ff}")
        self.d_model, self.d_ff = d_model, d_ff
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> SwiGLU:
        return cls(config.d_model, getattr(config, "d_ff", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
