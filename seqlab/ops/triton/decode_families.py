"""One-token decode steps of the matrix-state families in Triton: one launch each, state (B, H, K, V) in place.

No host synchronisation and no Python branching on tensor values, so a decode loop of these can be captured in a
CUDA graph; no autograd. A program owns one (batch, head, V-tile): both updates act on the rows of S through k, so
the columns never mix. The math is one position of the matching op (q scaled by ``scale`` in the kernel):
    linear_attention_step:  S = diag(exp(g)) S + k vᵀ;  o = Sᵀ q            (o = (S_prev + diag(u) k vᵀ)ᵀ q with u)
                            with ``normalize`` v gains a ones column (V + 1), o is returned raw for the caller
    delta_rule_step:        S_a = exp(g) S;  S = S_a + β k (v - S_aᵀ k)ᵀ;  o = Sᵀ q
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2

BLOCK_V = 32


@triton.jit
def _la_step_kernel(state_ptr, q_ptr, k_ptr, v_ptr, g_ptr, u_ptr, o_ptr, scale, H, K, V, W,
                    HAS_G: tl.constexpr, VEC: tl.constexpr, BONUS: tl.constexpr, NORMALIZE: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    offs_k = tl.arange(0, BK)
    offs_w = tl.program_id(1) * BV + tl.arange(0, BV)  # columns of the state (W = V, or V + 1 with NORMALIZE)
    mask_k, mask_w = offs_k < K, offs_w < W
    mask_kw = mask_k[:, None] & mask_w[None, :]
    bh = pid.to(tl.int64)
    q = tl.load(q_ptr + bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * V + offs_w, mask=offs_w < V, other=0.0).to(tl.float32)
    if NORMALIZE:
        v = tl.where(offs_w == V, 1.0, v)  # the normaliser column z accumulates k
    sp = state_ptr + bh * K * W + offs_k[:, None] * W + offs_w[None, :]
    S = tl.load(sp, mask=mask_kw, other=0.0).to(tl.float32)  # (BK, BV)
    kv = k[:, None] * v[None, :]
    if BONUS:
        u = tl.load(u_ptr + h * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        o = tl.sum((S + u[:, None] * kv) * q[:, None], axis=0)
    if HAS_G:
        if VEC:
            decay = tl.exp(tl.load(g_ptr + bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32))
            S = S * decay[:, None]
        else:
            S = S * tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    S += kv
    if not BONUS:
        o = tl.sum(S * q[:, None], axis=0)
    tl.store(sp, S.to(state_ptr.dtype.element_ty), mask=mask_kw)
    tl.store(o_ptr + bh * W + offs_w, o, mask=mask_w)


def linear_attention_step_triton(state, q, k, v, g, u, scale, normalize):
    """state (B, H, K, W) updated in place (W = V, or V + 1 with ``normalize``); q, k (B, H, K); v (B, H, V); g None,
    (B, H) or (B, H, K); u None or (H, K). Returns the raw read-out (B, H, W) float32 (with ``normalize`` the
    caller divides by its last column)."""
    batch, H, K = q.shape
    V, W = v.shape[-1], state.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g = None if g is None else g.contiguous()
    u = None if u is None else u.contiguous()
    o = torch.empty(batch, H, W, device=q.device, dtype=torch.float32)
    BK, BV = max(16, next_pow2(K)), max(16, min(BLOCK_V, next_pow2(W)))
    grid = (batch * H, triton.cdiv(W, BV))
    _la_step_kernel[grid](state, q, k, v, g, u, o, float(scale), H, K, V, W,
                          HAS_G=g is not None, VEC=g is not None and g.dim() == 3, BONUS=u is not None,
                          NORMALIZE=bool(normalize), BK=BK, BV=BV, num_warps=4)
    return o


@triton.jit
def _delta_step_kernel(state_ptr, q_ptr, k_ptr, v_ptr, beta_ptr, g_ptr, o_ptr, scale, K, V,
                       HAS_G: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_kv = mask_k[:, None] & mask_v[None, :]
    q = tl.load(q_ptr + bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + bh * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + bh).to(tl.float32)
    sp = state_ptr + bh * K * V + offs_k[:, None] * V + offs_v[None, :]
    S = tl.load(sp, mask=mask_kv, other=0.0).to(tl.float32)  # (BK, BV)
    if HAS_G:
        S = S * tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    w = tl.sum(S * k[:, None], axis=0)  # (BV,) what the state returns for k
    S += k[:, None] * (beta * (v - w))[None, :]
    tl.store(sp, S.to(state_ptr.dtype.element_ty), mask=mask_kv)
    o = tl.sum(S * q[:, None], axis=0)
    tl.store(o_ptr + bh * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=mask_v)


def delta_rule_step_triton(state, q, k, v, beta, g, scale):
    """state (B, H, K, V) updated in place; q, k (B, H, K); v (B, H, V); beta, g (B, H) (g None or log-decays).
    Returns o (B, H, V) in the dtype of q."""
    batch, H, K = q.shape
    V = v.shape[-1]
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    g = None if g is None else g.contiguous()
    o = torch.empty(batch, H, V, device=q.device, dtype=q.dtype)
    BK, BV = max(16, next_pow2(K)), max(16, min(BLOCK_V, next_pow2(V)))
    grid = (batch * H, triton.cdiv(V, BV))
    _delta_step_kernel[grid](state, q, k, v, beta, g, o, float(scale), K, V,
                             HAS_G=g is not None, BK=BK, BV=BV, num_warps=4)
    return o
