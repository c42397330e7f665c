"""SwiGLU feed-forward block (Shazeer 2020; Llama): ``down(silu(gate(x)) * up(x))``, no biases.

``activation="gelu"`` / ``"gelu_tanh"`` gives GeGLU (Gemma, RecurrentGemma); ``bias=True`` adds biases to the three
projections (RecurrentGemma).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers.base import project
from seqlab.ops.decode_linear import MAX_ROWS as DECODE_ROWS


def default_d_ff(d_model: int) -> int:
    """Llama's hidden size: 8/3 * d_model rounded up to a multiple of 64 (keeps ~8 d^2 parameters)."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation_fn(name: str, field: str):
    """The activation called ``name``; ConfigError naming the config ``field`` otherwise."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"config.{field}: expected one of {list(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class SwiGLU(nn.Module):
    """Position-wise channel mixer ``x (B, L, d_model) -> (B, L, d_model)``; stateless."""

    def __init__(self, d_model: int, d_ff: int | None = None, activation: str = "silu", bias: bool = False):
        super().__init__()
        d_ff = default_d_ff(d_model) if d_ff is None else d_ff
        if d_ff < 1:
            raise ConfigError(f"SwiGLU: d_ff must be >= 1, got {d_ff}")
        self.d_model, self.d_ff = d_model, d_ff
        self.act = activation_fn(activation, "mlp_act")
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> SwiGLU:
        return cls(config.d_model, getattr(config, "d_ff", None), activation=getattr(config, "mlp_act", "silu"),
                   bias=getattr(config, "mlp_bias", False))

    adds_residual = True  # Block passes its residual stream in (added inside a decode step's down_proj GEMM)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model) (+ ``residual``); a decode step's few rows take the decode GEMMs."""
        few = x.numel() <= DECODE_ROWS * x.shape[-1] and not torch.is_grad_enabled()
        hidden = self.act(project(self.gate_proj, x, few_rows=few)) * project(self.up_proj, x, few_rows=few)
        return project(self.down_proj, hidden, residual, few_rows=few)
