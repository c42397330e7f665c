"""One-token decode steps in Triton: each is one launch that updates its state in place.

No host synchronisation and no size-dependent Python branching on values, so a decode loop built from these
can be captured in a CUDA graph. The math is one position of the matching parallel op:
    selective_state_update: h = exp(dt A) h + dt x B;  y = <h, C> + D x;  y *= silu(z)   (state (B, D, N))
    ssd_state_update:       same with a scalar A per head                              (state (B, H, P, N))
    conv_step:              y = act(bias + sum_k w[k] window[k]), window = (state, x); state <- window[1:]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2, pdl_launch
from seqlab.ops.triton.jit_math import softplus


@triton.jit
def _selective_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, w_ptr, y_ptr,
                           BATCH, DIM, G, N, R,
                           sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sw_d, sw_r,
                           A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SOFTPLUS: tl.constexpr, DT_PROJ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
                           STATE_POLICY: tl.constexpr):
    """Programs over (ROWS batch rows, BLOCK_D channels): A (and with DT_PROJ the dt weight, from L1) is read
    once for the rows the program steps in turn. PDL: A is formed before waiting for the previous kernel.
    STATE_POLICY: the state's L2 eviction policy ("" or "evict_first": it then leaves prefetched weights be)."""
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d0 = offs_d < DIM
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d0[:, None] & (offs_n < N)[None, :],
                other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)  # A = -exp(A_log), S4D-real parameterisation
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    for i in tl.static_range(ROWS):  # unrolled: the rows' loads are independent and overlap
        b = tl.program_id(0) * ROWS + i
        _selective_step_row(state_ptr, x_ptr, dt_ptr, A, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, w_ptr, y_ptr,
                            b, offs_d, offs_n, mask_d0 & (offs_d * 0 + b < BATCH), DIM, G, N, R,
                            sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sw_d, sw_r,
                            HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, DT_PROJ, BLOCK_R, STATE_POLICY)


@triton.jit
def _selective_step_row(state_ptr, x_ptr, dt_ptr, A, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, w_ptr, y_ptr,
                        b, offs_d, offs_n, mask_d, DIM, G, N, R,
                        sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sw_d, sw_r,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        DT_PROJ: tl.constexpr, BLOCK_R: tl.constexpr, STATE_POLICY: tl.constexpr):
    """One batch row b of the step for the channels offs_d (A (BLOCK_D, BLOCK_N) already formed)."""
    b64 = b.to(tl.int64)
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    bd = b64 * DIM + offs_d  # state and y are contiguous; the inputs may be strided views
    x = tl.load(x_ptr + b64 * sx_b + offs_d * sx_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_PROJ:  # dt = dt_low (R,) @ Wᵀ, W (DIM, R): the dt projection of Mamba, row block by row block
        dt = tl.zeros_like(x)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            low = tl.load(dt_ptr + b64 * sdt_b + offs_r * sdt_d, mask=mask_r, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_d[:, None] * sw_d + offs_r[None, :] * sw_r,
                        mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            dt += tl.sum(w * low[None, :], axis=1)
    else:
        dt = tl.load(dt_ptr + b64 * sdt_b + offs_d * sdt_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    g = offs_d // (DIM // G)
    Bm = tl.load(B_ptr + b64 * sB_b + g[:, None] * sB_g + offs_n[None, :] * sB_n, mask=mask_dn,
                 other=0.0).to(tl.float32)
    Cm = tl.load(C_ptr + b64 * sC_b + g[:, None] * sC_g + offs_n[None, :] * sC_n, mask=mask_dn,
                 other=0.0).to(tl.float32)
    sp = state_ptr + bd[:, None] * N + offs_n[None, :]
    h = tl.load(sp, mask=mask_dn, other=0.0, eviction_policy=STATE_POLICY).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bm
    tl.store(sp, h.to(state_ptr.dtype.element_ty), mask=mask_dn, eviction_policy=STATE_POLICY)
    y = tl.sum(h * Cm, axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b64 * sz_b + offs_d * sz_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + bd, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _strides(t, n):
    """Element strides of ``t`` (n of them), or zeros when ``t`` is None."""
    return tuple(t.stride()) if t is not None else (0,) * n


# dt_rows: 0 = the op (seqlab.ops.selective_state_update) runs Mamba's dt projection as its own GEMM before the step
# kernel; n > 0 = inside the step kernel, each program stepping n batch rows so the projection weight is fetched
# once per n rows (measured slower on an H200: benchmarks/generate-gpu/run3/profile_variants.md).
# step_rows, step_block_d, step_warps: the selective step's tile without the dt projection (batch rows per program,
# channels per program, warps); None: the defaults of _selective_step_tile.
# state_policy: the selective step's L2 eviction policy for the state it streams ("" or "evict_first"), so that
# weights prefetched into L2 (seqlab.mixers.base.DECODE_PREFETCH) outlive it.
TUNING: dict = {"dt_rows": 0, "step_rows": None, "step_block_d": None, "step_warps": None, "state_policy": ""}


def _selective_step_tile(dim: int, block_n: int) -> tuple[int, int, int]:
    """(rows, BLOCK_D, warps) of a selective step program without the dt projection: one row, 32 channels, one
    warp (16 states a thread at N = 16). Swept on an H200 at Mamba 1.4b's step (benchmarks/decode_step_sweep.py,
    benchmarks/generate-gpu/run9): the fastest or within 3% of it at batch 64 and 128, bf16 and float32 states,
    8.6 vs 10.0 us per layer (bf16, batch 64) and 14.8 vs 17.4 (batch 128) against 64 channels on 4 warps."""
    block_d = TUNING.get("step_block_d") or max(1, min(32, 2048 // block_n, next_pow2(dim)))
    warps = TUNING.get("step_warps") or max(1, min(4, block_d * block_n // 512))
    return TUNING.get("step_rows") or 1, block_d, warps


def selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False,
                                  dt_proj_weight=None):
    """state (B, D, N) updated in place; x, dt, z (B, D); A (D, N); B, C (B, G, N); D, dt_bias (D,). Returns y (B, D).

    x, dt, z, B and C may be strided views (e.g. slices of a projection's output): they are read in place.
    ``A_is_log``: ``A`` holds A_log and the kernel uses A = -exp(A_log). ``dt_proj_weight`` (D, R): dt is
    (B, R) and the kernel forms dt @ dt_proj_weightᵀ, each program stepping ``TUNING["dt_rows"]`` (at least 1)
    batch rows so the weight is fetched once per that many rows."""
    batch, dim = x.shape
    G, N = B.shape[1], B.shape[2]
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    if not state.is_contiguous():
        raise ValueError("selective_state_update_triton: state must be contiguous (it is updated in place)")
    y = torch.empty((batch, dim), device=x.device, dtype=x.dtype)
    block_n = next_pow2(N)
    rows, block_d, warps = _selective_step_tile(dim, block_n)
    if dt_proj_weight is not None:
        rows = max(1, TUNING.get("dt_rows") or 1)
    grid = (triton.cdiv(batch, rows), triton.cdiv(dim, block_d))
    rank = dt_proj_weight.shape[1] if dt_proj_weight is not None else 1
    pdl = pdl_launch(x)
    _selective_step_kernel[grid](state, x, dt, A, B, C, D, z, dt_bias, dt_proj_weight, y, batch, dim, G, N, rank,
                                 *x.stride(), *dt.stride(), *_strides(z, 2), *B.stride(), *C.stride(),
                                 *_strides(dt_proj_weight, 2),
                                 A_IS_LOG=bool(A_is_log), HAS_D=D is not None, HAS_Z=z is not None,
                                 HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
                                 DT_PROJ=dt_proj_weight is not None, ROWS=rows, BLOCK_D=block_d, BLOCK_N=block_n,
                                 BLOCK_R=min(64, next_pow2(rank)), PDL=pdl, launch_pdl=pdl,
                                 STATE_POLICY=TUNING.get("state_policy") or "", num_warps=warps)
    return y


@triton.jit
def _ssd_step_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
                     H, P, G, N,
                     sx_b, sx_h, sx_p, sdt_b, sdt_h, sz_b, sz_h, sz_p, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
                     A_IS_LOG: tl.constexpr, HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    h_idx = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    bh = b64 * H + h_idx
    dt = tl.load(dt_ptr + b64 * sdt_b + h_idx * sdt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h_idx).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(dt)
    A = tl.load(A_ptr + h_idx).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    decay = tl.exp(dt * A)
    g = h_idx // (H // G)
    Bv = tl.load(B_ptr + b64 * sB_b + g * sB_g + offs_n * sB_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b64 * sC_b + g * sC_g + offs_n * sC_n, mask=mask_n, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b64 * sx_b + h_idx * sx_h + offs_p * sx_p, mask=mask_p, other=0.0).to(tl.float32)
    xp = bh * P + offs_p  # state and y are contiguous
    sp = state_ptr + xp[:, None] * N + offs_n[None, :]
    s = tl.load(sp, mask=mask_pn, other=0.0).to(tl.float32)
    s = decay * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, s.to(state_ptr.dtype.element_ty), mask=mask_pn)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_P:
            y += tl.load(D_ptr + h_idx * P + offs_p, mask=mask_p, other=0.0).to(tl.float32) * x
        else:
            y += tl.load(D_ptr + h_idx).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + b64 * sz_b + h_idx * sz_h + offs_p * sz_p, mask=mask_p, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + xp, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False):
    """state (B, H, P, N) updated in place; x, z (B, H, P); dt (B, H); A, dt_bias (H,); B, C (B, G, N);
    D (H,) or (H, P). Returns y (B, H, P). x, z, dt, B and C may be strided views; ``A_is_log``: A = -exp(A)."""
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    if not state.is_contiguous():
        raise ValueError("ssd_state_update_triton: state must be contiguous (it is updated in place)")
    y = torch.empty((batch, H, P), device=x.device, dtype=x.dtype)
    block_n = next_pow2(N)
    block_p = max(1, min(next_pow2(P), 4096 // block_n))
    grid = (batch, H, triton.cdiv(P, block_p))
    _ssd_step_kernel[grid](state, x, dt, A, B, C, D, z, dt_bias, y, H, P, G, N,
                           *x.stride(), *dt.stride(), *_strides(z, 3), *B.stride(), *C.stride(),
                           A_IS_LOG=bool(A_is_log), HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
                           HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
                           BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return y


@triton.jit
def _conv_step_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, y_ptr, DIM, sx_b, sx_d,
                      W: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr):
    """PDL: the filter taps are read before waiting for the previous kernel (which writes x)."""
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < DIM
    bd = b.to(tl.int64) * DIM + offs_d  # state and y are contiguous; x may be a strided view
    w = tl.load(w_ptr + offs_d[:, None] * W + offs_w[None, :], mask=(offs_w < W)[None, :] & mask_d[:, None],
                other=0.0).to(tl.float32)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + b.to(tl.int64) * sx_b + offs_d * sx_d, mask=mask_d, other=0.0)
    # window (BD, BLOCK_W): slots 0..W-2 from the state, slot W-1 is x
    in_state = (offs_w < W - 1)[None, :] & mask_d[:, None]
    sp = state_ptr + bd[:, None] * (W - 1) + offs_w[None, :]
    window = tl.load(sp, mask=in_state, other=0.0).to(tl.float32)
    window = tl.where((offs_w == W - 1)[None, :], x.to(tl.float32)[:, None], window)
    y = tl.sum(window * w, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + bd, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    # shift left: new slot j takes window slot j+1 (read from memory again: registers cannot be shifted)
    nxt = offs_w + 1
    old = tl.load(state_ptr + bd[:, None] * (W - 1) + nxt[None, :], mask=(nxt < W - 1)[None, :] & mask_d[:, None],
                  other=0.0)
    new = tl.where((nxt == W - 1)[None, :], x[:, None].to(old.dtype), old)
    tl.debug_barrier()
    tl.store(sp, new, mask=in_state)


def conv_step_triton(conv_state, x, weight, bias, activation):
    """conv_state (B, D, W-1) updated in place (shift left, append x); x (B, D), may be a strided view;
    weight (D, W). Returns y (B, D)."""
    batch, dim = x.shape
    W = weight.shape[1]
    if not conv_state.is_contiguous():
        raise ValueError("conv_step_triton: conv_state must be contiguous (it is updated in place)")
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((batch, dim), device=x.device, dtype=x.dtype)
    block_d = min(256, next_pow2(dim))
    grid = (batch, triton.cdiv(dim, block_d))
    pdl = pdl_launch(x)
    _conv_step_kernel[grid](conv_state, x, weight, bias, y, dim, *x.stride(), W=W, SILU=activation == "silu",
                            HAS_BIAS=bias is not None, BLOCK_D=block_d, BLOCK_W=max(2, next_pow2(W)),
                            PDL=pdl, launch_pdl=pdl, num_warps=4)
    return y
