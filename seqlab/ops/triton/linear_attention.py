"""Chunked linear attention with no decay or a scalar per-head log-decay, forward and backward, in Triton.

Same recurrence as ``seqlab.ops.linear_attention`` (S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t). Per head,
per chunk of T positions with cum_t = sum of g over the chunk through t (cum_last its value at the chunk end):
    o_t   = sum_{s<=t} (q_t·k_s) exp(cum_t - cum_s) v_s  +  exp(cum_t) q_tᵀ S_in          (tl.dot, (T, T) tile)
    S_out = exp(cum_last) S_in + sum_s exp(cum_last - cum_s) k_s v_sᵀ
Every exponent is <= 0 (masked pairs are excluded before the exp). With packed documents a pair of positions
in different documents is masked, the incoming state reaches only the positions of its own document, and only
the last document's positions reach the outgoing state.

Forward: one program per (batch, head, V-tile) walks the chunks in order, keeping S (K, V-tile) in float32
registers and writing the state entering each chunk. Backward: one program per (batch, head) walks the chunks in
reverse with dS (K, V), reusing those states; the gradient of cum is turned into the gradient of g by a reverse
cumulative sum inside the chunk.

A per-key-channel decay g (B, L, H, K) (GLA, RWKV-6's w) replaces the scalar factors by (T, K) ones and the pair
decays by a (T, T, K) tile (every exponent still <= 0), reduced over K without tl.dot; its chunks are 16 long.
With the RWKV bonus u the read-out at t decays through t - 1, pairs need s < t, and o_t gains (q_t·(u ⊙ k_t)) v_t.
The scale and the normaliser column are applied by the caller in torch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import doc_ids, next_pow2


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _revcumsum(x):
    """Along axis 0: out[r] = sum_{t >= r} x[t] (g_r enters every cum_t with t >= r)."""
    return tl.sum(x, axis=0, keep_dims=True) - tl.cumsum(x, axis=0) + x


@triton.jit
def _doc_masks(doc_ptr, b, c, t, mask_t, L, T: tl.constexpr):
    """Document ids of chunk c's positions, of the position before the chunk (0 for the first chunk: the initial
    state belongs to the row's first document) and of the chunk's last position."""
    base = b.to(tl.int64) * L
    doc = tl.load(doc_ptr + base + t, mask=mask_t, other=-1)
    prev = tl.load(doc_ptr + base + tl.maximum(c * T - 1, 0))
    prev = tl.where(c > 0, prev, 0)
    last = tl.load(doc_ptr + base + tl.minimum(c * T + T - 1, L - 1))
    return doc, prev, last


@triton.jit
def _terms_scalar(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, L, H,
                  HAS_G: tl.constexpr, HAS_DOC: tl.constexpr, BONUS: tl.constexpr, T: tl.constexpr):
    """Scalar-decay factors of chunk c: D (T, T) pair decays (masked), r (T,) read-out of S_in, w (T,) write into
    S_out, lam (scalar) survival of S_in. With the bonus the read-out at t decays through t - 1 and s < t."""
    t = c * T + offs_t
    if HAS_G:
        gt = tl.load(g_ptr + (b.to(tl.int64) * L + t) * H + h, mask=mask_t, other=0.0).to(tl.float32)
    else:
        gt = tl.zeros((T,), dtype=tl.float32)
    cum = tl.cumsum(gt, axis=0)  # (T,)
    cum_last = tl.sum(tl.where(offs_t == T - 1, cum, 0.0), axis=0)
    if BONUS:
        cq = cum - gt
        pair = offs_t[:, None] > offs_t[None, :]
    else:
        cq = cum
        pair = offs_t[:, None] >= offs_t[None, :]  # (T, T) [t, s]
    r = tl.exp(cq)
    w = tl.exp(cum_last - cum)
    lam = tl.exp(cum_last)
    if HAS_DOC:
        doc, prev, last = _doc_masks(doc_ptr, b, c, t, mask_t, L, T)
        pair = pair & (doc[:, None] == doc[None, :])
        r = tl.where(doc == prev, r, 0.0)
        w = tl.where(doc == last, w, 0.0)
        lam = tl.where(last == prev, lam, 0.0)
    D = tl.where(pair, tl.exp(tl.where(pair, cq[:, None] - cum[None, :], 0.0)), 0.0)  # exponents <= 0 where kept
    return D, r, w, lam


@triton.jit
def _terms_vec(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, offs_k, mask_k, L, H, K,
               HAS_DOC: tl.constexpr, BONUS: tl.constexpr, T: tl.constexpr):
    """Per-key-channel factors of chunk c: D3 (T, T, BK) pair decays, r (T, BK), w (T, BK), lam (BK,)."""
    t = c * T + offs_t
    row = (b.to(tl.int64) * L + t) * H + h
    gt = tl.load(g_ptr + row[:, None] * K + offs_k[None, :], mask=mask_t[:, None] & mask_k[None, :],
                 other=0.0).to(tl.float32)
    cum = tl.cumsum(gt, axis=0)  # (T, BK)
    cum_last = tl.sum(tl.where((offs_t == T - 1)[:, None], cum, 0.0), axis=0)  # (BK,)
    if BONUS:
        cq = cum - gt
        pair = offs_t[:, None] > offs_t[None, :]
    else:
        cq = cum
        pair = offs_t[:, None] >= offs_t[None, :]
    r = tl.exp(cq)
    w = tl.exp(cum_last[None, :] - cum)
    lam = tl.exp(cum_last)
    if HAS_DOC:
        doc, prev, last = _doc_masks(doc_ptr, b, c, t, mask_t, L, T)
        pair = pair & (doc[:, None] == doc[None, :])
        r = tl.where((doc == prev)[:, None], r, 0.0)
        w = tl.where((doc == last)[:, None], w, 0.0)
        lam = tl.where(last == prev, lam, 0.0)
    diff = tl.where(pair[:, :, None], cq[:, None, :] - cum[None, :, :], 0.0)  # (T, T, BK), <= 0 where kept
    D3 = tl.where(pair[:, :, None], tl.exp(diff), 0.0)
    return D3, r, w, lam


@triton.jit
def _la_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, doc_ptr, init_ptr, o_ptr, states_ptr, final_ptr,
                   L, H, K, V, nchunks,
                   HAS_G: tl.constexpr, VEC: tl.constexpr, BONUS: tl.constexpr, HAS_DOC: tl.constexpr,
                   HAS_INIT: tl.constexpr, IEEE: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, T)
    mask_v, mask_k = offs_v < V, offs_k < K
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_off = (b.to(tl.int64) * H + h) * K * V + offs_k[:, None] * V + offs_v[None, :]  # (BK, BV)
    if HAS_INIT:
        S = tl.load(init_ptr + state_off, mask=mask_kv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)
    if BONUS:
        u = tl.load(u_ptr + h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BK,)
    for c in range(nchunks):
        tl.store(states_ptr + (b.to(tl.int64) * H + h) * nchunks * K * V + c * K * V
                 + offs_k[:, None] * V + offs_v[None, :], S, mask=mask_kv)
        t = c * T + offs_t
        mask_t = t < L
        row = (b.to(tl.int64) * L + t) * H + h  # (T,)
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
        if VEC:
            D3, r, w, lam = _terms_vec(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, offs_k, mask_k, L, H, K,
                                       HAS_DOC, BONUS, T)
            A = tl.sum(q[:, None, :] * k[None, :, :] * D3, axis=2)  # (T, T)
            o = _dot(A, v, IEEE) + _dot(q * r, S, IEEE)  # (T, BV)
            S = lam[:, None] * S + _dot(tl.trans(k * w), v, IEEE)
        else:
            D, r, w, lam = _terms_scalar(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, L, H, HAS_G, HAS_DOC, BONUS, T)
            A = _dot(q, tl.trans(k), IEEE) * D  # (T, T)
            o = _dot(A, v, IEEE) + _dot(q * r[:, None], S, IEEE)  # (T, BV)
            S = lam * S + _dot(tl.trans(k * w[:, None]), v, IEEE)
        if BONUS:  # the current token through u instead of the state (RWKV-6)
            o += tl.sum(q * u[None, :] * k, axis=1)[:, None] * v
        tl.store(o_ptr + row[:, None] * V + offs_v[None, :], o, mask=mask_tv)
    tl.store(final_ptr + state_off, S, mask=mask_kv)


@triton.jit
def _la_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, doc_ptr, states_ptr, do_ptr, dfinal_ptr,
                   dq_ptr, dk_ptr, dv_ptr, dg_ptr, du_ptr, dinit_ptr,
                   L, H, K, V, nchunks,
                   HAS_G: tl.constexpr, VEC: tl.constexpr, BONUS: tl.constexpr, HAS_DOC: tl.constexpr,
                   HAS_DFINAL: tl.constexpr, IEEE: tl.constexpr, T: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_v = tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, T)
    mask_v, mask_k = offs_v < V, offs_k < K
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_off = (b.to(tl.int64) * H + h) * K * V + offs_k[:, None] * V + offs_v[None, :]
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + state_off, mask=mask_kv, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BK, BV), dtype=tl.float32)
    if BONUS:
        u = tl.load(u_ptr + h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        du = tl.zeros((BK,), dtype=tl.float32)
    for cc in range(nchunks):
        c = nchunks - 1 - cc
        t = c * T + offs_t
        mask_t = t < L
        row = (b.to(tl.int64) * L + t) * H + h
        mask_tk = mask_t[:, None] & mask_k[None, :]
        mask_tv = mask_t[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
        S_in = tl.load(states_ptr + (b.to(tl.int64) * H + h) * nchunks * K * V + c * K * V
                       + offs_k[:, None] * V + offs_v[None, :], mask=mask_kv, other=0.0)
        dov = _dot(do, tl.trans(v), IEEE)  # (T, T) [t, s] = dO_t · v_s
        do_s = _dot(do, tl.trans(S_in), IEEE)  # (T, BK): S_in dO_t
        v_ds = _dot(v, tl.trans(dS), IEEE)  # (T, BK): dS v_s
        # d loss / d log-decays: `reads` on the read-out side (cum_t, or cum_{t-1} with the bonus), `writes` on the
        # key side (cum_s), `dlast` on cum at the chunk end
        if VEC:
            D3, r, w, lam = _terms_vec(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, offs_k, mask_k, L, H, K,
                                       HAS_DOC, BONUS, T)
            X3 = dov[:, :, None] * D3  # (T, T, BK)
            dq_pair = tl.sum(X3 * k[None, :, :], axis=1)  # (T, BK)
            dk_pair = tl.sum(X3 * q[:, None, :], axis=0)  # (T, BK)
            A = tl.sum(q[:, None, :] * k[None, :, :] * D3, axis=2)  # (T, T)
            into = w * k * v_ds  # (T, BK)
            reads = q * dq_pair + r * q * do_s
            writes = -(k * dk_pair) - into
            dlast = lam * tl.sum(S_in * dS, axis=1) + tl.sum(into, axis=0)  # (BK,)
            dq = dq_pair + r * do_s
            dk = dk_pair + w * v_ds
            dv = _dot(tl.trans(A), do, IEEE) + _dot(k * w, dS, IEEE)
            if HAS_G:
                dcum = writes + tl.where((offs_t == T - 1)[:, None], dlast[None, :], 0.0)
                dg = _revcumsum(dcum + reads)
                if BONUS:
                    dg -= reads  # cum_{t-1} = cum_t - g_t
                tl.store(dg_ptr + row[:, None] * K + offs_k[None, :], dg, mask=mask_tk)
            qr = q * r
            dS = lam[:, None] * dS
        else:
            D, r, w, lam = _terms_scalar(g_ptr, doc_ptr, b, h, c, offs_t, mask_t, L, H, HAS_G, HAS_DOC, BONUS, T)
            qk = _dot(q, tl.trans(k), IEEE)  # (T, T)
            M = dov * D
            P = M * qk  # d loss / d (exponent of D[t, s])
            into = w * tl.sum(k * v_ds, axis=1)  # (T,)
            reads = tl.sum(P, axis=1) + r * tl.sum(q * do_s, axis=1)
            writes = -tl.sum(P, axis=0) - into
            dlast = lam * tl.sum(tl.sum(S_in * dS, axis=1), axis=0) + tl.sum(into, axis=0)
            dq = _dot(M, k, IEEE) + r[:, None] * do_s
            dk = _dot(tl.trans(M), q, IEEE) + w[:, None] * v_ds
            dv = _dot(tl.trans(qk * D), do, IEEE) + _dot(k * w[:, None], dS, IEEE)
            if HAS_G:
                dcum = writes + tl.where(offs_t == T - 1, dlast, 0.0)
                dg = _revcumsum(dcum + reads)
                if BONUS:
                    dg -= reads
                tl.store(dg_ptr + row, dg, mask=mask_t)
            qr = q * r[:, None]
            dS = lam * dS
        if BONUS:
            beta = tl.sum(q * u[None, :] * k, axis=1)  # (T,)
            dbeta = tl.sum(do * v, axis=1)  # (T,)
            dq += dbeta[:, None] * u[None, :] * k
            dk += dbeta[:, None] * u[None, :] * q
            dv += beta[:, None] * do
            du += tl.sum(dbeta[:, None] * q * k, axis=0)
        tl.store(dq_ptr + row[:, None] * K + offs_k[None, :], dq, mask=mask_tk)
        tl.store(dk_ptr + row[:, None] * K + offs_k[None, :], dk, mask=mask_tk)
        tl.store(dv_ptr + row[:, None] * V + offs_v[None, :], dv, mask=mask_tv)
        dS += _dot(tl.trans(qr), do, IEEE)
    tl.store(dinit_ptr + state_off, dS, mask=mask_kv)
    if BONUS:
        tl.store(du_ptr + (b.to(tl.int64) * H + h) * K + offs_k, du, mask=mask_k)


def _tiles(q, v, chunk_size, vec: bool):
    K, V = q.shape[-1], v.shape[-1]
    # the result does not depend on T; a per-channel decay holds (T, T, K) tiles, so its chunks are 16 long
    T = 16 if vec else min(64, max(16, next_pow2(min(chunk_size, q.shape[1]))))
    return T, max(16, next_pow2(K)), max(16, next_pow2(V))


def _ieee(q) -> bool:
    return q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") == "1"


class _LinearAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, u, initial_state, seq_idx, chunk_size):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        g = None if g is None else g.contiguous()
        u = None if u is None else u.contiguous()
        batch, L, H, K = q.shape
        V = v.shape[-1]
        vec = g is not None and g.dim() == 4
        T, BK, BV_full = _tiles(q, v, chunk_size, vec)
        BV = min(BV_full, 64)
        nchunks = -(-L // T)
        doc = doc_ids(seq_idx)
        f32 = dict(device=q.device, dtype=torch.float32)
        o = torch.empty(batch, L, H, V, **f32)
        states = torch.empty(batch, H, nchunks, K, V, **f32)
        final = torch.empty(batch, H, K, V, **f32)
        init = None if initial_state is None else initial_state.contiguous()
        grid = (batch * H, triton.cdiv(V, BV))
        _la_fwd_kernel[grid](q, k, v, g, u, doc, init, o, states, final, L, H, K, V, nchunks,
                             HAS_G=g is not None, VEC=vec, BONUS=u is not None, HAS_DOC=doc is not None,
                             HAS_INIT=init is not None, IEEE=_ieee(q), T=T, BK=BK, BV=BV)
        ctx.save_for_backward(q, k, v, g, u, doc, states)
        ctx.init_dtype = None if initial_state is None else initial_state.dtype
        ctx.T, ctx.BK, ctx.BV, ctx.vec = T, BK, BV_full, vec
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, u, doc, states = ctx.saved_tensors
        batch, L, H, K = q.shape
        V = v.shape[-1]
        f32 = dict(device=q.device, dtype=torch.float32)
        dq = torch.empty(batch, L, H, K, **f32)
        dk = torch.empty(batch, L, H, K, **f32)
        dv = torch.empty(batch, L, H, V, **f32)
        dg = None if g is None else torch.empty(g.shape, **f32)
        du = None if u is None else torch.empty(batch, H, K, **f32)
        dinit = torch.empty(batch, H, K, V, **f32)
        do = torch.zeros(batch, L, H, V, **f32) if do is None else do.contiguous()
        dfinal = None if dfinal is None else dfinal.contiguous()
        _la_bwd_kernel[(batch * H,)](q, k, v, g, u, doc, states, do, dfinal, dq, dk, dv, dg, du, dinit,
                                     L, H, K, V, states.shape[2],
                                     HAS_G=g is not None, VEC=ctx.vec, BONUS=u is not None, HAS_DOC=doc is not None,
                                     HAS_DFINAL=dfinal is not None, IEEE=_ieee(q), T=ctx.T, BK=ctx.BK, BV=ctx.BV)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if g is None else dg.to(g.dtype),
                None if u is None else du.sum(0).to(u.dtype),
                None if ctx.init_dtype is None else dinit.to(ctx.init_dtype), None, None)


def linear_attention_triton(q, k, v, g, u, initial_state, seq_idx, chunk_size):
    """q, k (B, L, H, K) (already scaled); v (B, L, H, V); g None, (B, L, H) or (B, L, H, K) log-decays; u None or
    (H, K); initial_state (B, H, K, V) float32 or None; seq_idx (B, L) or None.
    Returns (o in the dtype of q, final_state float32)."""
    return _LinearAttentionFn.apply(q, k, v, g, u, initial_state, seq_idx, chunk_size)
