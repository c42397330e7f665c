"""The (gated) delta rule in Triton: a chunked (tl.dot) or recurrent forward and a checkpointed reverse-recurrence
backward.

Same recurrence and orientation as ``seqlab.ops.delta_rule`` (S is (K, V), q already scaled):
    S_a = α_t S_{t-1}                  α_t = exp(g_t), 0 where a document starts (seq_idx)
    w_t = S_aᵀ k_t                     what the state currently returns for k_t        (V,)
    u_t = β_t (v_t - w_t)              pseudo-value                                    (V,)
    S_t = S_a + k_t u_tᵀ               o_t = S_tᵀ q_t
The columns of S never mix (every update acts on rows through k), so a program owns one (batch, head, V-tile) and
keeps its (K, BV) slice of S in float32 registers while it walks the sequence.

Backward (reverse-mode through the same steps, dS = ∂loss/∂S_t, walking t = L-1 .. 0):
    dS += q_t do_tᵀ;   dq_t = S_t do_t
    du = dSᵀ k_t;      dk_t = dS u_t;   dv_t = β_t du;   dβ_t = du · (v_t - w_t);   dw = -β_t du
    dS_a = dS + k_t dwᵀ;   dk_t += S_a dw;   dg_t = <dS_a, S_a>;   dS_{t-1} = α_t dS_a
The forward stores the state entering every chunk of ``chunk`` steps (O(L/chunk) states, never the (L, K, V)
sequence); the backward reloads it, replays the chunk forward into a per-program scratch of ``chunk`` states
(O(chunk·K·BV) per program, reused chunk after chunk) and then walks the chunk in reverse. dq, dk, dβ and dg sum
over V, so each V-tile writes a partial that the wrapper adds up.

Chunked forward (the default, ``CHUNKED_FORWARD``; chunks of T = 16..64 positions, the WY/UT form of
``seqlab.ops.delta_rule``): a first kernel, parallel over (batch, head, chunk), solves the chunk's unit lower-triangular
system by forward substitution for W_v = A⁻¹ diag(β) V and W_k = A⁻¹ diag(β γ) K (independent of the state); a
second, per (batch, head, V-tile), walks the chunks with tl.dot: U = W_v - W_k S, o = diag(γ) Q S + (Γ ∘ Q Kᵀ) U,
S <- γ_T S + (Γ[T, :] ∘ K)ᵀ U, storing the state entering each chunk for the backward as the recurrent forward does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops._common import reset_mask, triton_interpreting
from seqlab.ops.triton import next_pow2

# (V-tile width, warps) of the recurrent forward and of the backward: a (K, BV) state tile per program; narrower tiles give
# more programs (B·H·V/BV) for the latency-bound time loop. The backward holds three (K, BV) tiles (state, its
# gradient, the prefetched replayed state); at K = 64 these fit sm_90 registers without spills.
FWD_CONFIG = (16, 2)
BWD_CONFIG = (16, 2)
# the chunked (tl.dot) forward instead of the recurrent one; (V-tile, warps) of its walk over the chunks; the
# precision of its float32 tl.dot ("tf32x3": three TF32 products, about float32 accuracy on tensor cores)
CHUNKED_FORWARD = False  # H200, B=4 L=4096 H=16 K=V=64: recurrent 3.1 ms vs chunked 7.6 ms (families-gpu sweep)
CHUNK_FWD_CONFIG = (32, 4)
CHUNK_DOT_PRECISION = "tf32x3"


@triton.jit
def _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h, t, offs_k, mask_k, offs_v, mask_v, L, H, K, V,
                 HAS_G: tl.constexpr, HAS_RESET: tl.constexpr):
    """Inputs of position t (0 <= t < L) and its state decay α_t (a float32 scalar tensor)."""
    row = (b.to(tl.int64) * L + t) * H + h
    q = tl.load(q_ptr + row * K + offs_k, mask=mask_k, other=0.0)
    k = tl.load(k_ptr + row * K + offs_k, mask=mask_k, other=0.0)
    v = tl.load(v_ptr + row * V + offs_v, mask=mask_v, other=0.0)
    beta = tl.load(beta_ptr + row)
    if HAS_G:
        alpha = tl.exp(tl.load(g_ptr + row))
    else:
        alpha = beta * 0.0 + 1.0
    if HAS_RESET:
        alpha = tl.where(tl.load(reset_ptr + b.to(tl.int64) * L + t) != 0, 0.0, alpha)
    return q, k, v, beta, alpha


@triton.jit
def _delta_fwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, init_ptr, o_ptr, states_ptr, final_ptr,
                      L, H, K, V, nchunks, chunk,
                      HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_INIT: tl.constexpr, STORE_STATES: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    bh = b.to(tl.int64) * H + h
    tile = offs_k[:, None] * V + offs_v[None, :]  # (BK, BV)
    if HAS_INIT:
        S = tl.load(init_ptr + bh * K * V + tile, mask=mask_kv, other=0.0)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    # the inputs of step t + 1 are loaded during step t (their latency hides behind the state update)
    q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h, 0, offs_k,
                                                  mask_k, offs_v, mask_v, L, H, K, V, HAS_G, HAS_RESET)
    for t in range(L):
        if STORE_STATES:
            if t % chunk == 0:
                tl.store(states_ptr + (bh * nchunks + t // chunk) * K * V + tile, S, mask=mask_kv)
        q, k, v, beta, alpha = q_n, k_n, v_n, beta_n, alpha_n
        q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h,
                                                      (t + 1) % L, offs_k, mask_k, offs_v, mask_v, L, H, K, V,
                                                      HAS_G, HAS_RESET)
        S = S * alpha
        w = tl.sum(S * k[:, None], axis=0)  # (BV,)
        S += k[:, None] * (beta * (v - w))[None, :]
        o = tl.sum(S * q[:, None], axis=0)
        tl.store(o_ptr + ((b.to(tl.int64) * L + t) * H + h) * V + offs_v, o, mask=mask_v)
    tl.store(final_ptr + bh * K * V + tile, S, mask=mask_kv)


@triton.jit
def _delta_bwd_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, states_ptr, scratch_ptr, do_ptr, dfinal_ptr,
                      dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, dinit_ptr,
                      B, L, H, K, V, nchunks, chunk,
                      HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DFINAL: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    vb = tl.program_id(1)
    b = pid // H
    h = pid % H
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    bh = b.to(tl.int64) * H + h
    tile = offs_k[:, None] * V + offs_v[None, :]
    # this program's scratch of `chunk` (BK, BV) states, and its V-tile's slice of the partial sums
    scratch = scratch_ptr + (bh * tl.num_programs(1) + vb) * chunk * BK * BV + offs_k[:, None] * BV + \
        tl.arange(0, BV)[None, :]
    part = vb.to(tl.int64) * B * L * H  # offset of this V-tile's partials, in positions
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + bh * K * V + tile, mask=mask_kv, other=0.0)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    for cc in range(nchunks):
        c = nchunks - 1 - cc
        t0 = c * chunk
        n = tl.minimum(chunk, L - t0)  # steps in this chunk
        # replay the chunk from its stored entering state: scratch[i] = S_{t-1} for t = t0 + i
        S = tl.load(states_ptr + (bh * nchunks + c) * K * V + tile, mask=mask_kv, other=0.0)
        tl.debug_barrier()  # the previous chunk's reverse walk has read the scratch we now overwrite
        q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h, t0,
                                                      offs_k, mask_k, offs_v, mask_v, L, H, K, V, HAS_G, HAS_RESET)
        for i in range(n):
            k, v, beta, alpha = k_n, v_n, beta_n, alpha_n
            q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h,
                                                          (t0 + i + 1) % L, offs_k, mask_k, offs_v, mask_v,
                                                          L, H, K, V, HAS_G, HAS_RESET)
            tl.store(scratch + i * BK * BV, S)
            S = S * alpha
            S += k[:, None] * (beta * (v - tl.sum(S * k[:, None], axis=0)))[None, :]
        tl.debug_barrier()
        # walk the chunk backwards (inputs of step t - 1 prefetched during step t)
        t = t0 + n - 1
        q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h, t,
                                                      offs_k, mask_k, offs_v, mask_v, L, H, K, V, HAS_G, HAS_RESET)
        row = (b.to(tl.int64) * L + t) * H + h
        do_n = tl.load(do_ptr + row * V + offs_v, mask=mask_v, other=0.0)
        S_n = tl.load(scratch + (n - 1) * BK * BV)
        for j in range(n):
            t = t0 + n - 1 - j
            row = (b.to(tl.int64) * L + t) * H + h
            q, k, v, beta, alpha, do, S_prev = q_n, k_n, v_n, beta_n, alpha_n, do_n, S_n
            prev = (t + L - 1) % L
            q_n, k_n, v_n, beta_n, alpha_n = _step_inputs(q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, b, h,
                                                          prev, offs_k, mask_k, offs_v, mask_v, L, H, K, V,
                                                          HAS_G, HAS_RESET)
            do_n = tl.load(do_ptr + ((b.to(tl.int64) * L + prev) * H + h) * V + offs_v, mask=mask_v, other=0.0)
            S_n = tl.load(scratch + ((t - t0 + n - 1) % n) * BK * BV)
            S_a = alpha * S_prev
            r = v - tl.sum(S_a * k[:, None], axis=0)  # v_t - w_t  (BV,)
            u = beta * r
            dS += q[:, None] * do[None, :]
            dq = tl.sum(S_a * do[None, :], axis=1) + k * tl.sum(u * do, axis=0)  # S_t do_t, S_t = S_a + k uᵀ
            du = tl.sum(dS * k[:, None], axis=0)  # (BV,)
            dw = -beta * du
            dk = tl.sum(dS * u[None, :] + S_a * dw[None, :], axis=1)  # (BK,)
            dS += k[:, None] * dw[None, :]  # now ∂loss/∂S_a
            prow = part + row
            tl.store(dq_ptr + prow * K + offs_k, dq, mask=mask_k)
            tl.store(dk_ptr + prow * K + offs_k, dk, mask=mask_k)
            tl.store(dv_ptr + row * V + offs_v, beta * du, mask=mask_v)
            tl.store(dbeta_ptr + prow, tl.sum(du * r, axis=0))
            if HAS_G:
                tl.store(dg_ptr + prow, tl.sum(tl.sum(dS * S_a, axis=1), axis=0))
            dS = alpha * dS
    tl.store(dinit_ptr + bh * K * V + tile, dS, mask=mask_kv)


@triton.jit
def _chunk_terms(g_ptr, reset_ptr, b, h, c, offs_t, mask_t, L, H,
                 HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, T: tl.constexpr):
    """Decay factors of chunk c: cum (T,) log-decay from the chunk start through t; doc (T,) number of document
    starts in the chunk up to t (0: the entering state still reaches t); Γ[t, s] = exp(cum_t - cum_s) is used only
    for s <= t in the same document, so every exponent taken is <= 0."""
    t = c * T + offs_t
    row = (b.to(tl.int64) * L + t) * H + h
    if HAS_G:
        cum = tl.cumsum(tl.load(g_ptr + row, mask=mask_t, other=0.0), axis=0)
    else:
        cum = tl.zeros((T,), dtype=tl.float32)
    if HAS_RESET:
        doc = tl.cumsum(tl.load(reset_ptr + b.to(tl.int64) * L + t, mask=mask_t, other=0), axis=0)
    else:
        doc = tl.zeros((T,), dtype=tl.int32)
    return cum, doc, row


@triton.jit
def _delta_wy_kernel(k_ptr, v_ptr, beta_ptr, g_ptr, reset_ptr, wk_ptr, wv_ptr, L, H, K, V,
                     HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, T: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr):
    """W_v = A⁻¹ diag(β) V and W_k = A⁻¹ diag(β γ) K for one chunk, A = I + diag(β) (Γ ∘ K Kᵀ)_strict, by forward
    substitution over the T rows (the chunked form in ``seqlab.ops.delta_rule``); independent of the state, so
    every chunk runs in parallel. The columns of W_v are independent: program (.., .., j) solves V-tile j, and the
    first V-tile also writes W_k."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    c = tl.program_id(1)
    vb = tl.program_id(2)
    offs_t = tl.arange(0, T)
    offs_k = tl.arange(0, BK)
    offs_v = vb * BV + tl.arange(0, BV)
    mask_t = c * T + offs_t < L
    mask_tk = mask_t[:, None] & (offs_k < K)[None, :]
    mask_tv = mask_t[:, None] & (offs_v < V)[None, :]
    cum, doc, row = _chunk_terms(g_ptr, reset_ptr, b, h, c, offs_t, mask_t, L, H, HAS_G, HAS_RESET, T)
    k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0)  # (T, BK)
    v = tl.load(v_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0)  # (T, BV)
    beta = tl.load(beta_ptr + row, mask=mask_t, other=0.0)  # (T,); 0 on padded rows: they stay 0
    gamma = tl.where(doc == 0, tl.exp(cum), 0.0)
    Xk = (beta * gamma)[:, None] * k
    Xv = beta[:, None] * v
    for i in range(T):
        sel = offs_t == i
        k_i = tl.sum(tl.where(sel[:, None], k, 0.0), axis=0)  # (BK,)
        cum_i = tl.sum(tl.where(sel, cum, 0.0), axis=0)
        doc_i = tl.sum(tl.where(sel, doc, 0), axis=0)
        beta_i = tl.sum(tl.where(sel, beta, 0.0), axis=0)
        earlier = (offs_t < i) & (doc == doc_i)
        m = tl.where(earlier, tl.sum(k * k_i[None, :], axis=1) * tl.exp(tl.where(earlier, cum_i - cum, 0.0)), 0.0)
        # rows < i are final and rows >= i still hold the right-hand side: x_i = rhs_i - β_i Σ_{s<i} m_s x_s
        xk = tl.sum(tl.where(sel[:, None], Xk, 0.0), axis=0) - beta_i * tl.sum(m[:, None] * Xk, axis=0)
        xv = tl.sum(tl.where(sel[:, None], Xv, 0.0), axis=0) - beta_i * tl.sum(m[:, None] * Xv, axis=0)
        Xk = tl.where(sel[:, None], xk[None, :], Xk)
        Xv = tl.where(sel[:, None], xv[None, :], Xv)
    if vb == 0:
        tl.store(wk_ptr + row[:, None] * K + offs_k[None, :], Xk, mask=mask_tk)
    tl.store(wv_ptr + row[:, None] * V + offs_v[None, :], Xv, mask=mask_tv)


@triton.jit
def _delta_chunk_fwd_kernel(q_ptr, k_ptr, g_ptr, reset_ptr, wk_ptr, wv_ptr, init_ptr, o_ptr, states_ptr, final_ptr,
                            L, H, K, V, nchunks,
                            HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_INIT: tl.constexpr,
                            STORE_STATES: tl.constexpr, PRECISION: tl.constexpr, T: tl.constexpr, BK: tl.constexpr,
                            BV: tl.constexpr):
    """Walk the chunks carrying S (K, V-tile): U = W_v - W_k S, o = diag(γ) Q S + (Γ ∘ Q Kᵀ) U,
    S <- γ_T S + (Γ[T, :] ∘ K)ᵀ U (tl.dot in float32)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_t = tl.arange(0, T)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    bh = b.to(tl.int64) * H + h
    tile = offs_k[:, None] * V + offs_v[None, :]
    if HAS_INIT:
        S = tl.load(init_ptr + bh * K * V + tile, mask=mask_kv, other=0.0)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    incl = offs_t[:, None] >= offs_t[None, :]  # (T, T) [t, s]
    for c in range(nchunks):
        if STORE_STATES:
            tl.store(states_ptr + (bh * nchunks + c) * K * V + tile, S, mask=mask_kv)
        mask_t = c * T + offs_t < L
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        cum, doc, row = _chunk_terms(g_ptr, reset_ptr, b, h, c, offs_t, mask_t, L, H, HAS_G, HAS_RESET, T)
        q = tl.load(q_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0)
        k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0)
        wk = tl.load(wk_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0)
        wv = tl.load(wv_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0)
        u = wv - tl.dot(wk, S, input_precision=PRECISION)  # (T, BV) pseudo-values
        pair = incl & (doc[:, None] == doc[None, :])
        Gam = tl.where(pair, tl.exp(tl.where(pair, cum[:, None] - cum[None, :], 0.0)), 0.0)  # (T, T)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * Gam
        gamma = tl.where(doc == 0, tl.exp(cum), 0.0)
        o = tl.dot(q * gamma[:, None], S, input_precision=PRECISION) + tl.dot(scores, u, input_precision=PRECISION)
        tl.store(o_ptr + row[:, None] * V + offs_v[None, :], o, mask=mask_tv)
        # padded rows carry no decay (g = 0) and the last document, so row T - 1 stands for the chunk end
        last = offs_t == T - 1
        cum_end = tl.sum(tl.where(last, cum, 0.0), axis=0)
        doc_end = tl.sum(tl.where(last, doc, 0), axis=0)
        w_end = tl.where(doc == doc_end, tl.exp(tl.where(doc == doc_end, cum_end - cum, 0.0)), 0.0)  # (T,)
        lam = tl.where(doc_end == 0, tl.exp(cum_end), 0.0)
        S = lam * S + tl.dot(tl.trans(k * w_end[:, None]), u, input_precision=PRECISION)
    tl.store(final_ptr + bh * K * V + tile, S, mask=mask_kv)


def _tiles(K: int, V: int, block_v: int) -> tuple[int, int]:
    return max(16, next_pow2(K)), max(16, min(block_v, next_pow2(V)))


class _DeltaRuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, seq_idx, chunk):
        q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
        g = None if g is None else g.contiguous()
        batch, L, H, K = q.shape
        V = v.shape[-1]
        if CHUNKED_FORWARD:  # tl.dot needs power-of-two tiles of at least 16
            chunk = min(64, max(16, next_pow2(min(int(chunk), L))))
        else:
            chunk = max(1, min(int(chunk), L))
        nchunks = -(-L // chunk)
        reset = None if seq_idx is None else reset_mask(seq_idx).to(torch.int32).contiguous()
        init = None if initial_state is None else initial_state.contiguous()
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty(batch, L, H, V, **f32)
        final = torch.empty(batch, H, K, V, **f32)
        store = any(ctx.needs_input_grad)
        states = torch.empty(batch, H, nchunks, K, V, **f32) if store else None
        flags = dict(HAS_G=g is not None, HAS_RESET=reset is not None)
        if CHUNKED_FORWARD:
            wk, wv = torch.empty(batch, L, H, K, **f32), torch.empty(batch, L, H, V, **f32)
            BK, BV = _tiles(K, V, 64)
            _delta_wy_kernel[(batch * H, nchunks, triton.cdiv(V, BV))](k, v, beta, g, reset, wk, wv, L, H, K, V,
                                                                        **flags, T=chunk, BK=BK, BV=BV, num_warps=8)
            BK, BV = _tiles(K, V, CHUNK_FWD_CONFIG[0])
            _delta_chunk_fwd_kernel[(batch * H, triton.cdiv(V, BV))](
                q, k, g, reset, wk, wv, init, o, states, final, L, H, K, V, nchunks, **flags, HAS_INIT=init is not None,
                STORE_STATES=store, PRECISION="ieee" if triton_interpreting() else CHUNK_DOT_PRECISION, T=chunk,
                BK=BK, BV=BV, num_warps=CHUNK_FWD_CONFIG[1], num_stages=1)
        else:
            BK, BV = _tiles(K, V, FWD_CONFIG[0])
            _delta_fwd_kernel[(batch * H, triton.cdiv(V, BV))](
                q, k, v, beta, g, reset, init, o, states, final, L, H, K, V, nchunks, chunk, **flags,
                HAS_INIT=init is not None, STORE_STATES=store, BK=BK, BV=BV, num_warps=FWD_CONFIG[1])
        ctx.save_for_backward(q, k, v, beta, g, reset, states)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.chunk = chunk
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, g, reset, states = ctx.saved_tensors
        batch, L, H, K = q.shape
        V = v.shape[-1]
        BK, BV = _tiles(K, V, BWD_CONFIG[0])
        nv = triton.cdiv(V, BV)
        chunk, nchunks = ctx.chunk, states.shape[2]
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty(nv, batch, L, H, K, **f32)  # per-V-tile partials
        dk = torch.empty(nv, batch, L, H, K, **f32)
        dbeta = torch.empty(nv, batch, L, H, **f32)
        dg = None if g is None else torch.empty(nv, batch, L, H, **f32)
        dv = torch.empty(batch, L, H, V, **f32)
        dinit = torch.empty(batch, H, K, V, **f32)
        scratch = torch.empty(batch * H * nv, chunk, BK, BV, **f32)
        do = torch.zeros(batch, L, H, V, **f32) if do is None else do.to(torch.float32).contiguous()
        dfinal = None if dfinal is None else dfinal.to(torch.float32).contiguous()
        _delta_bwd_kernel[(batch * H, nv)](q, k, v, beta, g, reset, states, scratch, do, dfinal,
                                          dq, dk, dv, dbeta, dg, dinit, batch, L, H, K, V, nchunks, chunk,
                                          HAS_G=g is not None, HAS_RESET=reset is not None,
                                          HAS_DFINAL=dfinal is not None, BK=BK, BV=BV, num_warps=BWD_CONFIG[1])
        return (dq.sum(0), dk.sum(0), dv, dbeta.sum(0), None if g is None else dg.sum(0),
                None if ctx.init_dtype is None else dinit.to(ctx.init_dtype), None, None)


def delta_rule_triton(q, k, v, beta, g, initial_state, seq_idx, chunk_size):
    """q, k (B, L, H, K) float32, q already scaled; v (B, L, H, V); beta, g (B, L, H) (g None or log-decays);
    initial_state (B, H, K, V) float32 or None; seq_idx (B, L) or None; chunk_size: steps between the states the
    forward keeps for the backward. Returns (o (B, L, H, V) float32, final_state (B, H, K, V) float32)."""
    return _DeltaRuleFn.apply(q, k, v, beta, g, initial_state, seq_idx, chunk_size)
