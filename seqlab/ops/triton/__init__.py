"""Fused Triton kernels for the SSM ops (selective scan, SSD, causal conv1d, decode steps).

Called by the op dispatchers in ``seqlab.ops`` when the backend is ``triton``; the dispatchers validate the
inputs first. Every entry point returns the final state (float32). Under ``TRITON_INTERPRET=1`` the kernels run
on CPU tensors (slowly) for tests.
"""

from __future__ import annotations

import os

import torch

from seqlab.ops._common import triton_interpreting

# Programmatic dependent launch (Hopper and later) for the decode-step kernels that take it: each launch may start
# while the previous kernel finishes, reads what no kernel writes during a decode step (weights, parameters), waits
# (griddepcontrol.wait) for the previous kernel's results, then lets the next one start. Weights must then not be
# written by the kernel just before: true in a decode step, not in general, hence off unless asked for
# (SEQLAB_PDL=1 or PDL["enabled"] = True).
PDL = {"enabled": os.environ.get("SEQLAB_PDL", "0") == "1"}


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


def sm_count() -> int:
    """Streaming multiprocessors of the current CUDA device (132, an H100 / H200's, without one)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pdl_launch(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with programmatic dependent launch (PDL["enabled"], CUDA with
    compute capability 9 or later, not under the interpreter)."""
    if not PDL["enabled"] or not t.is_cuda or triton_interpreting():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9
