"""What every mixer shares: the recurrent/cache state it carries between calls.

A mixer is an ``nn.Module`` with
    forward(x (B, L, d_model), state: MixerState | None = None, seq_idx (B, L) | None = None) -> (B, L, d_model)
    allocate_state(batch, max_seqlen, device=None, dtype=None) -> MixerState
    state_bytes(batch, seqlen, dtype=torch.float32) -> int        # analytic; tests check it against real tensors
    from_config(config: ModelConfig, layer_idx: int)  (classmethod)

With a state, ``forward`` continues from it and updates it in place, so chunked prefill and one-token decode
are the same call. ``state.offset`` counts the positions consumed so far.
"""

from __future__ import annotations

import torch

from seqlab.errors import InputError


def check_mixer_input(x: torch.Tensor, d_model: int, seq_idx: torch.Tensor | None = None) -> None:
    """Raise InputError unless ``x`` is (B, L, d_model) and ``seq_idx``, when given, is (B, L)."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise InputError("x", f"a (B, L, {d_model}) tensor", f"shape {tuple(x.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != tuple(x.shape[:2]):
        raise InputError("seq_idx", f"shape {tuple(x.shape[:2])}", f"shape {tuple(seq_idx.shape)}")


class MixerState:
    """Named tensors of one mixer's state for a batch, plus the number of positions already consumed."""

    def __init__(self, offset: int = 0, **tensors: torch.Tensor):
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.offset = offset

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()
        self.offset = 0

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"MixerState(offset={self.offset}, {shapes})"
