"""Small device utilities shared by the benchmarks."""

from __future__ import annotations

import torch


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is the device running out of memory (recorded as a result, never a crash)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings are real; nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
