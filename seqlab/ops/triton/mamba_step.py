"""The Mamba-1 decode step's dt projection and state update in one launch (op: seqlab.ops.mamba_step).

    selective_step_dt_proj:  Δ = softplus(dt_low W_dtᵀ + dt_bias);  h = exp(Δ A) h + Δ x B,  A = -exp(A_log)
                             y = (<h, C> + D x) silu(z)

It replaces the dt_proj GEMM and the state update kernel. (The conv step that comes before x_proj runs in the
in_proj GEMM's epilogue: seqlab.ops.decode_linear.decode_linear_conv.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2
from seqlab.ops.triton.jit_math import softplus

# Kernel shape, overridable for benchmarks that sweep it: STEP_BLOCK_B, STEP_BLOCK_D, STEP_BLOCK_N (states per
# loop step), STEP_WARPS
TUNING: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _f32_dot(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether tl.dot runs on float32 operands (IEEE): float32 or mixed inputs, or under the interpreter."""
    return _interpreting() or a != b or a not in (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# dt projection + selective state update


@triton.jit
def _selective_step_dt_proj_kernel(state_ptr, x_ptr, low_ptr, wdt_ptr, bias_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr,
                                   z_ptr, y_ptr,
                                   BATCH, DIM, N, R,
                                   ss_b, ss_d, ss_n, sx_b, sx_d, sl_b, sl_r, sw_d, sw_r, s_bias, sA_d, sA_n,
                                   sB_b, sB_n, sC_b, sC_n, s_D, sz_b, sz_d,
                                   HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                                   F32_DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (BLOCK_B rows, BLOCK_D channels): the tile's Δ as one small GEMM, then the state update of the
    (BLOCK_B, BLOCK_D, N) state tile, BLOCK_N states at a time."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_b = offs_b < BATCH
    mask_d = offs_d < DIM
    mask_bd = mask_b[:, None] & mask_d[None, :]
    rows = offs_b.to(tl.int64)
    # Δ = softplus(dt_low W_dtᵀ + dt_bias): (BLOCK_B, R) @ (R, BLOCK_D) on tensor cores
    dt = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        low = tl.load(low_ptr + rows[:, None] * sl_b + offs_r[None, :] * sl_r, mask=mask_b[:, None] & mask_r[None, :],
                      other=0.0)  # (BB, BR)
        wt = tl.load(wdt_ptr + offs_r[:, None] * sw_r + offs_d[None, :] * sw_d, mask=mask_r[:, None] & mask_d[None, :],
                     other=0.0)  # (BR, BD)
        if F32_DOT:  # float32 or mixed inputs, and the interpreter's dot on 16-bit inputs
            dt += tl.dot(low.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            dt += tl.dot(low, wt)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d * s_bias, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    dt = softplus(dt)
    x = tl.load(x_ptr + rows[:, None] * sx_b + offs_d[None, :] * sx_d, mask=mask_bd, other=0.0).to(tl.float32)
    dtx = dt * x  # (BB, BD)
    y = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        A = -tl.exp(tl.load(A_log_ptr + offs_d[:, None] * sA_d + offs_n[None, :] * sA_n,
                            mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32))  # (BD, BN)
        Bm = tl.load(B_ptr + rows[:, None] * sB_b + offs_n[None, :] * sB_n, mask=mask_b[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)  # (BB, BN)
        Cm = tl.load(C_ptr + rows[:, None] * sC_b + offs_n[None, :] * sC_n, mask=mask_b[:, None] & mask_n[None, :],
                     other=0.0).to(tl.float32)
        mask3 = mask_bd[:, :, None] & mask_n[None, None, :]
        sp = state_ptr + rows[:, None, None] * ss_b + offs_d[None, :, None] * ss_d + offs_n[None, None, :] * ss_n
        h = tl.load(sp, mask=mask3, other=0.0).to(tl.float32)  # (BB, BD, BN)
        h = tl.exp(dt[:, :, None] * A[None, :, :]) * h + dtx[:, :, None] * Bm[:, None, :]  # ZOH A, Euler B
        tl.store(sp, h.to(state_ptr.dtype.element_ty), mask=mask3)
        y += tl.sum(h * Cm[:, None, :], axis=2)
    if HAS_D:
        y += tl.load(D_ptr + offs_d * s_D, mask=mask_d, other=0.0).to(tl.float32)[None, :] * x
    if HAS_Z:
        z = tl.load(z_ptr + rows[:, None] * sz_b + offs_d[None, :] * sz_d, mask=mask_bd, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + rows[:, None] * DIM + offs_d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_bd)


def selective_step_dt_proj_config(batch: int, dim: int) -> dict:
    """Tile shape of selective_step_dt_proj: 16 rows (the smallest tl.dot tile) x 32 channels, stepping the
    (16, 32, N) state tile 8 states at a time, 4 warps. Compiled for sm_90 that needs 128 registers a thread (all
    16 states at once: 240), so 4 programs fit on an SM: Mamba 1.4b at batch 64 (D 4096) launches 4 x 128 = 512
    programs, all resident at once on an H200's 132 SMs. The (32, R) slice of W_dt is read once per row tile."""
    return dict(BLOCK_B=TUNING.get("STEP_BLOCK_B", 16), BLOCK_D=TUNING.get("STEP_BLOCK_D", 32),
                BLOCK_N=TUNING.get("STEP_BLOCK_N", 8), WARPS=TUNING.get("STEP_WARPS", 4))


def selective_step_dt_proj_triton(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z,
                                  config: dict | None = None):
    """state (B, D, N) updated in place; x (B, D); dt_low (B, R); dt_proj_weight (D, R); dt_bias, D (D,) or None;
    A_log (D, N); B, C (B, N); z (B, D) or None. Returns y (B, D) in x's dtype.

    Every input may be a strided view (dt_low, B, C are column slices of x_proj's output, z of in_proj's); the
    state may be float32 or 16-bit (updated in float32, rounded once when stored)."""
    batch, dim = x.shape
    N = A_log.shape[1]
    R = dt_proj_weight.shape[1]
    cfg = config or selective_step_dt_proj_config(batch, dim)
    y = torch.empty((batch, dim), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(dim, cfg["BLOCK_D"]))
    _selective_step_dt_proj_kernel[grid](
        state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z, y, batch, dim, N, R,
        *state.stride(), *x.stride(), *dt_low.stride(), *dt_proj_weight.stride(),
        dt_bias.stride(0) if dt_bias is not None else 0, *A_log.stride(), *B.stride(), *C.stride(),
        D.stride(0) if D is not None else 0, *(z.stride() if z is not None else (0, 0)),
        HAS_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None,
        F32_DOT=_f32_dot(dt_low.dtype, dt_proj_weight.dtype), BLOCK_B=cfg["BLOCK_B"], BLOCK_D=cfg["BLOCK_D"],
        BLOCK_N=min(cfg["BLOCK_N"], max(2, next_pow2(N))), BLOCK_R=min(64, max(16, next_pow2(R))),
        num_warps=cfg["WARPS"])
    return y
