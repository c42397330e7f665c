"""L2 prefetch of tensors a later kernel will read (a decode step's next weights).

    prefetch_l2(*tensors)      issue a bulk L2 prefetch of each tensor's bytes; returns at once

A hint without results: on a CUDA device of compute capability 9 or later (Hopper's bulk prefetch) with the
Triton kernel available, it launches seqlab.ops.triton.l2_prefetch on the current stream (so it is recorded into
a CUDA graph like any kernel); everywhere else (CPU, older GPUs, the Triton interpreter) it does nothing. The
prefetched bytes stay in L2 only until other traffic evicts them, which is why callers issue it a few kernels
ahead of the reader, not further.
"""

from __future__ import annotations

import functools

import torch

from seqlab.errors import InputError
from seqlab.ops._common import triton_entry, triton_interpreting

_ENTRY = ("seqlab.ops.triton.l2_prefetch", "l2_prefetch_triton")
_ALIGN = 16  # the instruction's address and size granule


def prefetch_l2(*tensors: torch.Tensor | None, evict_last: bool = False) -> None:
    """Prefetch each tensor's storage span (None entries skipped) into L2; ``evict_last`` marks the lines to be
    evicted after others. At most four tensors per call."""
    present = [t for t in tensors if t is not None]
    for i, t in enumerate(present):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"prefetch_l2: tensors[{i}]", "a torch.Tensor or None", type(t).__name__)
    if len(present) > 4:
        raise InputError("prefetch_l2: tensors", "at most 4 tensors per call", f"{len(present)} tensors")
    if not present or not _supported(present[0].device):
        return
    ranges = [r for r in (byte_range(t) for t in present if t.is_cuda) if r[1] > 0]
    if ranges:
        triton_entry(*_ENTRY)(ranges, evict_last=evict_last)


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the 16-byte-aligned span inside the memory ``t`` covers (its first to last element);
    bytes may be 0 for a tensor smaller than the granule."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    end = start + extent * t.element_size()
    first = -(-start // _ALIGN) * _ALIGN
    last = end // _ALIGN * _ALIGN
    return first, max(0, last - first)


def _supported(device: torch.device) -> bool:
    if device.type != "cuda" or triton_interpreting():
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and triton_entry(*_ENTRY) is not None
