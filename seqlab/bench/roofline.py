"""The memory-bandwidth floor of one decode step.

Decoding one token per row is memory-bound: every weight is read once per step (shared by the batch) and each
row's KV cache or recurrent state is read once. So no implementation can take less than

    floor = (weight bytes + state bytes read per step) / HBM bandwidth

seconds per step. ``measure_bandwidth`` measures the bandwidth in the same process with a large device copy
(a copy of n bytes moves 2n: n read + n written); on the CPU it is memcpy bandwidth. ``achieved`` = floor /
measured step time is the fraction of the machine's ceiling a decode step reaches.

Byte counts per step (``decode_step_bytes``):
- weights: every parameter once, in the dtype it is stored in. The embedding table is the exception when the
  head is untied: a step reads only the ``batch`` rows it looks up. A tied head reads the whole table.
- state: the bytes of ``model.allocate_state(batch, context)`` with the dtype the benchmark uses, i.e. the KV
  cache of ``context`` positions (attention: grows with the context) or the recurrent state (SSMs: constant).
  seqlab's attention decode attends over the whole preallocated cache with a mask, so it reads
  ``max_seqlen`` positions, not ``context``; the floor counts the positions that carry information.
Activations are negligible at decode (a few vectors of d_model per row) and are not counted.
"""

from __future__ import annotations

import time

import torch


def measure_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of a large copy on ``device`` (read + write counted), best of ``repeats``.

    ``nbytes`` defaults to 1 GiB on CUDA (well past the L2 cache) and 256 MiB on the CPU (past the last-level
    cache of common machines)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page faults on the CPU, lazy allocation on the GPU)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            seconds = begin.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del src, dst
    return 2 * n * 4 / best


def weight_bytes_per_step(model, batch: int) -> int:
    """Bytes of parameters read by one decode step of ``batch`` rows (see the module docstring)."""
    total = 0
    seen: set[int] = set()
    for p in model.parameters():  # a tied head shares the embedding's tensor: counted once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    embedding = getattr(model, "embedding", None)
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)
    if embedding is not None and not tied:
        w = embedding.weight
        rows = min(batch, w.shape[0])
        total -= (w.shape[0] - rows) * w.shape[1] * w.element_size()
    return total


def state_bytes_per_step(model, batch: int, context: int, dtype: torch.dtype | None = None,
                         recurrent_dtype: torch.dtype | None = None) -> int:
    """Bytes of the inference state after ``context`` positions (allocated on the meta device: free); ``dtype``
    is the KV caches', ``recurrent_dtype`` the recurrent states' (see ``LanguageModel.allocate_state``)."""
    state = model.allocate_state(batch, max(context, 1), device="meta", dtype=dtype, state_dtype=recurrent_dtype)
    return state.nbytes()


def decode_step_bytes(model, batch: int, context: int, state_dtype: torch.dtype | None = None,
                      recurrent_dtype: torch.dtype | None = None) -> dict[str, int]:
    """``{"weights": .., "state": .., "total": ..}`` bytes read by one decode step at ``context`` positions."""
    weights = weight_bytes_per_step(model, batch)
    state = state_bytes_per_step(model, batch, context, state_dtype, recurrent_dtype)
    return {"weights": weights, "state": state, "total": weights + state}


def floor_seconds(step_bytes: int, bandwidth: float) -> float:
    """The time one decode step needs at least: bytes it must read / bytes per second."""
    return step_bytes / bandwidth
