"""The Mamba-1 decode step in two launches around the in_proj and out_proj GEMMs (ops: seqlab.ops.mamba_step).

    conv_x_proj_step:        u = silu(bias + sum_k w[k] window[k]),  window = (conv_state, x);  conv_state <- window[1:]
                             x_dbl = u x_projᵀ                                    (u rounded to x's dtype first)
    selective_step_dt_proj:  Δ = softplus(dt_low W_dtᵀ + dt_bias);  h = exp(Δ A) h + Δ x B,  A = -exp(A_log)
                             y = (<h, C> + D x) silu(z)

At batch 64 each of these replaces three or four tiny launches (conv, x_proj GEMM and its split-K reduce; dt_proj
GEMM and the state update), whose launch gaps and ramp-up cost more than their work.

conv_x_proj_step is a split-K GEMM whose K is the conv's channels: a program owns BLOCK_B batch rows and one slice
of the D channels, so every channel's conv is computed (and its state read and written) exactly once, and the x_proj
weight slice is multiplied by the u tile it just made. Each program stores its float32 partial (BLOCK_B, O) in its
own workspace slot; the last program of each row tile to arrive (an int32 arrival counter per row tile) sums the
slots in a fixed order and writes x_dbl, then zeroes the counter: the arrive-and-sum steps of the decode GEMM
(``last_to_arrive``, ``sum_slots`` in seqlab.ops.triton.small_batch_linear). One launch, CUDA-graph safe,
deterministic.

Why row tiles of 16 and not all rows in one tile: the last arrival reads split x rows x O float32 partials, which
at B=64, O=160 and 32 slices would be 1.3 MB through one SM, as much as the weight itself. With 16-row tiles the
reductions of the row tiles run in parallel and each reads split x 16 x O floats (164 KB at split 16); the x_proj
weight is read once per row tile, from L2 after the first.

The workspaces are cached per (device, O, row tiles, split) and shared by every call of that shape: calls must not
run concurrently on different streams, and the first call of a shape (which allocates them) must come before a
CUDA graph records one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2
from seqlab.ops.triton.jit_math import softplus
from seqlab.ops.triton.small_batch_linear import last_to_arrive, sum_slots

# x_proj outputs O = dt_rank + 2 d_state that one program holds as a single (BLOCK_B, O) accumulator tile
MAX_OUTPUTS = 512

# Kernel shapes, overridable for benchmarks that sweep them.
#   conv_x_proj_step:       BLOCK_B (row tile), BLOCK_K (channels per loop step), SPLIT (channel slices), WARPS
#   selective_step_dt_proj: STEP_BLOCK_B, STEP_BLOCK_D, STEP_BLOCK_N (states per loop step), STEP_WARPS
TUNING: dict = {}
TARGET_PROGRAMS = 64  # conv_x_proj_step: programs to stream the x_proj weight (about half of an H200's 132 SMs)
MAX_REDUCE_BYTES = 256 * 1024  # conv_x_proj_step: what one last arrival may read back from the workspace


# ---------------------------------------------------------------------------------------------------------
# conv step + SiLU + x_proj


@triton.jit
def _conv_x_proj_kernel(state_ptr, x_ptr, cw_ptr, cb_ptr, w_ptr, u_ptr, out_ptr, ws_ptr, count_ptr,
                        BATCH, DIM, O, K_PER_SPLIT, SLOT,
                        ss_b, ss_d, ss_w, sx_b, sx_d, scw_d, scw_w, scb, sw_o, sw_d,
                        W: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    """Program (row tile, channel slice): the conv step of its (BLOCK_B, slice) inputs, then their share of
    u x_projᵀ; the last arrival of the row tile adds up the shares."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_o = tl.arange(0, BLOCK_O)
    offs_w = tl.arange(0, BLOCK_W)
    mask_b = offs_b < BATCH
    mask_o = offs_o < O
    rows = offs_b.to(tl.int64)
    slot_w = offs_w[None, None, :]  # window slots 0..W-2 come from the state, slot W-1 is x
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, DIM)
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask_bk = mask_b[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx_b + offs_k[None, :] * sx_d, mask=mask_bk, other=0.0)  # (BB, BK)
        sp = state_ptr + rows[:, None, None] * ss_b + offs_k[None, :, None] * ss_d  # (BB, BK, 1)
        in_state = mask_bk[:, :, None] & (slot_w < W - 1)
        window = tl.load(sp + slot_w * ss_w, mask=in_state, other=0.0).to(tl.float32)  # (BB, BK, BW)
        window = tl.where(slot_w == W - 1, x.to(tl.float32)[:, :, None], window)
        cw = tl.load(cw_ptr + offs_k[:, None] * scw_d + offs_w[None, :] * scw_w,
                     mask=mask_k[:, None] & (offs_w < W)[None, :], other=0.0).to(tl.float32)  # (BK, BW)
        pre = tl.sum(window * cw[None, :, :], axis=2)  # (BB, BK)
        if HAS_BIAS:
            pre += tl.load(cb_ptr + offs_k * scb, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        u = (pre * tl.sigmoid(pre)).to(u_ptr.dtype.element_ty)  # rounded as the unfused path feeds it to x_proj
        u = tl.where(mask_bk, u, 0.0)
        tl.store(u_ptr + rows[:, None] * DIM + offs_k[None, :], u, mask=mask_bk)
        # state <- window[1:]: slot j takes window slot j+1. A gather of the loaded window (exact: the state's
        # values and x round-trip through float32 unchanged) reads nothing back from memory, so no thread can
        # overwrite a slot that another has yet to load.
        shift = tl.minimum(slot_w + 1, BLOCK_W - 1) + tl.zeros((BLOCK_B, BLOCK_K, BLOCK_W), dtype=tl.int32)
        new = tl.gather(window, shift, axis=2)
        tl.store(sp + slot_w * ss_w, new.to(state_ptr.dtype.element_ty), mask=in_state)
        wt = tl.load(w_ptr + offs_o[:, None] * sw_o + offs_k[None, :] * sw_d,
                     mask=mask_o[:, None] & mask_k[None, :], other=0.0)  # (BO, BK)
        if F32_DOT:  # float32 or mixed inputs, and the interpreter's dot on 16-bit inputs
            acc += tl.dot(u.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(u, tl.trans(wt))
    mask_bo = mask_b[:, None] & mask_o[None, :]
    off = rows[:, None] * O + offs_o[None, :]  # x_dbl (B, O) and every workspace slot share this layout
    if SPLIT == 1:
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask_bo)
    else:
        tl.store(ws_ptr + pid_k * SLOT + off, acc, mask=mask_bo)
        if last_to_arrive(count_ptr + pid_b, SPLIT):
            total = sum_slots(ws_ptr, off, mask_bo, SLOT, SPLIT)
            tl.store(out_ptr + off, total.to(out_ptr.dtype.element_ty), mask=mask_bo)


_WORKSPACES: dict = {}


def _workspace(device: torch.device, outputs: int, row_tiles: int, block_b: int,
               split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (split, row_tiles * block_b, outputs) partial sums and int32 (row_tiles,) arrival counters (zero
    between calls)."""
    key = (device, outputs, row_tiles, block_b, split)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(split * row_tiles * block_b * outputs, device=device, dtype=torch.float32),
                            torch.zeros(row_tiles, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def conv_x_proj_config(batch: int, dim: int, outputs: int) -> dict:
    """Tile shape of conv_x_proj_step.

    BLOCK_B = 16 rows (the smallest tl.dot tile) per row tile. SPLIT channel slices so that row tiles x slices
    is about TARGET_PROGRAMS (enough programs to stream the weight and the conv state from most SMs), but no more
    than keeps one last arrival's read-back (split x rows x O float32) under MAX_REDUCE_BYTES. Mamba 1.4b at
    batch 64 (D 4096, O 160): 4 row tiles x 16 slices of 256 channels = 64 programs; batch 1: 64 slices of 64.
    BLOCK_K keeps the (O, BLOCK_K) weight tile at 8192 elements or fewer (32 for O = 160). 8 warps: compiled for
    sm_90 at that shape it needs 142 registers a thread and no spills (4 warps: 255).
    """
    block_b = TUNING.get("BLOCK_B", 16)
    block_o = max(16, next_pow2(outputs))
    block_k = TUNING.get("BLOCK_K") or max(16, min(64, 8192 // block_o))
    row_tiles = triton.cdiv(batch, block_b)
    reduce_cap = MAX_REDUCE_BYTES // (4 * min(batch, block_b) * outputs)
    split = TUNING.get("SPLIT") or max(1, min(triton.cdiv(TARGET_PROGRAMS, row_tiles), reduce_cap,
                                              triton.cdiv(dim, block_k)))
    return dict(BLOCK_B=block_b, BLOCK_K=block_k, SPLIT=split, WARPS=TUNING.get("WARPS", 8))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _f32_dot(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether tl.dot runs on float32 operands (IEEE): float32 or mixed inputs, or under the interpreter."""
    return _interpreting() or a != b or a not in (torch.bfloat16, torch.float16)


def conv_x_proj_step_triton(conv_state, x, conv_weight, conv_bias, x_proj_weight, config: dict | None = None):
    """conv_state (B, D, W-1) updated in place; x (B, D); conv_weight (D, W); conv_bias (D,) or None;
    x_proj_weight (O, D), O <= MAX_OUTPUTS. Returns ``(u (B, D), x_dbl (B, O))`` in x's dtype.

    Every input may be a strided view (x is typically a column slice of the in_proj output); products
    accumulate in float32 (tensor cores when u and the weight share a 16-bit dtype, IEEE float32 otherwise)."""
    batch, dim = x.shape
    W = conv_weight.shape[1]
    outputs = x_proj_weight.shape[0]
    if outputs > MAX_OUTPUTS:
        raise ValueError(f"conv_x_proj_step_triton: x_proj_weight: expected at most {MAX_OUTPUTS} rows, "
                         f"got {outputs}")
    cfg = config or conv_x_proj_config(batch, dim, outputs)
    block_b, block_k = cfg["BLOCK_B"], cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(dim, cfg["SPLIT"]), block_k) * block_k
    split = triton.cdiv(dim, k_per_split)  # no empty slices
    row_tiles = triton.cdiv(batch, block_b)
    ws, counts = _workspace(x.device, outputs, row_tiles, block_b, split)
    u = torch.empty((batch, dim), device=x.device, dtype=x.dtype)
    x_dbl = torch.empty((batch, outputs), device=x.device, dtype=x.dtype)
    _conv_x_proj_kernel[(row_tiles, split)](
        conv_state, x, conv_weight, conv_bias, x_proj_weight, u, x_dbl, ws, counts,
        batch, dim, outputs, k_per_split, row_tiles * block_b * outputs,
        *conv_state.stride(), *x.stride(), *conv_weight.stride(),
        conv_bias.stride(0) if conv_bias is not None else 0, *x_proj_weight.stride(),
        W=W, HAS_BIAS=conv_bias is not None, SPLIT=split, F32_DOT=_f32_dot(x.dtype, x_proj_weight.dtype),
        BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_O=max(16, next_pow2(outputs)), BLOCK_W=max(2, next_pow2(W)),
        num_warps=cfg["WARPS"])
    return u, x_dbl


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
