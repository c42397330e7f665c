"""Rotary position embeddings (Su et al. 2021, RoFormer).

Each pair of channels (i, i + d/2) of a query/key at position p is rotated by the angle p * theta^(-2i/d)
("rotate-half" layout, as in GPT-NeoX and Llama checkpoints). Rotations compose, so the score
<R(p) q, R(s) k> = <q, R(s - p) k> depends on positions only through the offset s - p.
"""

from __future__ import annotations

import torch
from torch import nn

from seqlab.errors import ConfigError


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``x (B, L, H, head_dim)`` at integer ``positions (L,)`` or ``(B, L)``."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., L, head_dim/2)
        if angles.dim() == 2:
            angles = angles.unsqueeze(0)  # (1, L, head_dim/2)
        cos = angles.cos().unsqueeze(2)  # (B, L, 1, head_dim/2)
        sin = angles.sin().unsqueeze(2)
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, L, H, head_dim/2) each
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
