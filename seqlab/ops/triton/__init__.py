"""Fused Triton kernels for the SSM ops (selective scan, SSD, causal conv1d, decode steps).

Called by the op dispatchers in ``seqlab.ops`` when the backend is ``triton``; the dispatchers validate the
inputs first. Every entry point returns the final state (float32). Under ``TRITON_INTERPRET=1`` the kernels run
on CPU tensors (slowly) for tests.
"""

from __future__ import annotations

import torch


def doc_ids(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) int32 running count of document starts: 0 for the row's first document, +1 at every reset.

    Kernels compare neighbouring ids to find resets, and compare ids across a chunk to mask cross-document terms;
    the count is monotone even when ``seq_idx`` is not, so both tests agree with ``seq_idx[t] != seq_idx[t-1]``.
    """
    if seq_idx is None:
        return None
    starts = torch.zeros(seq_idx.shape, dtype=torch.int32, device=seq_idx.device)
    starts[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return torch.cumsum(starts, dim=1, dtype=torch.int32).contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
