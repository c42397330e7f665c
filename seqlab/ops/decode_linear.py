"""Linear layers for a few rows (a decode step): cuBLAS or the small-batch Triton GEMM, whichever is faster.

    y = x Wᵀ (+ bias) (+ residual)                  x (..., K) with at most 128 rows, W (N, K), residual (..., N)
    y = rms_norm(x, g, eps) Wᵀ (+ bias) (+ residual)    with ``norm=(g, eps)``: a pre-norm and its in-projection

A decode step is weight-streaming: each GEMM reads its whole weight for a handful of rows. Which kernel streams a
given shape faster depends on the shape and the GPU, so the first call of each (device, rows, N, K, dtype,
residual, norm) times cuBLAS (with a norm: rms_norm then addmm, two launches) and a few tile shapes of the Triton
kernel (the norm fused: one launch) once, each replayed from a small CUDA graph outside any other recording, and
remembers the winner and the fastest Triton tile shape; calls during a recording use the remembered choice, or
cuBLAS. ``SEQLAB_DECODE_GEMM=torch|triton`` forces one side (benchmarks compare them); forced to Triton, the tile
shape is still the fastest one (the default one where nothing could be timed).

The Triton path applies only without autograd, autocast and bias, to 16-bit CUDA tensors of one dtype; every
other call is the plain torch expression.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import triton_entry
from seqlab.ops.norm import rms_norm

MAX_ROWS = 128  # rows the Triton kernel tiles in one block (seqlab.ops.triton.small_batch_linear.MAX_ROWS)
_MODULE = "seqlab.ops.triton.small_batch_linear"
_ENTRY = (_MODULE, "small_batch_linear_triton")
_CHOICE: dict[tuple, str] = {}  # key -> "torch" | "triton" (benchmarks/decode_profile.py reads it)
_CONFIG: dict[tuple, dict | None] = {}  # key -> the fastest Triton tile shape (None: none could run; the default)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None,
                  norm: tuple[torch.Tensor | None, float] | None = None) -> torch.Tensor:
    """``F.linear(x', weight, bias) (+ residual)``, shape (..., N), through the faster kernel for few rows, where
    ``x' = x``, or ``rms_norm(x, norm_weight, eps)`` (seqlab.mixers.norm.rms_norm) with ``norm=(norm_weight or
    None, eps)``."""
    n, k = weight.shape
    norm_weight, eps = _check_norm(norm, k)
    if _triton_applies(x, weight, bias, residual, norm_weight):
        x2 = x.reshape(-1, k)
        r2 = residual.reshape(-1, n) if residual is not None else None
        kind, config = _choose(x2, weight, r2, norm)
        if kind == "triton":
            out = triton_entry(*_ENTRY)(x2, weight, r2, config, normalize=norm is not None, norm_weight=norm_weight,
                                        norm_eps=eps)
            return out.view(*x.shape[:-1], n)
    if norm is not None:
        x = rms_norm(x, norm_weight, eps)
    if residual is not None and bias is None and _one_dtype(x, weight, residual):
        out = torch.addmm(residual.reshape(-1, n), x.reshape(-1, k), weight.t())  # the add in the GEMM's epilogue
        return out.view(*x.shape[:-1], n)
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def _check_norm(norm, k: int) -> tuple[torch.Tensor | None, float]:
    if norm is None:
        return None, 0.0
    if not (isinstance(norm, tuple) and len(norm) == 2):
        raise InputError("decode_linear: norm", "None or a tuple (norm_weight or None, eps)", repr(norm))
    norm_weight, eps = norm
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise InputError("decode_linear: norm", f"a norm weight of shape ({k},) (the weight's K)",
                         f"shape {tuple(norm_weight.shape)}")
    return norm_weight, float(eps)


def _one_dtype(x, weight, residual) -> bool:
    return not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype == residual.dtype


def _triton_applies(x, weight, bias, residual, norm_weight=None) -> bool:
    if os.environ.get("SEQLAB_DECODE_GEMM", "auto") == "torch" or not x.is_cuda or bias is not None:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, norm_weight)):
        return False
    if torch.is_autocast_enabled(x.device.type) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        return False
    if norm_weight is not None and (norm_weight.device != x.device or not norm_weight.is_floating_point()):
        return False
    rows = x.numel() // x.shape[-1]
    return 0 < rows <= MAX_ROWS and weight.is_contiguous() and triton_entry(*_ENTRY) is not None


def _choose(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
            norm: tuple | None = None) -> tuple[str, dict | None]:
    """(kind, Triton tile shape or None for the default) for x (M, K): remembered per shape, timed on first use."""
    forced = os.environ.get("SEQLAB_DECODE_GEMM", "auto")
    if forced == "torch":
        return "torch", None
    key = (x.device, x.shape[0], *weight.shape, x.dtype, residual is not None, norm is not None)
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a recording
            return ("triton", None) if forced == "triton" else ("torch", None)
        _CHOICE[key], _CONFIG[key] = _time_both(x, weight, residual, norm)
    return ("triton" if forced == "triton" else _CHOICE[key]), _CONFIG[key]


def _time_both(x, weight, residual, norm=None) -> tuple[str, dict | None]:
    """("torch" or "triton", the fastest Triton tile shape or None): the lower GPU time per call of cuBLAS and of
    each of the kernel's ``candidate_configs`` (tile shapes the compiler refuses are skipped)."""
    candidate_configs = triton_entry(_MODULE, "candidate_configs")
    small_batch_linear_triton = triton_entry(*_ENTRY)
    from triton.runtime.errors import OutOfResources

    norm_weight, eps = norm if norm is not None else (None, 0.0)
    weights = _cold_copies(weight)

    def cublas():
        for w in weights:
            x_in = rms_norm(x, norm_weight, eps) if norm is not None else x
            torch.addmm(residual, x_in, w.t()) if residual is not None else F.linear(x_in, w)

    times = {("torch", None): _graph_time_ms(cublas)}
    with triton_entry(_MODULE, "transient_workspaces")():  # the tile shapes not chosen keep no workspace
        for cfg in candidate_configs(x.shape[0], *weight.shape):
            def fused(cfg=cfg):
                for w in weights:
                    small_batch_linear_triton(x, w, residual, cfg, normalize=norm is not None,
                                              norm_weight=norm_weight, norm_eps=eps)
            try:
                times[("triton", tuple(cfg.items()))] = _graph_time_ms(fused)
            except OutOfResources:
                continue
    triton_times = {c: t for c, t in times.items() if c[0] == "triton"}
    best_config = dict(min(triton_times, key=triton_times.get)[1]) if triton_times else None
    return min(times, key=times.get)[0], best_config


def _cold_copies(weight: torch.Tensor, most: int = 64) -> list[torch.Tensor]:
    """``weight`` and copies of it, together over twice the L2 cache (up to ``most``): calls that cycle through
    them stream the weight from memory as a decode step does, where the other layers' weights evict it (one
    weight timed over and over stays in L2 and measures the cache instead)."""
    if not weight.is_cuda:
        return [weight]
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 64 << 20)
    count = max(2, min(most, -(-2 * l2 // (weight.numel() * weight.element_size()))))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def _graph_time_ms(fn, calls: int = 3, replays: int = 3) -> float:
    """GPU milliseconds of ``calls`` calls of ``fn`` replayed from a CUDA graph (as a graphed decode step runs them;
    eager timing would measure the Python launch cost instead), the least of ``replays``."""
    fn()  # compile / pick the algorithm outside the recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end))
    return best
