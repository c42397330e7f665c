"""Linear layers for a few rows (a decode step): cuBLAS or the small-batch Triton GEMM, whichever is faster.

    y = x Wᵀ (+ bias) (+ residual)                  x (..., K) with at most 128 rows, W (N, K), residual (..., N)
    y = rms_norm(x, g, eps) Wᵀ (+ bias) (+ residual)    with ``norm=(g, eps)``: a pre-norm and its in-projection
    decode_linear_conv: y as above, then its first C columns through one depthwise causal conv step + SiLU
        (Mamba's in-projection and conv in a decode step), the conv state (rows, C, W-1) updated in place

A decode step is weight-streaming: each GEMM reads its whole weight for a handful of rows. Which kernel streams a
given shape faster depends on the shape and the GPU, so the first call of each (device, rows, N, K, dtype,
residual, norm, conv) times the candidates once, each replayed from a small CUDA graph outside any other recording:
cuBLAS with the norm and the conv step as their own kernels ("torch"), the Triton kernel with everything folded in
("triton", a few tile shapes) and, with a norm, the norm kernel followed by the Triton kernel ("triton_prenorm");
it remembers the winner and the fastest Triton tile shape. Calls during a recording use the remembered choice, or
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
from seqlab.ops._graph_timing import cold_copies, graph_time_ms
from seqlab.ops.conv import conv_step
from seqlab.ops.norm import rms_norm

MAX_ROWS = 128  # rows the Triton kernel tiles in one block (seqlab.ops.triton.small_batch_linear.MAX_ROWS)
_MODULE = "seqlab.ops.triton.small_batch_linear"
_ENTRY = (_MODULE, "small_batch_linear_triton")
_CHOICE: dict[tuple, str] = {}  # key -> "torch" | "triton" | "triton_prenorm" (benchmarks/decode_profile.py reads it)
_CONFIG: dict[tuple, dict | None] = {}  # key -> the fastest Triton tile shape (None: none could run; the default)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None,
                  norm: tuple[torch.Tensor | None, float] | None = None) -> torch.Tensor:
    """``F.linear(x', weight, bias) (+ residual)``, shape (..., N), through the faster kernel for few rows, where
    ``x' = x``, or ``rms_norm(x, norm_weight, eps)`` (seqlab.mixers.norm.rms_norm) with ``norm=(norm_weight or
    None, eps)``."""
    _check_linear_args(x, weight, bias, residual)
    n, k = weight.shape
    norm_weight, eps = _check_norm(norm, k)
    if _triton_applies(x, weight, bias, residual, norm_weight):
        x2 = x.reshape(-1, k)
        r2 = residual.reshape(-1, n) if residual is not None else None
        kind, config = _choose(x2, weight, r2, norm)
        if kind != "torch":
            return _triton_linear(kind, x2, weight, r2, config, norm).view(*x.shape[:-1], n)
    return _torch_linear(x, weight, bias, residual, norm)


def decode_linear_conv(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor,
                       conv_bias: torch.Tensor | None = None,
                       norm: tuple[torch.Tensor | None, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), weight (N, K), conv_state (M, C, W-1) with C <= N, conv_weight (C, W), conv_bias (C,) or None ->
    (u (M, C), rest (M, N - C)):

        y = x' Wᵀ  (x' as in decode_linear);   u = silu(conv_step(conv_state, y[:, :C]));   rest = y[:, C:]

    conv_state is updated in place (shifted left, y[:, :C] appended), as seqlab.ops.conv.conv_step does. On CUDA
    the Triton kernel may do all of it in one launch (the conv in the GEMM's epilogue); u and rest may then be
    strided views of one buffer."""
    n, k = weight.shape
    norm_weight, eps = _check_norm(norm, k)
    if x.dim() != 2 or x.shape[1] != k:
        raise InputError("decode_linear_conv: x", f"a (M, {k}) tensor (K of the weight)", f"shape {tuple(x.shape)}")
    channels, width = conv_weight.shape if conv_weight.dim() == 2 else (-1, -1)
    if not 0 < channels <= n:
        raise InputError("decode_linear_conv: conv_weight", f"a (C, W) tensor with C <= {n} (N of the weight)",
                         f"shape {tuple(conv_weight.shape)}")
    if tuple(conv_state.shape) != (x.shape[0], channels, width - 1):
        raise InputError("decode_linear_conv: conv_state", f"shape {(x.shape[0], channels, width - 1)} (rows of x, "
                         "C and W - 1 of conv_weight)", f"shape {tuple(conv_state.shape)}")
    conv = (conv_state, conv_weight, conv_bias)
    if _triton_applies(x, weight, None, None, norm_weight) and _conv_fits(conv):
        kind, config = _choose(x, weight, None, norm, conv)
        if kind != "torch":
            out = _triton_linear(kind, x, weight, None, config, norm, conv)
            return out[:, :channels], out[:, channels:]
    out = _torch_linear(x, weight, None, None, norm)
    return conv_step(conv_state, out[:, :channels], conv_weight, conv_bias, activation="silu"), out[:, channels:]


def _triton_linear(kind, x, weight, residual, config, norm, conv=None) -> torch.Tensor:
    """The Triton kernel for x (M, K): the norm folded in ("triton") or run first ("triton_prenorm")."""
    norm_weight, eps = norm if norm is not None else (None, 0.0)
    if kind == "triton_prenorm" and norm is not None:
        x, norm = rms_norm(x, norm_weight, eps), None
    return triton_entry(*_ENTRY)(x, weight, residual, config, normalize=norm is not None,
                                 norm_weight=norm_weight if norm is not None else None, norm_eps=eps, conv=conv)


def _torch_linear(x, weight, bias, residual, norm) -> torch.Tensor:
    n, k = weight.shape
    if norm is not None:
        x = rms_norm(x, *norm)
    if residual is not None and bias is None and _one_dtype(x, weight, residual):
        out = torch.addmm(residual.reshape(-1, n), x.reshape(-1, k), weight.t())  # the add in the GEMM's epilogue
        return out.view(*x.shape[:-1], n)
    out = F.linear(x, weight, bias)
    return out if residual is None else residual + out


def _conv_fits(conv) -> bool:
    """The conv the Triton kernel folds in: width 2..4, contiguous state and weight, floating state."""
    conv_state, conv_weight, conv_bias = conv
    return (2 <= conv_weight.shape[1] <= 4 and conv_state.is_contiguous() and conv_weight.is_contiguous()
            and conv_state.is_floating_point() and conv_state.device == conv_weight.device
            and (conv_bias is None or conv_bias.dim() == 1))


def _check_linear_args(x, weight, bias, residual) -> None:
    """InputError naming the argument unless x (..., K), weight (N, K), bias (N,), residual (..., N) agree in shape,
    device and (outside autocast) dtype. Plain attribute tests: this runs on every eager decode GEMM."""
    for name, t in (("weight", weight), ("x", x), ("bias", bias), ("residual", residual)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise InputError(f"decode_linear: {name}", "a real floating-point tensor",
                             f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
    if weight.dim() != 2:
        raise InputError("decode_linear: weight", "shape (N, K)", f"shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise InputError("decode_linear: x", f"shape (..., {k}) (K of the weight)", f"shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise InputError("decode_linear: bias", f"shape ({n},) (N of the weight)", f"shape {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        raise InputError("decode_linear: residual", f"shape {(*x.shape[:-1], n)}", f"shape {tuple(residual.shape)}")
    autocast = torch.is_autocast_enabled(x.device.type)
    for name, t in (("x", x), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.device != weight.device:
            raise InputError(f"decode_linear: {name}", f"a tensor on {weight.device} like the weight",
                             f"one on {t.device}")
        # autocast casts x and bias; a float32 residual stream then stays float32
        if not autocast and t.dtype != weight.dtype:
            raise InputError(f"decode_linear: {name}", f"dtype {weight.dtype} like the weight (or autocast)",
                             f"dtype {t.dtype}")


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
            norm: tuple | None = None, conv: tuple | None = None) -> tuple[str, dict | None]:
    """(kind, Triton tile shape or None for the default) for x (M, K): remembered per shape, timed on first use."""
    forced = os.environ.get("SEQLAB_DECODE_GEMM", "auto")
    if forced == "torch":
        return "torch", None
    key = (x.device, x.shape[0], *weight.shape, x.dtype, residual is not None, norm is not None,
           None if conv is None else tuple(conv[1].shape))
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():  # no timing inside a recording
            return ("triton", None) if forced == "triton" else ("torch", None)
        _CHOICE[key], _CONFIG[key] = _time_kinds(x, weight, residual, norm, conv)
    if forced == "triton" and _CHOICE[key] == "torch":
        return "triton", _CONFIG[key]
    return _CHOICE[key], _CONFIG[key]


def _time_kinds(x, weight, residual, norm=None, conv=None) -> tuple[str, dict | None]:
    """(the kind with the lower GPU time per call, the fastest Triton tile shape or None): cuBLAS, then each of the
    kernel's ``candidate_configs`` with everything folded in, then (with a norm) each with the norm run first. Tile
    shapes the compiler refuses are skipped; the conv state is a copy (timing leaves the real one alone)."""
    candidate_configs = triton_entry(_MODULE, "candidate_configs")
    from triton.runtime.errors import OutOfResources

    if conv is not None:
        conv = (conv[0].clone(), *conv[1:])
    weights = cold_copies(weight)

    def cublas():
        for w in weights:
            out = _torch_linear(x, w, None, residual, norm)
            if conv is not None:
                conv_step(conv[0], out[:, :conv[1].shape[0]], conv[1], conv[2], activation="silu")

    times = {("torch", None): graph_time_ms(cublas)}
    kinds = ("triton", "triton_prenorm") if norm is not None else ("triton",)
    with triton_entry(_MODULE, "transient_workspaces")():  # the tile shapes not chosen keep no workspace
        for kind in kinds:
            for cfg in candidate_configs(x.shape[0], *weight.shape):
                def fused(cfg=cfg, kind=kind):
                    for w in weights:
                        _triton_linear(kind, x, w, residual, cfg, norm, conv)
                try:
                    times[(kind, tuple(cfg.items()))] = graph_time_ms(fused)
                except OutOfResources:
                    continue
    best = min(times, key=times.get)
    triton_times = {c: t for c, t in times.items() if c[0] != "torch"}
    config = best[1] if best[0] != "torch" else (min(triton_times, key=triton_times.get)[1] if triton_times else None)
    return best[0], dict(config) if config is not None else None
