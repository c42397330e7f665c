"""Chunked SSD (Mamba-2, Dao & Gu 2024, sec. 6), forward and backward, in Triton.

Per head h with scalar A_h, per chunk of T positions (a_t = dt_t A_h, cum_t = sum of a over the chunk up to t):
    1. chunk state   S_c = sum_t exp(cum_{T-1} - cum_t) dt_t x_t B_tᵀ                  (P, N), tl.dot
    2. state passing h_c = exp(cum_{T-1}) h_{c-1} + S_c  (sequential over chunks, P·N-parallel)
    3. output        y_i = sum_{j<=i} (C_i·B_j) exp(cum_i - cum_j) dt_j x_j               (diagonal block, tl.dot)
                         + exp(cum_i) C_i h_{c-1}                                        (carried state, tl.dot)
                         + D x_i,   then y_i *= silu(z_i)
With packed documents, a term that links two positions of different documents is masked out; the initial
state belongs to the row's first document.

The algorithm is exact for any chunk length, so the kernels pick their own tile T = chunk_size clamped to
[16, 64] (tl.dot needs 16; 64 keeps the backward's (T, T) tiles in registers).

Two ways to run steps 1-2 (``TUNING["fused_state"]``):
  fused (default)  one kernel per (b, h, P tile, N tile) walks the chunks in order with the state in registers
                   and writes only the state entering each chunk (steps 1 and 2 together); the backward's reverse
                   pass is the mirror image. Entering states and their gradients are stored in the input dtype
                   (bf16/fp16), which the per-chunk kernels round them to anyway; the final state stays float32.
  unfused          a per-chunk kernel writes every S_c (float32), a second kernel passes states over the chunks
                   in place; the backward likewise (kept for A/B comparison).

C Bᵀ of step 3, a (T, T) tile per chunk, depends on the group only, not the head: one small kernel forms it per
(batch, chunk, group) and the output and backward kernels read it (``TUNING["shared_cb"]``).

Backward: the reverse state pass, then per-chunk kernels for the input gradients that reuse the forward's
entering states and log decays; no (L, L) or per-position state tensor is formed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import doc_ids, next_pow2
from seqlab.ops.triton.jit_math import softplus


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
        dt = softplus(dt)
    return tl.where(mask_t, dt, 0.0)

@triton.jit
def _head_chunk(dt_ptr, bias_ptr, A_ptr, cum_ptr, row, h, bh, c, nchunks, offs_t, mask_t, H,
                T: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Head h in chunk c: dt before softplus (T,), dt (0 on padded positions), A, the in-chunk log decays (T,) and
    the last of them."""
    raw = tl.load(dt_ptr + row * H + h, mask=mask_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask_t, dt, 0.0)
    A = tl.load(A_ptr + h).to(tl.float32)
    cum = tl.load(cum_ptr + (bh * nchunks + c) * T + offs_t)
    cum_last = tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0)
    return raw, dt, A, cum, cum_last


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
def _state_tile(pid, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_P,), (BLOCK_N,) offsets of the (P, N) state tile of program ``pid`` (N blocks vary fastest)."""
    nblk_n = tl.cdiv(N, BLOCK_N)
    offs_p = (pid // nblk_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid % nblk_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_p, offs_n


@triton.jit
def _ssd_fwd_state_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, doc_ptr, init_ptr, states_ptr, final_ptr, cum_ptr,
                          L, H, P, G, N, nchunks,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                          HAS_INIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, T: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Steps 1 and 2 in one pass: one program per (b, h, P block, N block) walks the chunks in order with its
    (BLOCK_P, BLOCK_N) float32 state in registers, h_c = keep_c exp(cum_last_c) h_{c-1} + S_c. Writes the state
    entering each chunk to states (B, nchunks, H, P, N) in that tensor's dtype, the final state (B, H, P, N)
    float32, and (first tile only) the in-chunk log decays cum (B, H, nchunks, T)."""
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    offs_p, offs_n = _state_tile(tl.program_id(1), N, BLOCK_P, BLOCK_N)
    offs_t = tl.arange(0, T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    A = tl.load(A_ptr + h).to(tl.float32)
    if HAS_INIT:
        state = tl.load(init_ptr + bh * P * N + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_DOC:
        prev_doc = tl.load(doc_ptr + b64 * L)  # 0: the initial state's document
    for c in range(nchunks):
        tl.store(states_ptr + ((b64 * nchunks + c) * H + h) * P * N + pn, state.to(states_ptr.dtype.element_ty),
                 mask=mask_pn)
        t = c * T + offs_t
        mask_t = t < L
        dt = _chunk_dt(dt_ptr, bias_ptr, b, h, t, mask_t, L, H, HAS_BIAS, SOFTPLUS)
        cum = tl.cumsum(dt * A, axis=0)  # (T,)
        tl.store(cum_ptr + (bh * nchunks + c) * T + offs_t, cum, mask=offs_t + tl.program_id(1) * T < T)  # first tile
        cum_last = tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0)
        w = tl.exp(cum_last - cum) * dt
        decay = tl.exp(cum_last)
        if HAS_DOC:
            doc = tl.load(doc_ptr + b64 * L + t, mask=mask_t, other=-1)
            doc_end = tl.load(doc_ptr + b64 * L + tl.minimum(c * T + T - 1, L - 1))
            w = tl.where(doc == doc_end, w, 0.0)  # only the last document's positions reach the chunk's end
            decay = tl.where(doc_end == prev_doc, decay, 0.0)  # a document started inside chunk c
            prev_doc = doc_end
        row = b64 * L + t
        x = tl.load(x_ptr + ((row * H + h) * P)[:, None] + offs_p[None, :],
                    mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        Bt = tl.load(B_ptr + ((row * G + h // (H // G)) * N)[:, None] + offs_n[None, :],
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        xw = (x.to(tl.float32) * w[:, None]).to(x.dtype)
        state = decay * state + _mm(tl.trans(xw), Bt.to(x.dtype), IEEE, UPCAST)  # (BP, BN)
    tl.store(final_ptr + bh * P * N + pn, state, mask=mask_pn)


@triton.jit
def _ssd_cb_kernel(B_ptr, C_ptr, cb_ptr, L, G, N, nchunks,
                   IEEE: tl.constexpr, UPCAST: tl.constexpr, T: tl.constexpr, BLOCK_N: tl.constexpr):
    """C Bᵀ of chunk c and group g, which all the group's heads share: cb (B, nchunks, G, T, T) float32 with
    cb[i, j] = C_i·B_j (row i target, column j source; 0 where i or j is beyond L); grid (B * nchunks, G)."""
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    g = tl.program_id(1)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    row = b.to(tl.int64) * L + t
    CB = tl.zeros((T, T), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gn = ((row * G + g) * N)[:, None] + offs_n[None, :]
        mask_tn = mask_t[:, None] & (offs_n < N)[None, :]
        Cs = tl.load(C_ptr + gn, mask=mask_tn, other=0.0)
        Bs = tl.load(B_ptr + gn, mask=mask_tn, other=0.0)
        CB += _mm(Cs, tl.trans(Bs), IEEE, UPCAST)
    cbase = ((b.to(tl.int64) * nchunks + c) * G + g) * T * T
    tl.store(cb_ptr + cbase + offs_t[:, None] * T + offs_t[None, :], CB)


@triton.jit
def _ssd_chunk_out_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, states_ptr, cum_ptr, cb_ptr,
                          y_ptr, L, H, P, G, N, nchunks,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                          HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, IEEE: tl.constexpr,
                          UPCAST: tl.constexpr, SHARED_CB: tl.constexpr, HEADS: tl.constexpr,
                          T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Step 3 for chunk c, HEADS consecutive heads of one group and a block of P; grid (B * nchunks, H // HEADS,
    P blocks). The group's C (and B) are loaded once for its heads; C Bᵀ is read from cb (B, nchunks, G, T, T)
    (SHARED_CB) or formed here."""
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    h0 = tl.program_id(1) * HEADS
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    mask_p = offs_p < P
    mask_n = offs_n < N
    row = b.to(tl.int64) * L + t
    g = h0 // (H // G)
    bc = ((row * G + g) * N)[:, None] + offs_n[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    Ct = tl.load(C_ptr + bc, mask=mask_tn, other=0.0)
    if SHARED_CB:
        CB = tl.load(cb_ptr + ((b.to(tl.int64) * nchunks + c) * G + g) * T * T + offs_t[:, None] * T
                     + offs_t[None, :])
    else:
        Bt = tl.load(B_ptr + bc, mask=mask_tn, other=0.0)
        CB = _mm(Ct, tl.trans(Bt), IEEE, UPCAST)  # (T, T)
    causal = offs_t[:, None] >= offs_t[None, :]
    if HAS_DOC:
        doc = tl.load(doc_ptr + b.to(tl.int64) * L + t, mask=mask_t, other=-1)
        causal = causal & (doc[:, None] == doc[None, :])
        prev_doc = tl.load(doc_ptr + b.to(tl.int64) * L + c * T - 1, mask=c > 0, other=0)
    mask_tp = mask_t[:, None] & mask_p[None, :]
    for j in range(HEADS):
        h = h0 + j
        dt = _chunk_dt(dt_ptr, bias_ptr, b, h, t, mask_t, L, H, HAS_BIAS, SOFTPLUS)
        cum = tl.load(cum_ptr + ((b.to(tl.int64) * H + h) * nchunks + c) * T + offs_t)
        xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
        x = tl.load(x_ptr + xo, mask=mask_tp, other=0.0)
        scale_in = tl.exp(cum)  # decay of the carried state to each position
        if HAS_DOC:
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


# Overrides for benchmarks that sweep; empty = defaults.
#   fused_state    True (default): the fused state passes (module docstring); False: the unfused kernels
#   T, num_warps   tile length; warps of the per-chunk kernels (chunk_out, backward chunk kernel)
#   bwd_warps      warps of the backward chunk kernel (default: num_warps, else 8 for T >= 64)
#   bwd_heads      heads per backward chunk program, sharing C Bᵀ and gathering dB, dC (default 8; rounded down
#                  to a divisor of the heads per group; all of them: no atomics). Fused path only.
#   out_heads      heads per forward output program, sharing C Bᵀ (default 1; rounded down likewise)
#   state_block_p, state_block_n, state_warps, state_stages   tiles, warps and pipeline stages of the fused state
#                  passes (forward and backward)
#   bwd_variant    "split" (default): _ssd_bwd_dx_kernel (dx, dt, dz, dD, dA per (chunk, head), N-sliced) +
#                  _ssd_bwd_dbc_kernel (dB, dC per (chunk, group, N slice), looping over the group's heads);
#                  bwd_heads is then unused. Any other value ("chunk"): the one backward chunk kernel
#   bwd_dx_block_n, bwd_dx_warps    N slice (default min(32, N)) and warps of _ssd_bwd_dx_kernel
#   bwd_dx_maxnreg registers per thread the compiler may give _ssd_bwd_dx_kernel (default 128; None: no cap). At the
#                  Mamba-2-2.7B layer (bf16, T = 64, 8 warps) it takes 255 uncapped, with spills, so one CTA fits
#                  per SM; capped at 128 two do, with more spilled: fwd+bwd 4.46 vs 4.72 ms at 8 x 2048 on an H200
#                  (benchmarks/kernels-gpu/run9). Splitting it in two kernels by tile kind (y/dx/dz/dD, then ddt/dA)
#                  fitted two CTAs without spills but re-read x, dy and z and lost (5.4 ms).
#   bwd_dbc_block_n, bwd_dbc_warps  N tile (default min(64, N)) and warps of _ssd_bwd_dbc_kernel
#   bwd_dbc_splits programs per group of _ssd_bwd_dbc_kernel, each over its share of the heads (default 1: no
#                  atomics; rounded down to a divisor of the heads per group)
#   state_dtype    "input" (default) or "fp32": dtype of the stored entering states and their gradients (fused)
#   shared_cb      True (default for tiles T <= 64, see _shared_cb): _ssd_cb_kernel writes C Bᵀ once per (batch,
#                  chunk, group), (B, nchunks, G, T, T)
#                  float32, and the chunk_out, dx and backward chunk kernels read it; False: each of those forms it
#                  from C and B itself, once per program (per head: H // G times over for chunk_out and dx)
TUNING: dict = {}
_PROGRAMS_IN_FLIGHT = 512  # fused state passes: split (P, N) until this many programs run the sequential loop


def _tile(chunk_size: int, training: bool) -> int:
    # forward only: up to 128 (fewer, larger chunk states: 2.2 -> 1.8 ms at 8 x 2048 on an H200); training: 64,
    # which keeps the backward's tiles in registers
    return TUNING.get("T") or min(64 if training else 128, max(16, next_pow2(chunk_size)))


def _state_blocks(batch: int, H: int, P: int, N: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N) state tile of the fused state passes. Each program walks all chunks in sequence, so
    with few (b, h) pairs (long single sequences) the state is split into smaller tiles for parallelism."""
    bp = TUNING.get("state_block_p") or max(16, min(64, next_pow2(P)))
    bn = TUNING.get("state_block_n") or max(16, min(128, next_pow2(N)))
    programs = lambda: batch * H * triton.cdiv(P, bp) * triton.cdiv(N, bn)
    while "state_block_n" not in TUNING and programs() < _PROGRAMS_IN_FLIGHT and bn > 32:
        bn //= 2
    while "state_block_p" not in TUNING and programs() < _PROGRAMS_IN_FLIGHT and bp > 32:
        bp //= 2
    return bp, bn


def _group_heads(H: int, G: int, key: str, default: int) -> int:
    """Heads per program of a per-chunk kernel: the largest divisor of H // G up to TUNING[key] (or default)."""
    per_group = H // G
    want = TUNING.get(key) or default
    return max(d for d in range(1, min(want, per_group) + 1) if per_group % d == 0)


def _shared_cb(T: int) -> bool:
    """Whether C Bᵀ is formed once by _ssd_cb_kernel (default for tiles up to 64, the training tile) or inside each
    consumer. On an H200 at the Mamba-2-2.7B layer, 8 x 2048 (kernels-gpu/run7): with T = 128 (the forward without
    autograd) loading the (128, 128) float32 tile took longer than forming it, 1.22 vs 1.03 ms; with T = 64 the
    shared tile made forward+backward 4.71 vs 4.80 ms."""
    return TUNING.get("shared_cb", T <= 64)


def _state_dtype(x: torch.Tensor, fused: bool) -> torch.dtype:
    low = x.dtype in (torch.bfloat16, torch.float16)
    return x.dtype if fused and low and TUNING.get("state_dtype", "input") == "input" else torch.float32


def _chunk_cb(B, C, T, nchunks, ieee, interpreting):
    """C Bᵀ per (batch, chunk, group): (B, nchunks, G, T, T) float32, [i, j] = C_i·B_j, 0 beyond L."""
    batch, L, G, N = B.shape
    cb = torch.empty(batch, nchunks, G, T, T, device=B.device, dtype=torch.float32)
    # N slices of 64 (32 at T = 128) keep ptxas (sm_90a, bf16, 4 warps) free of spills
    _ssd_cb_kernel[(batch * nchunks, G)](B, C, cb, L, G, N, nchunks, IEEE=ieee, UPCAST=interpreting, T=T,
                                         BLOCK_N=min(64 if T <= 64 else 32, max(16, next_pow2(N))), num_warps=4)
    return cb


def _fused_state_pass(x, dt, A, B, dt_bias, dt_softplus, doc, init, states, final, cum, T, ieee, interpreting):
    """Steps 1-2 fused: fills states (B, nchunks, H, P, N), final (B, H, P, N) and cum (B, H, nchunks, T)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    bp, bn = _state_blocks(batch, H, P, N)
    grid = (batch * H, triton.cdiv(P, bp) * triton.cdiv(N, bn))
    _ssd_fwd_state_kernel[grid](x, dt, A, B, dt_bias, doc, init, states, final, cum, L, H, P, G, N, states.shape[1],
                                HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None,
                                HAS_INIT=init is not None, IEEE=ieee, UPCAST=interpreting, T=T, BLOCK_P=bp,
                                BLOCK_N=bn, num_warps=TUNING.get("state_warps") or 4,
                                num_stages=TUNING.get("state_stages") or 2)


def _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx, training=False):
    """The forward (no autograd). Returns y (B, L, H, P), final_state (B, H, P, N) float32, and for the backward
    the states entering each chunk (B, nchunks, H, P, N) (float32, or the input dtype on the fused path), the
    in-chunk log decays (B, H, nchunks, T), the document ids, the tile T and whether the fused path ran."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, A, B, C = x.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(), C.contiguous()
    z = z.contiguous() if z is not None else None
    D = D.contiguous() if D is not None else None
    doc = doc_ids(seq_idx)
    T = _tile(chunk_size, training)
    nchunks = triton.cdiv(L, T)
    fused = bool(TUNING.get("fused_state", True))
    block_n = max(16, next_pow2(N))
    block_p = max(16, min(64, next_pow2(P)))
    ieee = x.dtype == torch.float32 or x.dtype == torch.float64
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    f32 = dict(device=x.device, dtype=torch.float32)
    states = torch.empty(batch, nchunks, H, P, N, device=x.device, dtype=_state_dtype(x, fused))
    cum = torch.empty(batch, H, nchunks, T, **f32)
    final = torch.empty(batch, H, P, N, **f32)
    init = initial_state.contiguous() if initial_state is not None else None
    warps = TUNING.get("num_warps") or 4  # 4 beat 8 for T = 64 and 128 on an H200 (benchmarks/kernels.py sweep)
    grid = (batch * nchunks, H, triton.cdiv(P, block_p))
    out_heads = _group_heads(H, G, "out_heads", 1)
    if fused:
        _fused_state_pass(x, dt, A, B, dt_bias, dt_softplus, doc, init, states, final, cum, T, ieee, interpreting)
    else:
        _ssd_chunk_state_kernel[grid](x, dt, A, B, dt_bias, doc, states, cum, L, H, P, G, N, nchunks,
                                      HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
                                      HAS_DOC=doc is not None, IEEE=ieee, UPCAST=interpreting, T=T,
                                      BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
        block = 256  # the chunk loop is latency-bound: many small programs in flight
        _ssd_state_pass_kernel[(batch, H, triton.cdiv(P * N, block))](
            states, cum, init, doc, final, L, H, P * N, nchunks,
            HAS_INIT=init is not None, HAS_DOC=doc is not None, T=T, BLOCK=block, num_warps=4)
    cb = _chunk_cb(B, C, T, nchunks, ieee, interpreting) if _shared_cb(T) else None
    y = torch.empty_like(x)
    _ssd_chunk_out_kernel[(batch * nchunks, H // out_heads, triton.cdiv(P, block_p))](
        x, dt, B, C, D, z, dt_bias, doc, states, cum, cb, y, L, H, P, G, N, nchunks,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None, HAS_D=D is not None,
        D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None, IEEE=ieee, UPCAST=interpreting,
        SHARED_CB=cb is not None, HEADS=out_heads, T=T, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    return y, final, states, cum, doc, T, fused


# ------------------------------------------------------------------------------------------------- backward
#
# With dy' = dy * silu(z) and E_c = dLoss/d(state entering chunk c):
#   E_c = sum_i exp(cum_i) dy'_i C_iᵀ + keep_c exp(cum_last_c) E_{c+1},   E_nchunks = d final_state   (reverse pass)
# and inside chunk c (M_ij = C_i·B_j exp(cum_i - cum_j) dt_j, w_t = exp(cum_last - cum_t) dt_t, dS = E_{c+1}):
#   dx = Mᵀ dy' + w (B dSᵀ) + D dy'          dM = dy' xᵀ,  dCB = dM ∘ exp(seg) dt_j
#   dC = dCB B + exp(cum) dy' h_in           dB = dCBᵀ C + w (x dS)
#   dcum from M (row sums - column sums of dM ∘ M), the carried state, the chunk state and the passing decay;
#   d(dt A)_s = rev_s = sum_{t >= s} dcum_t within the chunk.
# rev is summed part by part in a form with no cancellation. Taken literally (dcum_t, then total minus prefix),
# it subtracts sums that agree to all but their last digits: the diagonal of G = dM ∘ M enters dcum_t twice with
# opposite signs, and where exp(cum) underflows the true rev is orders of magnitude below those sums, so float32
# returned noise of the wrong sign for dA under extreme dt. Per part, directly:
#   M:             sum_{t >= s} (sum_j G_tj - sum_i G_it) = sum_{i >= s, j < s} G_ij, the entries crossing s
#                  (G is lower triangular): a reverse cumulative sum over targets, then a masked sum over sources
#   carried state: u_t = exp(cum_t) dy'_t·(C_t h_in) at t, a reverse cumulative sum
#   chunk state:   q_t = dLoss/d(w_t dt_t) w_t dt_t, -q_t at t and +sum q at the last position: sum_{t < s} q_t
#   passing decay: dlast at the last position: dlast for every s


@triton.jit
def _rev_dcum_rest(u, q, dlast, offs_t):
    """(T,) rev_s of the carried-state (u), chunk-state (q) and passing-decay (dlast) parts, see above."""
    exclusive = tl.sum(tl.where(offs_t[:, None] < offs_t[None, :], q[:, None], 0.0), axis=0)  # sum_{t < s} q_t
    return tl.cumsum(u, axis=0, reverse=True) + exclusive + dlast


@triton.jit
def _ssd_bwd_dstate_kernel(dy_ptr, z_ptr, C_ptr, doc_ptr, cum_ptr, dstates_ptr,
                           L, H, P, G, N, nchunks,
                           HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                           T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per chunk: the gradient reaching the chunk's entering state from this chunk's outputs, (P, N)."""
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
    row = b.to(tl.int64) * L + t
    xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
    mask_tp = mask_t[:, None] & mask_p[None, :]
    dy = tl.load(dy_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
        dy = dy * zv * tl.sigmoid(zv)
    cum = tl.load(cum_ptr + ((b.to(tl.int64) * H + h) * nchunks + c) * T + offs_t)
    scale_in = tl.exp(cum)
    if HAS_DOC:
        doc = tl.load(doc_ptr + row, mask=mask_t, other=-1)
        prev_doc = tl.load(doc_ptr + b.to(tl.int64) * L + c * T - 1, mask=c > 0, other=0)
        scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
    Ct = tl.load(C_ptr + ((row * G + h // (H // G)) * N)[:, None] + offs_n[None, :],
                 mask=mask_t[:, None] & (offs_n < N)[None, :], other=0.0)
    ds = _mm(tl.trans((dy * scale_in[:, None]).to(Ct.dtype)), Ct, IEEE, UPCAST)  # (BP, BN)
    sbase = ((b.to(tl.int64) * nchunks + c) * H + h) * P * N
    tl.store(dstates_ptr + sbase + offs_p[:, None] * N + offs_n[None, :], ds,
             mask=mask_p[:, None] & (offs_n < N)[None, :])


@triton.jit
def _ssd_bwd_state_pass_kernel(dstates_ptr, states_ptr, cum_ptr, doc_ptr, dfinal_ptr, dinit_ptr, dlast_ptr,
                               L, H, PN, nchunks,
                               HAS_DFINAL: tl.constexpr, HAS_DOC: tl.constexpr, T: tl.constexpr,
                               BLOCK: tl.constexpr):
    """Reverse state passing: turns per-chunk local gradients into dS_c = E_{c+1}, in place; writes d initial
    state and, per chunk, the gradient of its total log-decay cum_last (accumulated over blocks)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    bh = b.to(tl.int64) * H + h
    if HAS_DFINAL:
        E = tl.load(dfinal_ptr + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        E = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        base = ((b.to(tl.int64) * nchunks + c) * H + h) * PN + offs
        local = tl.load(dstates_ptr + base, mask=mask, other=0.0)
        tl.store(dstates_ptr + base, E, mask=mask)
        hin = tl.load(states_ptr + base, mask=mask, other=0.0)
        decay = tl.exp(tl.load(cum_ptr + (bh * nchunks + c) * T + T - 1))
        if HAS_DOC:
            doc_end = tl.load(doc_ptr + b.to(tl.int64) * L + tl.minimum(c * T + T - 1, L - 1))
            prev_end = tl.load(doc_ptr + b.to(tl.int64) * L + c * T - 1, mask=c > 0, other=0)
            decay = tl.where(doc_end == prev_end, decay, 0.0)
        tl.atomic_add(dlast_ptr + bh * nchunks + c, tl.sum(E * hin, axis=0) * decay)
        E = local + decay * E
    tl.store(dinit_ptr + bh * PN + offs, E, mask=mask)


@triton.jit
def _ssd_bwd_state_kernel(dy_ptr, z_ptr, C_ptr, doc_ptr, cum_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                          L, H, P, G, N, nchunks,
                          HAS_Z: tl.constexpr, HAS_DOC: tl.constexpr, HAS_DFINAL: tl.constexpr, IEEE: tl.constexpr,
                          UPCAST: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The reverse pass in one sweep: one program per (b, h, P block, N block) walks the chunks backwards with
    E (BLOCK_P, BLOCK_N) float32 in registers, E_c = (scale_in dy'_c)ᵀ C_c + keep_c exp(cum_last_c) E_{c+1}.
    Writes dS_c = E_{c+1} (B, nchunks, H, P, N) in dstates' dtype and d initial_state = E_0 (B, H, P, N)."""
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    offs_p, offs_n = _state_tile(tl.program_id(1), N, BLOCK_P, BLOCK_N)
    offs_t = tl.arange(0, T)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    b64 = b.to(tl.int64)
    bh = b64 * H + h
    if HAS_DFINAL:
        E = tl.load(dfinal_ptr + bh * P * N + pn, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        E = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(dstates_ptr + ((b64 * nchunks + c) * H + h) * P * N + pn, E.to(dstates_ptr.dtype.element_ty),
                 mask=mask_pn)
        t = c * T + offs_t
        mask_t = t < L
        row = b64 * L + t
        cum = tl.load(cum_ptr + (bh * nchunks + c) * T + offs_t)
        scale_in = tl.exp(cum)
        decay = tl.exp(tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0))
        if HAS_DOC:
            doc = tl.load(doc_ptr + row, mask=mask_t, other=-1)
            prev_doc = tl.load(doc_ptr + b64 * L + c * T - 1, mask=c > 0, other=0)
            doc_end = tl.load(doc_ptr + b64 * L + tl.minimum(c * T + T - 1, L - 1))
            scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
            decay = tl.where(doc_end == prev_doc, decay, 0.0)
        xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
        mask_tp = mask_t[:, None] & mask_p[None, :]
        dy = tl.load(dy_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        Ct = tl.load(C_ptr + ((row * G + h // (H // G)) * N)[:, None] + offs_n[None, :],
                     mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        E = decay * E + _mm(tl.trans((dy * scale_in[:, None]).to(Ct.dtype)), Ct, IEEE, UPCAST)
    tl.store(dinit_ptr + bh * P * N + pn, E, mask=mask_pn)


@triton.jit
def _ssd_bwd_chunk_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, states_ptr,
                          dstates_ptr, cum_ptr, cb_ptr, dlast_ptr, dy_ptr,
                          dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dz_ptr, dA_ptr, dD_ptr,
                          L, H, P, G, N, nchunks,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                          HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, IEEE: tl.constexpr,
                          UPCAST: tl.constexpr, SHARED_CB: tl.constexpr, DLAST_INLINE: tl.constexpr,
                          HEADS: tl.constexpr, ATOMIC: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """Input gradients of chunk c for HEADS consecutive heads of one group; grid (B * nchunks, H // HEADS).
    The group's C and B are loaded once, C Bᵀ read from cb (SHARED_CB) or formed once; dB, dC (B, L, G, N)
    gather over the heads in registers (the C Bᵀ part through the heads' summed d(C Bᵀ)) and are written once
    (added atomically when other programs share the group). DLAST_INLINE: the gradient of the passing decay,
    keep_c exp(cum_last_c) <dS_c, h_in_c>, is formed here from the loaded states; else it is read from dlast
    (B, H, nchunks)."""
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    h0 = tl.program_id(1) * HEADS
    g = h0 // (H // G)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    mask_p = offs_p < P
    mask_n = offs_n < N
    b64 = b.to(tl.int64)
    row = b64 * L + t
    gn = ((row * G + g) * N)[:, None] + offs_n[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    Ct = tl.load(C_ptr + gn, mask=mask_tn, other=0.0)
    Bt = tl.load(B_ptr + gn, mask=mask_tn, other=0.0)
    if SHARED_CB:
        CB = tl.load(cb_ptr + ((b64 * nchunks + c) * G + g) * T * T + offs_t[:, None] * T + offs_t[None, :])
    else:
        CB = _mm(Ct, tl.trans(Bt), IEEE, UPCAST)  # (T, T), shared by the group's heads
    causal = offs_t[:, None] >= offs_t[None, :]
    if HAS_DOC:
        doc = tl.load(doc_ptr + row, mask=mask_t, other=-1)
        causal = causal & (doc[:, None] == doc[None, :])
        prev_doc = tl.load(doc_ptr + b64 * L + c * T - 1, mask=c > 0, other=0)
        doc_end = tl.load(doc_ptr + b64 * L + tl.minimum(c * T + T - 1, L - 1))
    pn = offs_p[:, None] * N + offs_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    mask_tp = mask_t[:, None] & mask_p[None, :]
    dB_sum = tl.zeros((T, BLOCK_N), dtype=tl.float32)
    dC_sum = tl.zeros((T, BLOCK_N), dtype=tl.float32)
    dCB_sum = tl.zeros((T, T), dtype=tl.float32)
    for j in range(HEADS):
        h = h0 + j
        bh = b64 * H + h
        raw, dt, A, cum, cum_last = _head_chunk(dt_ptr, bias_ptr, A_ptr, cum_ptr, row, h, bh, c, nchunks, offs_t,
                                                mask_t, H, T, HAS_BIAS, SOFTPLUS)
        xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
        x = tl.load(x_ptr + xo, mask=mask_tp, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
        sbase = ((b64 * nchunks + c) * H + h) * P * N
        hin_raw = tl.load(states_ptr + sbase + pn, mask=mask_pn, other=0.0)  # (P, N)
        dS_raw = tl.load(dstates_ptr + sbase + pn, mask=mask_pn, other=0.0)
        hin = hin_raw.to(x.dtype)
        dS = dS_raw.to(x.dtype)
        scale_in = tl.exp(cum)
        w = tl.exp(cum_last - cum)
        keep = tl.exp(cum_last)
        if HAS_DOC:
            scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
            w = tl.where(doc == doc_end, w, 0.0)
            keep = tl.where(doc_end == prev_doc, keep, 0.0)
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))  # (T, T)
        M = CB * decay * dt[None, :]
        y_in = _mm(Ct, tl.trans(hin), IEEE, UPCAST)  # (T, P) carried-state term before its decay
        if HAS_D:
            if D_PER_P:
                Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
            else:
                Dv = tl.load(D_ptr + h).to(tl.float32)
        if HAS_Z:
            y = _mm(M.to(x.dtype), x, IEEE, UPCAST) + scale_in[:, None] * y_in
            if HAS_D:
                y += Dv * xf
            zv = tl.load(z_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
            sz = tl.sigmoid(zv)
            tl.store(dz_ptr + xo, (dy * y * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty),
                     mask=mask_tp)
            dy = dy * zv * sz
        dyc = dy.to(x.dtype)
        BdS = _mm(Bt, tl.trans(dS), IEEE, UPCAST)  # (T, P)
        wdt = w * dt
        dx = _mm(tl.trans(M.to(x.dtype)), dyc, IEEE, UPCAST) + wdt[:, None] * BdS
        if HAS_D:
            dx += Dv * dy
            if D_PER_P:
                tl.store(dD_ptr + (bh * nchunks + c) * P + offs_p, tl.sum(dy * xf, axis=0), mask=mask_p)
            else:
                tl.store(dD_ptr + bh * nchunks + c, tl.sum(tl.sum(dy * xf, axis=1), axis=0))
        tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
        dM = _mm(dyc, tl.trans(x), IEEE, UPCAST)  # (T, T)
        # B, C are the group's: sum_h dCB_h B = (sum_h dCB_h) B, formed once after the loop
        dCB_sum += dM * decay * dt[None, :]
        dC_sum += _mm((scale_in[:, None] * dy).to(x.dtype), hin, IEEE, UPCAST)
        dB_sum += _mm((wdt[:, None] * xf).to(x.dtype), dS, IEEE, UPCAST)
        # step sizes: direct factor dt_j in M and in the chunk state, then through cum
        dw = tl.sum(xf * BdS, axis=1)  # (T,) dLoss/d(w_t dt_t)
        ddt = tl.sum(dM * CB * decay, axis=0) + dw * w
        if DLAST_INLINE:
            dlast = keep * tl.sum(tl.sum(hin_raw.to(tl.float32) * dS_raw.to(tl.float32), axis=1), axis=0)
        else:
            dlast = tl.load(dlast_ptr + bh * nchunks + c)
        cross = tl.cumsum(dM * M, axis=0, reverse=True)  # [s, j] = sum_{i >= s} G_ij
        rev = tl.sum(tl.where(offs_t[None, :] < offs_t[:, None], cross, 0.0), axis=1)  # sum_{i >= s, j < s} G_ij
        rev += _rev_dcum_rest(scale_in * tl.sum(dy * y_in, axis=1), dw * wdt, dlast, offs_t)
        ddt += A * rev
        tl.store(dA_ptr + bh * nchunks + c, tl.sum(dt * rev, axis=0))
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        tl.store(ddt_ptr + row * H + h, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_t)
    dCB_sum = dCB_sum.to(Ct.dtype)
    dC_sum += _mm(dCB_sum, Bt, IEEE, UPCAST)
    dB_sum += _mm(tl.trans(dCB_sum), Ct, IEEE, UPCAST)
    if ATOMIC:
        tl.atomic_add(dC_ptr + gn, dC_sum, mask=mask_tn)
        tl.atomic_add(dB_ptr + gn, dB_sum, mask=mask_tn)
    else:
        tl.store(dC_ptr + gn, dC_sum, mask=mask_tn)
        tl.store(dB_ptr + gn, dB_sum, mask=mask_tn)


# Split backward (TUNING["bwd_variant"] = "split"): the chunk kernel above keeps C, B, C Bᵀ, the (T, N) dB and dC
# accumulators and every per-head (T, T), (T, P) and (P, N) tile alive at once. The split variant runs two
# kernels that each hold a fraction of that:
#   _ssd_bwd_dx_kernel   one (chunk, head) per program: dx, dt, dz, dD, dA. C Bᵀ, C h_inᵀ and B dSᵀ are formed in
#                        a loop over N slices, so only (T, T) and (T, P) accumulators stay live; no atomics.
#   _ssd_bwd_dbc_kernel  one (chunk, group, N slice) per program, looping over the group's heads: dB, dC. The
#                        per-head d(C Bᵀ) is recomputed from dy' xᵀ (one T x P x T dot) and summed over the heads,
#                        then multiplied by B and C once; written without atomics unless the heads are split.
#                        It accumulates dCᵀ, dBᵀ and d(C Bᵀ)ᵀ so that every dot takes both operands from shared
#                        memory (x, dy' are right operands): the elementwise math on x, dy', z stays in a blocked
#                        layout instead of the wgmma left-operand register layout, which 8 warps duplicate.
# ptxas (sm_90a, bf16, T = 64, P = 64, N = 128, 8 warps) reports 255 registers for all three, with per-thread
# spill stacks of 2080 B (chunk kernel, 1 head; 5336 B at 8 heads) vs 64 B (dx, N slice 32; 240 B at 64) and
# 488 B (dbc, N tile 64; 192 B at 32).


@triton.jit
def _ssd_bwd_dx_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, states_ptr,
                       dstates_ptr, cum_ptr, cb_ptr, dlast_ptr, dy_ptr,
                       dx_ptr, ddt_ptr, dz_ptr, dA_ptr, dD_ptr,
                       L, H, P, G, N, nchunks,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                       HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, SHARED_CB: tl.constexpr, DLAST_INLINE: tl.constexpr,
                       T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of x, dt, z, D and A for chunk c of head h; grid (B * nchunks, H). BLOCK_N: the N slice of the
    loop forming C h_inᵀ and B dSᵀ (T, P), and (C Bᵀ)ᵀ (T, T) unless SHARED_CB reads it from cb."""
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    h = tl.program_id(1)
    g = h // (H // G)
    offs_p = tl.arange(0, BLOCK_P)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    mask_p = offs_p < P
    b64 = b.to(tl.int64)
    row = b64 * L + t
    bh = b64 * H + h
    mask_tp = mask_t[:, None] & mask_p[None, :]
    xo = ((row * H + h) * P)[:, None] + offs_p[None, :]
    x = tl.load(x_ptr + xo, mask=mask_tp, other=0.0)
    sbase = ((b64 * nchunks + c) * H + h) * P * N
    if not SHARED_CB:
        CB_t = tl.zeros((T, T), dtype=tl.float32)  # (C Bᵀ)ᵀ: the (T, T) tiles are kept transposed (see below)
    y_in = tl.zeros((T, BLOCK_P), dtype=tl.float32)  # C h_inᵀ, the carried-state term before its decay
    BdS = tl.zeros((T, BLOCK_P), dtype=tl.float32)
    hd = tl.zeros((BLOCK_P,), dtype=tl.float32)  # row sums of h_in ∘ dS
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        gn = ((row * G + g) * N)[:, None] + offs_n[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        Cs = tl.load(C_ptr + gn, mask=mask_tn, other=0.0)
        Bs = tl.load(B_ptr + gn, mask=mask_tn, other=0.0)
        pn = offs_p[:, None] * N + offs_n[None, :]
        mask_pn = mask_p[:, None] & mask_n[None, :]
        hin_raw = tl.load(states_ptr + sbase + pn, mask=mask_pn, other=0.0)
        dS_raw = tl.load(dstates_ptr + sbase + pn, mask=mask_pn, other=0.0)
        if not SHARED_CB:
            CB_t += _mm(Bs, tl.trans(Cs), IEEE, UPCAST)
        y_in += _mm(Cs, tl.trans(hin_raw.to(x.dtype)), IEEE, UPCAST)
        BdS += _mm(Bs, tl.trans(dS_raw.to(x.dtype)), IEEE, UPCAST)
        if DLAST_INLINE:
            hd += tl.sum(hin_raw.to(tl.float32) * dS_raw.to(tl.float32), axis=1)
    if SHARED_CB:  # read transposed: [j, i] = C_i·B_j
        CB_t = tl.load(cb_ptr + ((b64 * nchunks + c) * G + g) * T * T + offs_t[None, :] * T + offs_t[:, None])
    causal_t = offs_t[:, None] <= offs_t[None, :]  # row j (source), column i (target)
    if HAS_DOC:
        doc = tl.load(doc_ptr + row, mask=mask_t, other=-1)
        causal_t = causal_t & (doc[:, None] == doc[None, :])
        prev_doc = tl.load(doc_ptr + b64 * L + c * T - 1, mask=c > 0, other=0)
        doc_end = tl.load(doc_ptr + b64 * L + tl.minimum(c * T + T - 1, L - 1))
    raw, dt, A, cum, cum_last = _head_chunk(dt_ptr, bias_ptr, A_ptr, cum_ptr, row, h, bh, c, nchunks, offs_t, mask_t,
                                            H, T, HAS_BIAS, SOFTPLUS)
    xf = x.to(tl.float32)
    dy = tl.load(dy_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
    scale_in = tl.exp(cum)
    w = tl.exp(cum_last - cum)
    keep = tl.exp(cum_last)
    if HAS_DOC:
        scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
        w = tl.where(doc == doc_end, w, 0.0)
        keep = tl.where(doc_end == prev_doc, keep, 0.0)
    # transposed (T, T) tiles: dMᵀ = x dy'ᵀ takes dy' as a right operand (shared memory), so dy', z and their
    # elementwise math stay out of the wgmma left-operand register layout
    CBd_t = CB_t * tl.exp(tl.where(causal_t, cum[None, :] - cum[:, None], float("-inf")))
    M_t = CBd_t * dt[:, None]
    if HAS_D:
        if D_PER_P:
            Dv = tl.load(D_ptr + h * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        y = _mm(tl.trans(M_t.to(x.dtype)), x, IEEE, UPCAST) + scale_in[:, None] * y_in
        if HAS_D:
            y += Dv * xf
        zv = tl.load(z_ptr + xo, mask=mask_tp, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zv)
        tl.store(dz_ptr + xo, (dy * y * sz * (1.0 + zv * (1.0 - sz))).to(dz_ptr.dtype.element_ty), mask=mask_tp)
        dy = dy * zv * sz
    dyc = dy.to(x.dtype)
    wdt = w * dt
    dx = _mm(M_t.to(x.dtype), dyc, IEEE, UPCAST) + wdt[:, None] * BdS
    if HAS_D:
        dx += Dv * dy
        if D_PER_P:
            tl.store(dD_ptr + (bh * nchunks + c) * P + offs_p, tl.sum(dy * xf, axis=0), mask=mask_p)
        else:
            tl.store(dD_ptr + bh * nchunks + c, tl.sum(tl.sum(dy * xf, axis=1), axis=0))
    tl.store(dx_ptr + xo, dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
    dM_t = _mm(x, tl.trans(dyc), IEEE, UPCAST)  # (T, T) dMᵀ
    dw = tl.sum(xf * BdS, axis=1)  # (T,) dLoss/d(w_t dt_t)
    ddt = tl.sum(dM_t * CBd_t, axis=1) + dw * w
    if DLAST_INLINE:
        dlast = keep * tl.sum(hd, axis=0)
    else:
        dlast = tl.load(dlast_ptr + bh * nchunks + c)
    # rev_s = sum_{t >= s} dcum_t, part by part (see the backward's comment block); transposed tiles: [j, s]
    cross = tl.cumsum(dM_t * M_t, axis=1, reverse=True)  # [j, s] = sum_{i >= s} G_ij
    rev = tl.sum(tl.where(offs_t[:, None] < offs_t[None, :], cross, 0.0), axis=0)  # sum_{i >= s, j < s} G_ij
    rev += _rev_dcum_rest(scale_in * tl.sum(dy * y_in, axis=1), dw * wdt, dlast, offs_t)
    ddt += A * rev
    tl.store(dA_ptr + bh * nchunks + c, tl.sum(dt * rev, axis=0))
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(raw)
    tl.store(ddt_ptr + row * H + h, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def _ssd_bwd_dbc_kernel(x_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, bias_ptr, doc_ptr, states_ptr, dstates_ptr, cum_ptr,
                        dy_ptr, dB_ptr, dC_ptr,
                        L, H, P, G, N, nchunks, heads,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                        HAS_Z: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLITS: tl.constexpr,
                        T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dB, dC of chunk c, group g, N slice n over `heads` consecutive heads of the group; grid
    (B * nchunks, G * SPLITS, cdiv(N, BLOCK_N)). SPLITS > 1: the group's heads are split over SPLITS programs
    that add their sums atomically (dB, dC zeroed)."""
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid % nchunks
    g = tl.program_id(1) // SPLITS
    h0 = g * (H // G) + (tl.program_id(1) % SPLITS) * heads
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_t = tl.arange(0, T)
    t = c * T + offs_t
    mask_t = t < L
    mask_p = offs_p < P
    mask_n = offs_n < N
    b64 = b.to(tl.int64)
    row = b64 * L + t
    gn = ((row * G + g) * N)[:, None] + offs_n[None, :]
    mask_tn = mask_t[:, None] & mask_n[None, :]
    pn = offs_p[:, None] * N + offs_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    mask_tp = mask_t[:, None] & mask_p[None, :]
    tp = (offs_t * (H * P))[:, None] + offs_p[None, :]  # int32 tile offsets from the chunk's first row
    causal_t = offs_t[:, None] <= offs_t[None, :]  # transposed: row j (source), column i (target)
    if HAS_DOC:
        doc = tl.load(doc_ptr + row, mask=mask_t, other=-1)
        causal_t = causal_t & (doc[:, None] == doc[None, :])
        prev_doc = tl.load(doc_ptr + b64 * L + c * T - 1, mask=c > 0, other=0)
        doc_end = tl.load(doc_ptr + b64 * L + tl.minimum(c * T + T - 1, L - 1))
    # transposed accumulators, so that x and dy' enter the dots only as right operands (through shared memory)
    # and their elementwise math stays in a plain blocked layout
    dC_acc = tl.zeros((BLOCK_N, T), dtype=tl.float32)  # dCᵀ
    dB_acc = tl.zeros((BLOCK_N, T), dtype=tl.float32)  # dBᵀ
    dCB = tl.zeros((T, T), dtype=tl.float32)  # sum over the heads of d(C Bᵀ)ᵀ
    for j in range(heads):
        h = h0 + j
        bh = b64 * H + h
        dt = tl.load(dt_ptr + row * H + h, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += tl.load(bias_ptr + h).to(tl.float32)
        if SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(mask_t, dt, 0.0)
        cum = tl.load(cum_ptr + (bh * nchunks + c) * T + offs_t)
        cum_last = tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0)
        xb = ((b64 * L + c * T) * H + h) * P
        x = tl.load(x_ptr + xb + tp, mask=mask_tp, other=0.0)
        dy = tl.load(dy_ptr + xb + tp, mask=mask_tp, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + xb + tp, mask=mask_tp, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        sbase = ((b64 * nchunks + c) * H + h) * P * N
        hin = tl.load(states_ptr + sbase + pn, mask=mask_pn, other=0.0).to(x.dtype)  # (P, BN)
        dS = tl.load(dstates_ptr + sbase + pn, mask=mask_pn, other=0.0).to(x.dtype)
        scale_in = tl.exp(cum)
        w = tl.exp(cum_last - cum)
        if HAS_DOC:
            scale_in = tl.where(doc == prev_doc, scale_in, 0.0)
            w = tl.where(doc == doc_end, w, 0.0)
        decay_t = tl.exp(tl.where(causal_t, cum[None, :] - cum[:, None], float("-inf")))
        dM_t = _mm(x, tl.trans(dy.to(x.dtype)), IEEE, UPCAST)  # (T, T) dMᵀ
        dCB += dM_t * decay_t * dt[:, None]
        dC_acc += _mm(tl.trans(hin), tl.trans((scale_in[:, None] * dy).to(x.dtype)), IEEE, UPCAST)
        dB_acc += _mm(tl.trans(dS), tl.trans(((w * dt)[:, None] * x.to(tl.float32)).to(x.dtype)), IEEE, UPCAST)
    Ct = tl.load(C_ptr + gn, mask=mask_tn, other=0.0)
    Bt = tl.load(B_ptr + gn, mask=mask_tn, other=0.0)
    dCB = dCB.to(Ct.dtype)
    dC_acc += _mm(tl.trans(Bt), dCB, IEEE, UPCAST)
    dB_acc += _mm(tl.trans(Ct), tl.trans(dCB), IEEE, UPCAST)
    gn_t = tl.trans(gn)
    mask_nt = tl.trans(mask_tn)
    if SPLITS > 1:
        tl.atomic_add(dC_ptr + gn_t, dC_acc, mask=mask_nt)
        tl.atomic_add(dB_ptr + gn_t, dB_acc, mask=mask_nt)
    else:
        tl.store(dC_ptr + gn_t, dC_acc, mask=mask_nt)
        tl.store(dB_ptr + gn_t, dB_acc, mask=mask_nt)


def _state_grads(saved, dy, dfinal, T, fused, ieee, interpreting):
    """Reverse state pass. Returns dstates (dS_c = dLoss/d state leaving chunk c, shaped and typed like the
    states), d initial_state (B, H, P, N) float32 and, unfused only, the passing decays' gradients
    (B, H, nchunks), else None (the chunk kernel forms them)."""
    x, dt, A, B, C, D, z, dt_bias, doc, states, cum, init_given = saved
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nchunks = cum.shape[2]
    dstates = torch.empty_like(states)
    dinit = torch.empty(batch, H, P, N, device=x.device, dtype=torch.float32)
    dfinal = dfinal.contiguous() if dfinal is not None else None
    if fused:
        bp, bn = _state_blocks(batch, H, P, N)
        _ssd_bwd_state_kernel[(batch * H, triton.cdiv(P, bp) * triton.cdiv(N, bn))](
            dy, z, C, doc, cum, dfinal, dstates, dinit, L, H, P, G, N, nchunks,
            HAS_Z=z is not None, HAS_DOC=doc is not None, HAS_DFINAL=dfinal is not None, IEEE=ieee,
            UPCAST=interpreting, T=T, BLOCK_P=bp, BLOCK_N=bn, num_warps=TUNING.get("state_warps") or 4,
            num_stages=TUNING.get("state_stages") or 2)
        return dstates, dinit, None
    block_p = min(max(16, next_pow2(P)), 64)
    _ssd_bwd_dstate_kernel[(batch * nchunks, H, triton.cdiv(P, block_p))](
        dy, z, C, doc, cum, dstates, L, H, P, G, N, nchunks,
        HAS_Z=z is not None, HAS_DOC=doc is not None, IEEE=ieee, UPCAST=interpreting,
        T=T, BLOCK_P=block_p, BLOCK_N=max(16, next_pow2(N)), num_warps=8 if T >= 64 else 4)
    dlast = torch.zeros(batch, H, nchunks, device=x.device, dtype=torch.float32)
    block = 1024  # each program adds its share of d cum_last atomically: fewer programs, less contention
    _ssd_bwd_state_pass_kernel[(batch, H, triton.cdiv(P * N, block))](
        dstates, states, cum, doc, dfinal, dinit, dlast,
        L, H, P * N, nchunks, HAS_DFINAL=dfinal is not None, HAS_DOC=doc is not None, T=T, BLOCK=block,
        num_warps=4)
    return dstates, dinit, dlast


# (dtype, T, P, N, warps) -> heads per backward program that compiled within shared memory (float32 tiles take
# twice the bytes of bf16 ones)
_BWD_HEADS_FIT: dict = {}


def _split_backward(x, dt, A, B, C, D, z, dt_bias, doc, states, dstates, cum, cb, dlast, dy, dx, ddt, dz, dA, dD,
                    T, dt_softplus, d_per_p, ieee, interpreting, warps):
    """The split backward (TUNING["bwd_variant"] = "split"): fills dx, ddt, dz, dA, dD; returns dB, dC float32."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nchunks = cum.shape[2]
    bp = max(16, next_pow2(P))
    common = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None,
                  HAS_Z=z is not None, IEEE=ieee, UPCAST=interpreting, T=T, BLOCK_P=bp)
    _ssd_bwd_dx_kernel[(batch * nchunks, H)](
        x, dt, A, B, C, D, z, dt_bias, doc, states, dstates, cum, cb, dlast, dy, dx, ddt, dz, dA, dD,
        L, H, P, G, N, nchunks, HAS_D=D is not None, D_PER_P=d_per_p, SHARED_CB=cb is not None,
        DLAST_INLINE=dlast is None,
        BLOCK_N=TUNING.get("bwd_dx_block_n") or min(32, max(16, next_pow2(N))),
        num_warps=TUNING.get("bwd_dx_warps") or warps, maxnreg=TUNING.get("bwd_dx_maxnreg", 128), **common)
    per_group = H // G
    splits = _group_heads(per_group, 1, "bwd_dbc_splits", 1)
    bn = TUNING.get("bwd_dbc_block_n") or min(64, max(16, next_pow2(N)))
    f32 = dict(device=x.device, dtype=torch.float32)
    dB = torch.zeros(B.shape, **f32) if splits > 1 else torch.empty(B.shape, **f32)
    dC = torch.zeros(C.shape, **f32) if splits > 1 else torch.empty(C.shape, **f32)
    _ssd_bwd_dbc_kernel[(batch * nchunks, G * splits, triton.cdiv(N, bn))](
        x, dt, B, C, z, dt_bias, doc, states, dstates, cum, dy, dB, dC, L, H, P, G, N, nchunks, per_group // splits,
        SPLITS=splits, BLOCK_N=bn, num_warps=TUNING.get("bwd_dbc_warps") or warps, **common)
    return dB, dC


def ssd_backward_triton(saved, dy, dfinal, T, dt_softplus, fused=True):
    """Gradients of every input, as a dict; ``saved`` as _SSDFn saves it, ``fused`` as the forward ran."""
    x, dt, A, B, C, D, z, dt_bias, doc, states, cum, init_given = saved
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nchunks = cum.shape[2]
    ieee = x.dtype == torch.float32 or x.dtype == torch.float64
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    f32 = dict(device=x.device, dtype=torch.float32)
    dy = dy.contiguous()
    dstates, dinit, dlast = _state_grads(saved, dy, dfinal, T, fused, ieee, interpreting)
    dx = torch.empty_like(x)
    ddt = torch.empty(dt.shape, **f32)
    dz = torch.empty_like(z) if z is not None else None
    dA = torch.empty(batch, H, nchunks, **f32)
    d_per_p = D is not None and D.dim() == 2
    dD = torch.empty(batch, H, nchunks, P, **f32) if d_per_p else torch.empty(batch, H, nchunks, **f32)
    warps = TUNING.get("bwd_warps") or TUNING.get("num_warps") or (8 if T >= 64 else 4)
    # C Bᵀ is recomputed here rather than saved by the forward: one small kernel (a T x N x T dot per batch, chunk
    # and group) keeps the saved tensors and the backward's inputs as they were
    cb = _chunk_cb(B, C, T, nchunks, ieee, interpreting) if _shared_cb(T) else None
    # split: fwd+bwd 4.5 vs 10.3 ms at 8 x 2048 (bf16) on an H200 (measured before C Bᵀ was shared)
    if TUNING.get("bwd_variant", "split") == "split":
        dB, dC = _split_backward(x, dt, A, B, C, D, z, dt_bias, doc, states, dstates, cum, cb, dlast, dy,
                                 dx, ddt, dz, dA, dD, T, dt_softplus, d_per_p, ieee, interpreting, warps)
        return _grads(dx, ddt, dA, dB, dC, dz, dinit, dD, dt, A, B, C, D, dt_bias, init_given)
    key = (x.dtype, T, P, N, warps)
    heads = _group_heads(H, G, "bwd_heads", _BWD_HEADS_FIT.get(key, 8)) if fused else 1
    while True:  # fewer heads per program when the tiles of this many heads do not fit in shared memory
        atomic = heads < H // G
        dB = torch.zeros(B.shape, **f32) if atomic else torch.empty(B.shape, **f32)
        dC = torch.zeros(C.shape, **f32) if atomic else torch.empty(C.shape, **f32)
        try:
            _ssd_bwd_chunk_kernel[(batch * nchunks, H // heads)](
                x, dt, A, B, C, D, z, dt_bias, doc, states, dstates, cum, cb, dlast, dy,
                dx, ddt, dB, dC, dz, dA, dD, L, H, P, G, N, nchunks,
                HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_DOC=doc is not None,
                HAS_D=D is not None, D_PER_P=d_per_p, HAS_Z=z is not None, IEEE=ieee, UPCAST=interpreting,
                SHARED_CB=cb is not None, DLAST_INLINE=dlast is None, HEADS=heads, ATOMIC=atomic, T=T,
                BLOCK_P=max(16, next_pow2(P)), BLOCK_N=max(16, next_pow2(N)), num_warps=warps)
            break
        except triton.runtime.errors.OutOfResources:
            if heads == 1:
                raise
            heads = _group_heads(H, G, "bwd_heads_fallback", heads // 2)
            _BWD_HEADS_FIT[key] = heads
    return _grads(dx, ddt, dA, dB, dC, dz, dinit, dD, dt, A, B, C, D, dt_bias, init_given)


def _grads(dx, ddt, dA, dB, dC, dz, dinit, dD, dt, A, B, C, D, dt_bias, init_given):
    """The backward kernels' outputs as the gradient dict (per-chunk partial sums reduced, input dtypes)."""
    grads = dict(x=dx, dt=ddt.to(dt.dtype), A=dA.sum((0, 2)).to(A.dtype), B=dB.to(B.dtype), C=dC.to(C.dtype),
                 z=dz, initial_state=dinit if init_given else None)
    grads["dt_bias"] = ddt.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    grads["D"] = None if D is None else dD.sum((0, 2)).to(D.dtype)  # (H,) or (H, P)
    return grads


class _SSDFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
        y, final, states, cum, doc, T, fused = _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus,
                                                        initial_state, seq_idx, training=any(ctx.needs_input_grad))
        contig = lambda t: t.contiguous() if t is not None else None
        ctx.save_for_backward(*(contig(t) for t in (x, dt, A, B, C, D, z)), dt_bias, doc, states, cum)
        ctx.T, ctx.dt_softplus, ctx.init_given, ctx.fused = T, dt_softplus, initial_state is not None, fused
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        saved = (*ctx.saved_tensors, ctx.init_given)
        if dy is None:
            dy = torch.zeros_like(saved[0])
        g = ssd_backward_triton(saved, dy, dfinal, ctx.T, ctx.dt_softplus, ctx.fused)
        return (g["x"], g["dt"], g["A"], g["B"], g["C"], None, g["D"], g["z"], g["dt_bias"], None,
                g["initial_state"], None)


def ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    """x (B, L, H, P); dt (B, L, H); A (H,); B, C (B, L, G, N); D (H,) or (H, P); z like x; dt_bias (H,);
    initial_state (B, H, P, N) or None; seq_idx (B, L) or None. Returns (y, final_state float32).

    Without autograd (no_grad / inference_mode) only the forward runs: no tensors are kept for a backward and the
    forward takes its inference tile."""
    if not torch.is_grad_enabled():
        y, final = _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)[:2]
        return y, final
    return _SSDFn.apply(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
