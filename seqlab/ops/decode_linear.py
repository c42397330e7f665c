"""Linear layers for a few rows (a decode step): cuBLAS or the small-batch Triton GEMM, whichever is faster.

    y = x Wᵀ (+ bias) (+ residual)        x (..., K) with at most 128 rows, W (N, K), residual (..., N)

A decode step is weight-streaming: each GEMM reads its whole weight for a handful of rows. Which kernel streams a
given shape faster depends on the shape and the GPU, so the first call of each (device, rows, N, K, dtype) times
both once (replayed from a small CUDA graph, outside any other recording) and remembers the winner; calls
during a recording use the remembered choice, or cuBLAS. ``SEQLAB_DECODE_GEMM=torch|triton`` forces one side
(benchmarks compare them).

The Triton path applies only without autograd, autocast and bias, to 16-bit CUDA tensors of one dtype; every
other call is the plain torch expression.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from seqlab.ops._common import triton_entry

MAX_ROWS = 128  # rows the Triton kernel tiles in one block (seqlab.ops.triton.small_batch_linear.MAX_ROWS)
_ENTRY = ("seqlab.ops.triton.small_batch_linear", "small_batch_linear_triton")
_CHOICE: dict[tuple, str] = {}


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) (+ residual)``, shape (..., N), through the faster kernel for few rows."""
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = residual.reshape(-1, n) if residual is not None else None
    if _triton_applies(x, weight, bias, residual) and _choose(x2, weight, r2) == "triton":
        return triton_entry(*_ENTRY)(x2, weight, r2).view(*x.shape[:-1], n)
    if r2 is not None and bias is None and _one_dtype(x, weight, residual):
        return torch.addmm(r2, x2, weight.t()).view(*x.shape[:-1], n)  # the add inside the GEMM's epilogue
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def _one_dtype(x, weight, residual) -> bool:
    return not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == residual.dtype


def _triton_applies(x, weight, bias, residual) -> bool:
    if os.environ.get("SEQLAB_DECODE_GEMM", "auto") == "torch" or not x.is_cuda or bias is not None:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= MAX_ROWS and weight.is_contiguous() and triton_entry(*_ENTRY) is not None


def _choose(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> str:
    forced = os.environ.get("SEQLAB_DECODE_GEMM", "auto")
    if forced in ("torch", "triton"):
        return forced
    key = (x.device, x.shape[0], *weight.shape, x.dtype, residual is not None)
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return "torch"  # no timing inside a recording
        _CHOICE[key] = _time_both(x, weight, residual)
    return _CHOICE[key]


def _time_both(x, weight, residual, calls: int = 10) -> str:
    """"torch" or "triton": the lower GPU time per call, replayed from a CUDA graph of ``calls`` calls (as a
    graphed decode step runs them; eager timing would measure the Python launch cost instead)."""
    small_batch_linear_triton = triton_entry(*_ENTRY)
    runs = {
        "torch": (lambda: torch.addmm(residual, x, weight.t())) if residual is not None else
                 (lambda: F.linear(x, weight)),
        "triton": lambda: small_batch_linear_triton(x, weight, residual),
    }
    times = {}
    for name, fn in runs.items():
        fn()  # compile / pick the algorithm outside the recording
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times[name] = begin.elapsed_time(end)
    return min(times, key=times.get)
