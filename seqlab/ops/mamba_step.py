"""Mamba-1's dt projection and selective state update for one token as one fused op (Gu & Dao 2023, Sec. 3, one
position of Algorithm 2)::

    y = selective_step_dt_proj(state, u, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z)
        Δ = softplus(dt_low W_dtᵀ + dt_bias),  A = -exp(A_log)                                    # (B, D), (D, N)
        h = exp(Δ A) h + Δ u B;   y = (<h, C> + D u) silu(z)                                     # (B, D, N), (B, D)

Glossary: B batch, D d_inner channels, N d_state, R dt_rank.

The same math as ``selective_state_update(..., dt_proj_weight=W_dt, dt_softplus=True, A_is_log=True)``, in one
launch instead of the dt_proj GEMM and the step kernel on CUDA (``seqlab.ops.triton.mamba_step``). Decode has no
backward: the Triton path is forward only. Paths: ``ref`` and ``torch`` run the same plain PyTorch step (a single
position has no loop to parallelise); ``triton`` the fused kernel, for CUDA tensors of float32 or 16-bit dtypes
(``auto`` takes it there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import (
    check_backend,
    check_dim,
    check_tensor,
    require_triton,
    triton_entry,
    triton_usable,
)
from seqlab.ops._graph_timing import cold_copies, graph_time_ms

_KERNELS = "seqlab.ops.triton.mamba_step"
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# validation and dispatch helpers


def _check_real(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.is_complex():
            raise InputError(name, "a real floating-point tensor", f"dtype {t.dtype}")


def _check_same_device(dev: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise InputError(name, f"a tensor on {dev} like x", f"one on {t.device}")


def _triton_misfit(tensors: dict) -> InputError | None:
    """An InputError naming the first input the fused kernel does not take, or None when they all fit."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in _TRITON_DTYPES:
            return InputError(name, "float32, bfloat16 or float16 for backend='triton' (use backend='torch')",
                              f"dtype {t.dtype}")
    return None


def _triton_kernel(op: str, backend: str, x: torch.Tensor, tensors: dict, name: str):
    """The Triton entry point to run, or None for the PyTorch path: ``backend="triton"`` requires it (and inputs
    it takes); ``"auto"`` takes it on CUDA when Triton is usable and the inputs fit."""
    misfit = _triton_misfit(tensors)
    if backend == "triton":
        require_triton(op, *tensors.values())
        if misfit is not None:
            raise misfit
        return triton_entry(_KERNELS, name, required=True)
    if backend == "auto" and x.is_cuda and misfit is None and triton_usable(*tensors.values()):
        return triton_entry(_KERNELS, name)
    return None


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (for exact checks), float32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------------------
# dt projection + selective state update


def selective_step_dt_proj(
    state: torch.Tensor,
    x: torch.Tensor,
    dt_low: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor | None,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """Mamba's dt projection and selective state update for one token: returns y (B, D) in x's dtype and updates
    ``state (B, D, N)`` in place. ``config``: the Triton kernel's tile (seqlab.ops.triton.mamba_step), or None for
    its default.

    x (B, D) the conv output u; dt_low (B, R); dt_proj_weight (D, R); dt_bias (D,) or None; A_log (D, N);
    B, C (B, N); D (D,) or None; z (B, D) or None. x, dt_low, B, C and z may be strided views (column slices of
    the projections' outputs). Equal to ``selective_state_update(state, x, dt_low, A_log, B, C, D, z, dt_bias,
    dt_softplus=True, A_is_log=True, dt_proj_weight=dt_proj_weight)``: Δ = softplus(dt_low W_dtᵀ + dt_bias) in
    float32, never rounded. The state may be float32 or 16-bit (updated in float32, rounded once when stored).
    """
    check_backend(backend)
    check_tensor("x", x, ("B", "D"))
    dev = x.device
    batch, dim = x.shape
    check_tensor("A_log", A_log, ("D", "N"), device=dev)
    check_dim("A_log", A_log, 0, dim, "D, the channels of x")
    d_state = A_log.shape[1]
    check_tensor("state", state, ("B", "D", "N"), device=dev)
    if tuple(state.shape) != (batch, dim, d_state):
        raise InputError("state", f"shape {(batch, dim, d_state)} (B and D of x, N of A_log)",
                         f"shape {tuple(state.shape)}")
    check_tensor("dt_proj_weight", dt_proj_weight, ("D", "R"), device=dev)
    check_dim("dt_proj_weight", dt_proj_weight, 0, dim, "D, the channels of x")
    rank = dt_proj_weight.shape[1]
    check_tensor("dt_low", dt_low, ("B", "R"), device=dev)
    if tuple(dt_low.shape) != (batch, rank):
        raise InputError("dt_low", f"shape {(batch, rank)} (B of x, R of dt_proj_weight)",
                         f"shape {tuple(dt_low.shape)}")
    check_tensor("dt_bias", dt_bias, (dim,), optional=True, device=dev)
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, ("B", "N"), device=dev)
        if tuple(t.shape) != (batch, d_state):
            raise InputError(name, f"shape {(batch, d_state)} (B of x, N of A_log)", f"shape {tuple(t.shape)}")
    check_tensor("D", D, (dim,), optional=True, device=dev)
    check_tensor("z", z, ("B", "D"), optional=True, device=dev)
    if z is not None and z.shape != x.shape:
        raise InputError("z", f"shape {tuple(x.shape)} like x", f"shape {tuple(z.shape)}")
    tensors = dict(state=state, x=x, dt_low=dt_low, dt_proj_weight=dt_proj_weight, dt_bias=dt_bias, A_log=A_log,
                   B=B, C=C, D=D, z=z)
    _check_real(**tensors)
    _check_same_device(dev, **tensors)

    kernel = _triton_kernel("selective_step_dt_proj", backend, x, tensors, "selective_step_dt_proj_triton")
    if kernel is not None and x.numel() > 0:  # empty inputs: nothing to launch
        return kernel(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z, config=config)
    return selective_step_dt_proj_ref(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z)


def selective_step_dt_proj_ref(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z):
    """Plain PyTorch, float32 (float64 for float64 inputs): Δ, then the zero-order-hold step of every state."""
    dtype = _compute_dtype(state, x, dt_low)
    xc = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        delta = F.linear(dt_low.to(dtype), dt_proj_weight.to(dtype))  # (B, D)
    if dt_bias is not None:
        delta = delta + dt_bias.to(dtype)
    delta = F.softplus(delta)
    A = -torch.exp(A_log.to(dtype))  # (D, N), S4D-real parameterisation
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (B, D, N)
    h = decay * state.to(dtype) + (delta * xc).unsqueeze(-1) * B.to(dtype).unsqueeze(1)  # (B, D, N)
    state.copy_(h)
    y = (h * C.to(dtype).unsqueeze(1)).sum(dim=-1)  # (B, D)
    if D is not None:
        y = y + D.to(dtype) * xc
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# the fused kernel or the pair, per shape

# Tiles of the fused kernel timed against the pair (dt GEMM + step kernel): the two fastest of the 75 swept on an
# H200 at Mamba 1.4b's step, batch 64, bf16 state (benchmarks/generate-gpu/run13: 10.46 and 10.65 us per layer
# against 11.51 for the pair), and the kernel's default.
FUSED_CANDIDATES = (
    dict(BLOCK_B=32, BLOCK_D=16, BLOCK_N=16, WARPS=2),
    dict(BLOCK_B=16, BLOCK_D=16, BLOCK_N=16, WARPS=1),
    None,
)
_STEP_CHOICE: dict[tuple, tuple[str, dict | None]] = {}  # key -> ("fused", tile or None) | ("pair", None)


def dt_proj_step_choice(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z) -> tuple[str, dict | None]:
    """("fused", tile) or ("pair", None): whether selective_step_dt_proj (with that tile) or the dt GEMM followed
    by the step kernel (selective_state_update) runs this shape faster on its GPU. Timed once per shape (batch,
    channels, states, rank, dtypes, optional inputs) in CUDA graphs, the state streamed from copies over twice the
    L2 as in a decode step, then remembered; inside a recording with nothing remembered, and off CUDA, the pair."""
    if not x.is_cuda:
        return "pair", None
    key = (x.device, *x.shape, A_log.shape[1], dt_proj_weight.shape[1], state.dtype, x.dtype,
           dt_bias is not None, D is not None, z is not None)
    if key not in _STEP_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return "pair", None
        _STEP_CHOICE[key] = _time_step_kinds(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z)
    return _STEP_CHOICE[key]


def _time_step_kinds(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z) -> tuple[str, dict | None]:
    from triton.runtime.errors import OutOfResources

    from seqlab.ops.selective_scan import selective_state_update

    states = cold_copies(state.detach().clone())

    def pair():
        for s in states:
            selective_state_update(s, x, dt_low, A_log, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                   A_is_log=True, dt_proj_weight=dt_proj_weight)

    times = {("pair", None): graph_time_ms(pair)}
    for cfg in FUSED_CANDIDATES:
        def fused(cfg=cfg):
            for s in states:
                selective_step_dt_proj(s, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z, config=cfg)
        try:
            times[("fused", None if cfg is None else tuple(cfg.items()))] = graph_time_ms(fused)
        except OutOfResources:
            continue
    kind, tile = min(times, key=times.get)
    return kind, None if tile is None else dict(tile)
