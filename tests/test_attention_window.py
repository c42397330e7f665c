"""Sliding-window attention runs in blocks: equal to the full (L, L)-masked form, and never builds an L x L tensor."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqlab.mixers.attention import Attention, document_positions


def masked_reference(mixer: Attention, x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """The plain form: one (L, L) mask, causal, within the window, within the document."""
    Bsz, L, _ = x.shape
    t = torch.arange(L)
    q = mixer.q_proj(x).view(Bsz, L, mixer.n_heads, mixer.head_dim)
    k = mixer.k_proj(x).view(Bsz, L, mixer.n_kv_heads, mixer.head_dim)
    v = mixer.v_proj(x).view(Bsz, L, mixer.n_kv_heads, mixer.head_dim)
    if seq_idx is None:
        pos, mask = t, mixer._position_mask(t, t)[None, None]
    else:
        doc, pos = document_positions(seq_idx)
        mask = (mixer._position_mask(t, t)[None] & (doc[:, :, None] == doc[:, None, :])).unsqueeze(1)
    q, k = mixer.rope(q, pos), mixer.rope(k, pos)
    return mixer.o_proj(mixer._sdpa(q, k, v, mask).reshape(Bsz, L, -1))


@pytest.mark.parametrize("window, L", [(1, 20), (5, 37), (16, 100), (32, 64), (40, 41), (7, 300)])
@pytest.mark.parametrize("documents", [False, True])
def test_windowed_attention_equals_the_full_mask(window, L, documents):
    torch.manual_seed(window * 1000 + L)
    mixer = Attention(d_model=32, n_heads=4, n_kv_heads=2, window=window).double()
    x = torch.randn(2, L, 32, dtype=torch.float64, requires_grad=True)
    seq_idx = (torch.rand(2, L) < 0.08).long().cumsum(1) if documents else None
    fast = mixer(x, seq_idx=seq_idx)
    ref = masked_reference(mixer, x, seq_idx)
    assert (fast - ref).abs().max() < 1e-12
    grad_fast = torch.autograd.grad(fast.square().sum(), x)[0]
    grad_ref = torch.autograd.grad(ref.square().sum(), x)[0]
    assert (grad_fast - grad_ref).abs().max() < 1e-10


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_windowed_attention_memory_grows_with_length_times_window():
    L, W = 8192, 64
    mixer = Attention(d_model=16, n_heads=2, window=W)
    x = torch.randn(1, L, 16)
    seq_idx = torch.zeros(1, L, dtype=torch.long)
    seq_idx[:, L // 2:] = 1
    for docs in (None, seq_idx):
        probe = LargestTensor()
        with probe, torch.no_grad():
            mixer(x, seq_idx=docs)
        assert probe.numel <= 4 * L * W, probe.numel  # an (L, L) mask alone would hold L * L = 128 * L * W
