"""Depthwise causal conv1d with fused bias and SiLU, forward and backward, in Triton.

    pre_t = bias + sum_k w[k] x_{t-(W-1)+k}      (x_s for s < 0 comes from the initial state)
    y_t   = silu(pre_t) or pre_t

With packed documents a tap that reaches into another document contributes zero; the initial state belongs to
the row's first document. Programs cover (batch, block of positions, block of channels); channels are
contiguous in memory, so every load of a (BLOCK_L, BLOCK_D) tile is coalesced. The backward recomputes
``pre`` for the W shifted windows a tile of dx needs (W^2 cached loads) instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import doc_ids, next_pow2


@triton.jit
def _x_at(x_ptr, init_ptr, b, s, offs_d, mask_d, L, DIM, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """(BL, BD) inputs at positions s (s < 0 reads the initial state (B, D, W-1), oldest first)."""
    in_x = (s >= 0) & (s < L)
    row = b.to(tl.int64) * L + s
    v = tl.load(x_ptr + row[:, None] * DIM + offs_d[None, :], mask=in_x[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32)
    if HAS_INIT:
        in_init = (s < 0) & (s >= -(W - 1))
        v += tl.load(init_ptr + (b.to(tl.int64) * DIM + offs_d[None, :]) * (W - 1) + (W - 1 + s)[:, None],
                     mask=in_init[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _doc_at(doc_ptr, b, s, L):
    """Document id at positions s; the initial-state slots (s < 0) belong to document 0."""
    return tl.load(doc_ptr + b.to(tl.int64) * L + s, mask=(s >= 0) & (s < L), other=0)


@triton.jit
def _conv_pre(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, DIM,
              W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_DOC:
        doc_t = _doc_at(doc_ptr, b, t, L)
    for k in tl.static_range(W):
        s = t - (W - 1) + k
        v = _x_at(x_ptr, init_ptr, b, s, offs_d, mask_d, L, DIM, W, HAS_INIT)
        if HAS_DOC:
            v = tl.where((_doc_at(doc_ptr, b, s, L) == doc_t)[:, None], v, 0.0)
        wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[None, :] * v
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, doc_ptr, y_ptr, L, DIM,
                     W: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    pre = _conv_pre(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, DIM,
                    W, HAS_INIT, HAS_DOC, HAS_BIAS, BLOCK_L, BLOCK_D)
    if SILU:
        pre = pre * tl.sigmoid(pre)
    row = b.to(tl.int64) * L + t
    tl.store(y_ptr + row[:, None] * DIM + offs_d[None, :], pre.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & mask_d[None, :])


@triton.jit
def _dpre_at(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, dy_ptr, b, t, offs_d, mask_d, L, DIM,
             W: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dLoss/dpre at positions t (zero outside [0, L))."""
    valid = (t >= 0) & (t < L)
    row = b.to(tl.int64) * L + t
    dy = tl.load(dy_ptr + row[:, None] * DIM + offs_d[None, :], mask=valid[:, None] & mask_d[None, :],
                 other=0.0).to(tl.float32)
    if SILU:
        pre = _conv_pre(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, b, t, offs_d, mask_d, L, DIM,
                        W, HAS_INIT, HAS_DOC, HAS_BIAS, BLOCK_L, BLOCK_D)
        sg = tl.sigmoid(pre)
        dy = dy * sg * (1.0 + pre * (1.0 - sg))
    return dy


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, init_ptr, doc_ptr, dy_ptr, dx_ptr, dw_ptr, dbias_ptr, dinit_ptr,
                     L, DIM, n_lblocks,
                     W: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    pid_l = tl.program_id(1)
    s = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    if HAS_DOC:
        doc_s = _doc_at(doc_ptr, b, s, L)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    part = (b.to(tl.int64) * n_lblocks + pid_l) * DIM + offs_d  # (BD,) index into the partial sums
    for j in tl.static_range(W):
        # x_s feeds pre_{s+j} through tap W-1-j
        t = s + j
        dpre = _dpre_at(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, dy_ptr, b, t, offs_d, mask_d, L, DIM,
                        W, SILU, HAS_INIT, HAS_DOC, HAS_BIAS, BLOCK_L, BLOCK_D)
        if j == 0:
            tl.store(dbias_ptr + part, tl.sum(dpre, axis=0), mask=mask_d)
            if HAS_DOC:
                doc_t = doc_s
            for k in tl.static_range(W):
                sk = s - (W - 1) + k
                v = _x_at(x_ptr, init_ptr, b, sk, offs_d, mask_d, L, DIM, W, HAS_INIT)
                if HAS_DOC:
                    v = tl.where((_doc_at(doc_ptr, b, sk, L) == doc_t)[:, None], v, 0.0)
                tl.store(dw_ptr + part * W + k, tl.sum(dpre * v, axis=0), mask=mask_d)
        if HAS_DOC:
            dpre = tl.where((_doc_at(doc_ptr, b, t, L) == doc_s)[:, None], dpre, 0.0)
        wk = tl.load(w_ptr + offs_d * W + (W - 1 - j), mask=mask_d, other=0.0).to(tl.float32)
        dx += wk[None, :] * dpre
    row = b.to(tl.int64) * L + s
    tl.store(dx_ptr + row[:, None] * DIM + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(s < L)[:, None] & mask_d[None, :])
    if HAS_INIT:
        if pid_l == 0:
            # initial-state slot i holds position s = i - (W-1); it feeds pre_t for t = s + W-1-k
            si = tl.arange(0, BLOCK_S) - (W - 1)
            dinit = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
            for kk in tl.static_range(W):
                ti = si + (W - 1 - kk)
                dpre_i = _dpre_at(x_ptr, init_ptr, doc_ptr, w_ptr, bias_ptr, dy_ptr, b, ti, offs_d, mask_d, L, DIM,
                                  W, SILU, HAS_INIT, HAS_DOC, HAS_BIAS, BLOCK_S, BLOCK_D)
                if HAS_DOC:
                    dpre_i = tl.where((_doc_at(doc_ptr, b, ti, L) == 0)[:, None], dpre_i, 0.0)
                w_k = tl.load(w_ptr + offs_d * W + kk, mask=mask_d, other=0.0).to(tl.float32)
                dinit += w_k[None, :] * dpre_i
            slot = si + (W - 1)
            tl.store(dinit_ptr + (b.to(tl.int64) * DIM + offs_d[None, :]) * (W - 1) + slot[:, None],
                     dinit.to(dinit_ptr.dtype.element_ty), mask=(slot < W - 1)[:, None] & mask_d[None, :])


def _blocks(dim: int) -> tuple[int, int]:
    block_d = min(64, next_pow2(dim))
    return 64, block_d


class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, initial_state, doc):
        batch, L, dim = x.shape
        W = weight.shape[1]
        x, weight = x.contiguous(), weight.contiguous()
        init = initial_state.contiguous() if initial_state is not None and W > 1 else None
        y = torch.empty_like(x)
        block_l, block_d = _blocks(dim)
        grid = (batch, triton.cdiv(L, block_l), triton.cdiv(dim, block_d))
        _conv_fwd_kernel[grid](x, weight, bias, init, doc, y, L, dim, W=W, SILU=silu, HAS_INIT=init is not None,
                               HAS_DOC=doc is not None, HAS_BIAS=bias is not None, BLOCK_L=block_l, BLOCK_D=block_d,
                               num_warps=4)
        ctx.save_for_backward(x, weight, bias, init, doc)
        ctx.silu = silu
        ctx.init_given = initial_state is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, init, doc = ctx.saved_tensors
        batch, L, dim = x.shape
        W = weight.shape[1]
        block_l, block_d = _blocks(dim)
        n_lblocks = triton.cdiv(L, block_l)
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        f32 = dict(device=x.device, dtype=torch.float32)
        dw = torch.empty(batch, n_lblocks, dim, W, **f32)
        dbias = torch.empty(batch, n_lblocks, dim, **f32)
        dinit = torch.zeros(init.shape, **f32) if init is not None else None
        grid = (batch, n_lblocks, triton.cdiv(dim, block_d))
        _conv_bwd_kernel[grid](x, weight, bias, init, doc, dy, dx, dw, dbias, dinit, L, dim, n_lblocks,
                               W=W, SILU=ctx.silu, HAS_INIT=init is not None, HAS_DOC=doc is not None,
                               HAS_BIAS=bias is not None, BLOCK_L=block_l, BLOCK_D=block_d,
                               BLOCK_S=max(2, next_pow2(W - 1)), num_warps=4)
        dbias = dbias.sum((0, 1)).to(bias.dtype) if bias is not None else None
        if ctx.init_given:
            dinit = dinit.to(init.dtype) if dinit is not None else torch.zeros(batch, dim, 0, **f32)
        else:
            dinit = None
        return dx, dw.sum((0, 1)).to(weight.dtype), dbias, None, dinit, None


def _final_state(x, initial_state, doc, W):
    """(B, D, W-1) last W-1 inputs, oldest first; slots from earlier documents than the last are zero."""
    batch, L, dim = x.shape
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, W - 1)
    window = torch.cat([initial_state.to(x.dtype), x[:, max(0, L - (W - 1)):].transpose(1, 2)], dim=-1)
    window = window[:, :, window.shape[-1] - (W - 1):]  # (B, D, W-1)
    if doc is not None and W > 1:
        pos_doc = torch.cat([doc.new_zeros(batch, W - 1), doc], dim=1)[:, -(W - 1):]  # (B, W-1)
        window = window * (pos_doc == doc[:, -1:]).unsqueeze(1).to(window.dtype)
    return window


def causal_conv1d_triton(x, weight, bias, activation, initial_state, seq_idx):
    """x (B, L, D); weight (D, W); bias (D,) or None; activation None or "silu"; initial_state (B, D, W-1) or
    None; seq_idx (B, L) or None. Returns (y (B, L, D), final_state (B, D, W-1) in the dtype of x)."""
    doc = doc_ids(seq_idx)
    y = _CausalConv1dFn.apply(x, weight, bias, activation == "silu", initial_state, doc)
    return y, _final_state(x, initial_state, doc, weight.shape[1])
