"""Rotary position embeddings (Su et al. 2021, RoFormer).

Each pair of channels (i, i + d/2) of a query/key at position p is rotated by the angle p * theta^(-2i/d)
("rotate-half" layout, as in GPT-NeoX and Llama checkpoints). Rotations compose, so the score
<R(p) q, R(s) k> = <q, R(s - p) k> depends on positions only through the offset s - p.

Partial rotary (``rotary_dim < head_dim``, GPT-NeoX / Bamba): only the first ``rotary_dim`` channels are rotated,
pairing (i, i + rotary_dim/2) with angle p * theta^(-2i/rotary_dim); the rest pass through. ``rotary_dim=0``
rotates nothing (attention without positional encoding, as in Jamba).
"""

from __future__ import annotations

import torch
from torch import nn

from seqlab.errors import ConfigError


class RotaryEmbedding(nn.Module):
    """Applies RoPE to ``x (B, L, H, head_dim)`` at integer ``positions (L,)`` or ``(B, L)``."""

    def __init__(self, head_dim: int, theta: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
            raise ConfigError(
                f"RotaryEmbedding: rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}"
            )
        self.head_dim, self.theta, self.rotary_dim = head_dim, theta, rotary_dim
        inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / max(rotary_dim, 1))  # (R/2,)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.rotary_dim == 0:
            return x
        if self.rotary_dim < self.head_dim:
            rot, rest = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
            return torch.cat([self._rotate(rot, positions), rest], dim=-1)
        return self._rotate(x, positions)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (..., L, head_dim/2)
        if angles.dim() == 2:
            angles = angles.unsqueeze(0)  # (1, L, head_dim/2)
        cos = angles.cos().unsqueeze(2)  # (B, L, 1, head_dim/2)
        sin = angles.sin().unsqueeze(2)
        x1, x2 = x.float().chunk(2, dim=-1)  # (B, L, H, rotary_dim/2) each
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, rotary_dim={self.rotary_dim}"
