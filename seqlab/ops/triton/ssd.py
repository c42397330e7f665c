"""Chunked SSD (Mamba-2, Dao & Gu 2024, sec. 6) forward in Triton; backward through the torch chunked path.

Per head h with scalar A_h, per chunk of T positions (a_t = dt_t A_h, cum_t = sum of a over the chunk up to t):
    1. chunk state   S_c = sum_t exp(cum_{T-1} - cum_t) dt_t x_t B_tᵀ                  (P, N), tl.dot
    2. state passing h_c = exp(cum_{T-1}) h_{c-1} + S_c  (sequential over chunks, P·N-parallel)
    3. output        y_i = sum_{j<=i} (C_i·B_j) exp(cum_i - cum_j) dt_j x_j               (diagonal block, tl.dot)
                         + exp(cum_i) C_i h_{c-1}                                        (carried state, tl.dot)
                         + D x_i,   then y_i *= silu(z_i)
With packed documents, a term that links two positions of different documents is masked out; the initial
state belongs to the row's first document.

The algorithm is exact for any chunk length, so the kernels pick their own tile T = chunk_size clamped to
[16, 128] (tl.dot needs 16; 128 keeps the (T, T) score tile in registers).

Backward (interim): the forward's outputs are recomputed by ``seqlab.ops.ssd(..., backend="torch")`` under
autograd and differentiated there; it is correct but costs the torch path's time and memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import doc_ids, next_pow2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. IEEE: exact float32 products (no tf32). UPCAST: float32 operands
    (the CPU interpreter computes bf16 dots wrongly)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE or UPCAST:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _chunk_dt(dt_ptr, bias_ptr, b, h, t, mask_t, L, H, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(T,) step sizes of head h at positions t (0 on padded positions)."""
    dt = tl.load(dt_ptr + (b.to(tl.int64) * L + t) * H + h, mask=mask_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask_t, dt, 0.0)


@triton.jit
def _ssd_chunk_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, doc_ptr, states_ptr, cum_ptr,
                            L, H, P, G, N, nchunks,
                            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    h = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    dt = _chunk_dt(dt_ptr, bias_ptr, b, h, t, mask_t, L, H, HAS_BIAS, SOFTPLUS)
    cum = tl.cumsum(dt * tl.load(A_ptr + h).to(tl.float32), axis=0)  # (T,)
    cum_last = tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0)
    w = tl.exp(cum_last - cum) * dt
    if HAS_DOC:
        doc = tl.load(doc_ptr + b.to(tl.int64) * L + t, mask=mask_t, other=-1)
        doc_end = tl.load(doc_ptr + b.to(tl.int64) * L + tl.minimum(c * T + T - 1, L - 1))
        w = tl.where(doc == doc_end, w, 0.0)  # only the last document's positions reach the chunk's end state
    row = b.to(tl.int64) * L + t
    x = tl.load(x_ptr + ((row * H + h) * P)[:, None] + offs_p[None, :],
                mask=mask_t[:, None] & (offs_p < P)[None, :], other=0.0)
    Bt = tl.load(B_ptr + ((row * G + h // (H // G)) * N)[:, None] + offs_n[None, :],
                 mask=mask_t[:, None] & (offs_n < N)[None, :], other=0.0)
    xw = (x.to(tl.float32) * w[:, None]).to(x.dtype)
    S = _mm(tl.trans(xw), Bt.to(x.dtype), IEEE, UPCAST)  # (BP, BN)
    sbase = ((b.to(tl.int64) * nchunks + c) * H + h) * P * N
    tl.store(states_ptr + sbase + offs_p[:, None] * N + offs_n[None, :], S,
             mask=(offs_p < P)[:, None] & (offs_n < N)[None, :])
    tl.store(cum_ptr + ((b.to(tl.int64) * H + h) * nchunks + c) * T + offs_t, cum)


@triton.jit
def _ssd_state_pass_kernel(states_ptr, cum_ptr, init_ptr, doc_ptr, final_ptr,
                           L, H, PN, nchunks,
                           HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr, T: tl.constexpr, BLOCK: tl.constexpr):
    """Turns chunk states S_c into the states entering each chunk, in place; writes the final state."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    bh = b.to(tl.int64) * H + h
    if HAS_INIT:
        state = tl.load(init_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DOC:
        prev_doc = tl.load(doc_ptr + b.to(tl.int64) * L)  # 0: the initial state's document
    for c in range(nchunks):
        sp = states_ptr + ((b.to(tl.int64) * nchunks + c) * H + h) * PN + offs
        S = tl.load(sp, mask=mask, other=0.0)
        tl.store(sp, state, mask=mask)
        decay = tl.exp(tl.load(cum_ptr + (bh * nchunks + c) * T + T - 1))
        if HAS_DOC:
            doc_end = tl.load(doc_ptr + b.to(tl.int64) * L + tl.minimum(c * T + T - 1, L - 1))
            decay = tl.where(doc_end == prev_doc, decay, 0.0)  # a document started inside chunk c
            prev_doc = doc_end
        state = decay * state + S
    tl.store(final_ptr + bh * PN + offs, state, mask=mask)


@triton.jit
def _ssd_chunk_out_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, states_ptr, cum_ptr, y_ptr,
                          L, H, P, G, N, nchunks,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                          HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, IEEE: tl.constexpr,
                          UPCAST: tl.constexpr,
                          T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    h = tl.program_id(1)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    mask_p = offs_p < P
    mask_n = offs_n < N
    dt = _chunk_dt(dt_ptr, bias_ptr, b, h, t, mask_t, L, H, HAS_BIAS, SOFTPLUS)
    cum = tl.load(cum_ptr + ((b.to(tl.int64) * H + h) * nchunks + c) * T + offs_t)
    row = b.to(tl.int64) * L + t
    bc = ((row * G + h // (H // G)) * N)[:, None] + offs_n[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    Ct = tl.load(C_ptr + bc, mask=mask_tn, other=0.0)
    Bt = tl.load(B_ptr + bc, mask=mask_tn, other=0.0)
    xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
    mask_tp = mask_t[:, None] & mask_p[None, :]
    x = tl.load(x_ptr + xo, mask=mask_tp, other=0.0)
    CB = _mm(Ct, tl.trans(Bt), IEEE, UPCAST)  # (T, T)
    causal = offs_t[:, None] >= offs_t[None, :]
    scale_in = tl.exp(cum)  # decay of the carried state to each position
    if HAS_DOC:
        doc = tl.load(doc_ptr + b.to(tl.int64) * L + t, mask=mask_t, other=-1)
        causal = causal & (doc[:, None] == doc[None, :])
        prev_doc = tl.load(doc_ptr + b.to(tl.int64) * L + c * T - 1, mask=c > 0, other=0)
        scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
    seg = tl.where(causal, cum[:, None] - cum[None, :], float("-inf"))
    M = CB * tl.exp(seg) * dt[None, :]
    hin = tl.load(states_ptr + ((b.to(tl.int64) * nchunks + c) * H + h) * P * N + offs_p[:, None] * N
                  + offs_n[None, :], mask=mask_p[:, None] & mask_n[None, :], other=0.0)
    y = _mm(M.to(x.dtype), x, IEEE, UPCAST)  # (T, BP)
    y_in = _mm(Ct, tl.trans(hin.to(x.dtype)), IEEE, UPCAST)  # (T, BP)
    y += scale_in[:, None] * y_in
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
        y += Dv * x.to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + xo, y.to(y_ptr.dtype.element_ty), mask=mask_tp)


def _tile(chunk_size: int) -> int:
    return min(128, max(16, next_pow2(chunk_size)))


def ssd_forward_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    """The three-kernel forward (no autograd). Returns (y (B, L, H, P), final_state (B, H, P, N) float32)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, A, B, C = x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    D = D.contiguous() if D is not None else None
    doc = doc_ids(seq_idx)
    T = _tile(chunk_size)
    nchunks = triton.cdiv(L, T)
    block_n = max(16, next_pow2(N))
    block_p = max(16, min(64, next_pow2(P)))
    ieee = x.dtype == torch.float32 or x.dtype == torch.float64
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    f32 = dict(device=x.device, dtype=torch.float32)
    states = torch.empty(batch, nchunks, H, P, N, **f32)
    cum = torch.empty(batch, H, nchunks, T, **f32)
    warps = 8 if T >= 128 else 4
    grid = (batch * nchunks, H, triton.cdiv(P, block_p))
    _ssd_chunk_state_kernel[grid](x, dt, A, B, dt_bias, doc, states, cum, L, H, P, G, N, nchunks,
                                  HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None,
                                  IEEE=ieee, UPCAST=interpreting, T=T, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    final = torch.empty(batch, H, P, N, **f32)
    init = initial_state.contiguous() if initial_state is not None else None
    block = 1024
    _ssd_state_pass_kernel[(batch, H, triton.cdiv(P * N, block))](
        states, cum, init, doc, final, L, H, P * N, nchunks,
        HAS_INIT=init is not None, HAS_DOC=doc is not None, T=T, BLOCK=block, num_warps=4)
    y = torch.empty_like(x)
    _ssd_chunk_out_kernel[grid](x, dt, B, C, D, z, dt_bias, doc, states, cum, y, L, H, P, G, N, nchunks,
                                HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None,
                                HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
                                IEEE=ieee, UPCAST=interpreting, T=T, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    return y, final


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
        y, final = ssd_forward_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
        ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        from seqlab.ops.ssd import ssd

        x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, dt, A, B, C, D, z, dt_bias, initial_state),
                                     (ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 4, 6, 7, 8, 10)))]
        xr, dtr, Ar, Br, Cr, Dr, zr, biasr, initr = inputs
        with torch.enable_grad():
            y, final = ssd(xr, dtr, Ar, Br, Cr, chunk_size=ctx.chunk_size, D=Dr, z=zr, dt_bias=biasr,
                           dt_softplus=ctx.dt_softplus, initial_state=initr, return_final_state=True,
                           seq_idx=seq_idx, backend="torch")
        outs, grads = [y], [dy if dy is not None else torch.zeros_like(y)]
        if dfinal is not None:
            outs.append(final)
            grads.append(dfinal)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True)) if wanted else iter(())
        g = [next(got) if (t is not None and t.requires_grad) else None for t in inputs]
        return g[0], g[1], g[2], g[3], g[4], None, g[5], g[6], g[7], None, g[8], None


def ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    """x (B, L, H, P); dt (B, L, H); A (H,); B, C (B, L, G, N); D (H,) or (H, P); z like x; dt_bias (H,);
    initial_state (B, H, P, N) or None; seq_idx (B, L) or None. Returns (y, final_state float32)."""
    return _SSDFn.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
