"""Backward of the selective scan with one channel per lane: the lane forward's partner (see selective_scan.py).

A program is one warp of 32 channels over one time segment (grid (D / 32, batch, segments), the chunk backward's
arguments and outputs). Each lane keeps its channel's N states as N float32 registers, so the sums over states of a
step (dx = <dh, B>, <q, A>, y = <h, C>) stay inside the thread; the sums over channels (dB_t, dC_t) are one
reduce-scatter of the 2N per-lane contributions over the warp (31 shuffles at N = 16), after which each lane owns one
(n, B or C) sum and adds it to memory with one atomic. Against the chunk backward's (16 channels x 16 states) tiles
this removes the layout conversions through shared memory and most shuffles.

Per 8-step chunk, in reverse: rebuild the states from the forward's checkpoint, then the adjoint steps
    dh_t = C_t dy_t + a_{t+1} dh_{t+1},    q_t = dh_t (a_t h_{t-1}),    a_t h_{t-1} = h_t - dt_t u_t B_t
(the last identity is the step's own update, so only h_t is kept). SPLIT (constexpr) trades exps for registers:
0 keeps all 8 rebuilt states (128 registers at N = 16); 4 keeps steps 4..7, runs their adjoints, then rebuilds
steps 0..2 again from the checkpoint (11 rebuild steps per 8 instead of 8, 64 registers of states).

Not the default: on an H200 it is slower than the chunk backward (selective_scan.TUNING notes the numbers).
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.jit_math import softplus
from seqlab.ops.triton.scan_lanes import (
    LN2,
    _lane_channel_params,
    _lane_fold,
    _lane_load_state,
    _lane_reduce_scatter,
    _lane_row_load,
    _lane_row_widen,
    _lane_scaled_A,
    _lane_step,
    _lane_tile,
    _lane_zeros,
)


@triton.jit
def _lane_decay(dt, A2n, reset, HAS_DOC: tl.constexpr):
    """exp(dt A_n) (BD,), A2n = A_n log2(e); a document start zeroes it."""
    a = tl.exp2(dt * A2n)
    if HAS_DOC:
        a = tl.where(reset, 0.0, a)
    return a


@triton.jit
def _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d, DIM,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr):
    """Step t's (BD,) inputs at flat row `row` (clamped into the batch row): delta + bias before the softplus, dt
    (0 at or past t_end: the identity step), u, the document-start flag and whether the step is inside the segment."""
    valid = offs_d * 0 + t < t_end
    io = row * DIM + offs_d
    raw = tl.load(delta_ptr + io).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        dt = softplus(raw)
    else:
        dt = raw
    dt = tl.where(valid, dt, 0.0)
    u = tl.load(u_ptr + io).to(tl.float32)
    reset = valid
    if HAS_DOC:  # every lane reads the step's document id
        doc = tl.load(doc_ptr + row + offs_d * 0, mask=valid, other=0)
        prev = tl.load(doc_ptr + row - 1 + offs_d * 0, mask=valid & (offs_d * 0 + t > 0), other=0)
        reset = doc != prev
    return raw, dt, u, reset, valid


@triton.jit
def _lane_rebuild(h, s, chunk, row_b, row_last, t_end, A2, bias, g, offs_d, u_ptr, delta_ptr, B_ptr, doc_ptr,
                  DIM, G, N, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr):
    """h_{t-1} -> h_t for step s of the chunk (the forward's update, recomputed)."""
    t = chunk * 8 + s
    row = tl.minimum(row_b + t, row_last)
    raw, dt, u, reset, valid = _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d, DIM,
                                            HAS_BIAS, SOFTPLUS, HAS_DOC)
    Bs = _lane_row_widen(_lane_row_load(B_ptr, row, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS), BF16_PAIRS)
    h, y_unused = _lane_step(h, A2, dt, dt * u, Bs, Bs, reset, HAS_DOC, False)
    return h


@triton.jit
def _lane_adjoint(h, carry, dA, A2, dt, dtu, dyg, reset, Bs, Cs, HAS_DOC: tl.constexpr, WANT_Y: tl.constexpr):
    """Adjoint of one step. h: h_t, carry: a_{t+1} dh_{t+1}, dA: the running sum of dt q (tuples of N (BD,)).
    Returns the carry a_t dh_t, dA, <dh, B>, <q, A2>, <h_t, C> (zeros without WANT_Y), and the per-lane
    contributions dh dt u to dB_t and dy h_t to dC_t (tuples of N)."""
    new_carry = ()
    new_dA = ()
    gB = ()
    gC = ()
    dx0 = tl.zeros_like(dt)
    dx1 = tl.zeros_like(dt)
    qa0 = tl.zeros_like(dt)
    qa1 = tl.zeros_like(dt)
    y0 = tl.zeros_like(dt)
    y1 = tl.zeros_like(dt)
    for n in tl.static_range(len(h)):
        dh = dyg * Cs[n] + carry[n]
        q = dh * (h[n] - dtu * Bs[n])  # dh * a_t h_{t-1}
        new_carry = new_carry + (_lane_decay(dt, A2[n], reset, HAS_DOC) * dh,)
        new_dA = new_dA + (dA[n] + q * dt,)
        gB = gB + (dh * dtu,)
        gC = gC + (dyg * h[n],)
        if n % 2 == 0:  # two partial sums halve the dependent FMA chains
            dx0 += dh * Bs[n]
            qa0 += q * A2[n]
            if WANT_Y:
                y0 += h[n] * Cs[n]
        else:
            dx1 += dh * Bs[n]
            qa1 += q * A2[n]
            if WANT_Y:
                y1 += h[n] * Cs[n]
    return new_carry, new_dA, dx0 + dx1, qa0 + qa1, y0 + y1, gB, gC


@triton.jit
def _lane_grad_in(dy_ptr, z_ptr, io, valid, HAS_Z: tl.constexpr):
    """dy, z, sigmoid(z) and dy through the gate (dy silu(z)), (BD,) float32, 0 outside the segment; without a gate
    z and sigmoid(z) are placeholders."""
    dy = tl.load(dy_ptr + io, mask=valid, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + io, mask=valid, other=0.0).to(tl.float32)
        sz = tl.sigmoid(zv)
        dyg = dy * zv * sz
    else:
        zv = dy
        sz = dy
        dyg = dy
    return dy, zv, sz, dyg


@triton.jit
def _lane_adjoint_steps(hs, FIRST: tl.constexpr, carry, dA, dD_acc, dbias_acc, chunk, row_b, row_last, t_end,
                        A2, Dskip, bias, g, lane, offs_d,
                        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, ypre_ptr,
                        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, DIM, G, N,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        HAS_DOC: tl.constexpr, HAS_YPRE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr,
                        SHFL_ASM: tl.constexpr):
    """Adjoint steps FIRST + len(hs) - 1 down to FIRST of the chunk, hs[k] = h at step FIRST + k: stores du, d delta,
    dz of each step, adds its dB, dC (summed over the warp's channels) to memory; returns carry, dA, dD, d bias."""
    PER_SUM: tl.constexpr = 32 // (2 * BLOCK_N)  # lanes holding the same (n, B or C) sum after the reduce-scatter
    j = lane // PER_SUM
    n_sum = j % BLOCK_N
    for k in tl.static_range(len(hs)):
        t = chunk * 8 + FIRST + len(hs) - 1 - k
        row = tl.minimum(row_b + t, row_last)
        raw, dt, u, reset, valid = _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d, DIM,
                                                HAS_BIAS, SOFTPLUS, HAS_DOC)
        io = row * DIM + offs_d
        dy, zv, sz, dyg = _lane_grad_in(dy_ptr, z_ptr, io, valid, HAS_Z)
        Bs = _lane_row_widen(_lane_row_load(B_ptr, row, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS), BF16_PAIRS)
        Cs = _lane_row_widen(_lane_row_load(C_ptr, row, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS), BF16_PAIRS)
        dtu = dt * u
        carry, dA, dx, qa, y, gB, gC = _lane_adjoint(hs[len(hs) - 1 - k], carry, dA, A2, dt, dtu, dyg, reset, Bs,
                                                     Cs, HAS_DOC, HAS_Z and not HAS_YPRE)
        du = dx * dt
        if HAS_D:
            du += Dskip * dyg
        ddt = dx * u + qa * LN2  # d/d dt of exp(dt A) h = A a h, with A = A2 ln 2
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(valid, ddt, 0.0)
        dbias_acc += ddt
        dD_acc += dyg * u
        tl.store(du_ptr + io, du.to(du_ptr.dtype.element_ty), mask=valid)
        tl.store(ddelta_ptr + io, ddt.to(ddelta_ptr.dtype.element_ty), mask=valid)
        if HAS_Z:
            if HAS_YPRE:
                y = tl.load(ypre_ptr + io, mask=valid, other=0.0).to(tl.float32)
            elif HAS_D:
                y += Dskip * u
            dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + io, dz.to(dz_ptr.dtype.element_ty), mask=valid)
        sums = _lane_reduce_scatter(gB + gC, lane, SHFL_ASM)  # lane: sum of value j = lane // PER_SUM
        bc = (row * G + g) * N + n_sum
        target = tl.where(j < BLOCK_N, dB_ptr + bc, dC_ptr + bc)
        tl.atomic_add(target, sums, mask=valid & (lane % PER_SUM == 0) & (n_sum < N), sem="relaxed")
    return carry, dA, dD_acc, dbias_acc


@triton.jit
def _scan_bwd_lane_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, ckpt_ptr,
                          dy_ptr, dfinal_ptr, seg_a_ptr, seg_b_ptr, ypre_ptr,
                          du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dinit_ptr,
                          L, DIM, G, N, n_ckpt, seg_len, n_seg, seg_first,
                          HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                          HAS_DFINAL: tl.constexpr, HAS_DOC: tl.constexpr, CARRY_ONLY: tl.constexpr,
                          HAS_YPRE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                          BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr,
                          SHFL_ASM: tl.constexpr, SPLIT: tl.constexpr):
    """Same grid, arguments and outputs as selective_scan._scan_bwd_chunk_kernel, with BLOCK_D = 32 channels on one
    warp (32 divides D / G) and BLOCK_N <= 16. CARRY_ONLY: from a zero carry, the segment's adjoint carry at its
    start (seg_b) and decay product (seg_a). BC_VEC, EVEN_N, BF16_PAIRS: see scan_lanes._lane_row_load."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2) + seg_first
    lane = tl.arange(0, BLOCK_D)
    offs_d = pid_d * BLOCK_D + lane
    mask_d = offs_d < DIM
    A2 = _lane_scaled_A(A_ptr, offs_d, mask_d, N, BLOCK_N)
    g = (pid_d * BLOCK_D) // (DIM // G)
    state_base = pid_b.to(tl.int64) * DIM * N
    seg_base = pid_b.to(tl.int64) * n_seg * DIM * N
    carry = _lane_zeros(BLOCK_D, BLOCK_N)
    dA = _lane_zeros(BLOCK_D, BLOCK_N)
    if not CARRY_ONLY:
        if HAS_DFINAL:
            carry = _lane_load_state(dfinal_ptr, state_base, offs_d, mask_d, N, BLOCK_N)
        # the later segments, last first: carry <- a_j carry + b_j
        carry = _lane_fold(carry, seg_a_ptr, seg_b_ptr, seg_base, n_seg - 1, n_seg - 1 - pid_s, -1, DIM, N, offs_d,
                           mask_d, BLOCK_N)
    Dskip, bias = _lane_channel_params(D_ptr, bias_ptr, offs_d, mask_d, HAS_D, HAS_BIAS)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sdt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    nreset = tl.zeros((BLOCK_D,), dtype=tl.int32)
    t_begin = pid_s * seg_len
    t_end = tl.minimum(t_begin + seg_len, L)
    c_begin = t_begin // 8
    c_last = tl.cdiv(t_end, 8) - 1
    row_b = pid_b.to(tl.int64) * L
    row_last = row_b + L - 1
    for i in range(c_last + 1 - c_begin):
        chunk = c_last - i
        if CARRY_ONLY:
            for k in tl.static_range(8):
                t = chunk * 8 + 7 - k
                row = tl.minimum(row_b + t, row_last)
                raw, dt, u, reset, valid = _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d,
                                                        DIM, HAS_BIAS, SOFTPLUS, HAS_DOC)
                dy, zv, sz, dyg = _lane_grad_in(dy_ptr, z_ptr, row * DIM + offs_d, valid, HAS_Z)
                Cs = _lane_row_widen(_lane_row_load(C_ptr, row, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS),
                                     BF16_PAIRS)
                stepped = ()
                for n in tl.static_range(BLOCK_N):
                    stepped = stepped + (_lane_decay(dt, A2[n], reset, HAS_DOC) * (dyg * Cs[n] + carry[n]),)
                carry = stepped
                sdt += dt
                if HAS_DOC:
                    nreset += reset.to(tl.int32)
        else:
            h_in = _lane_load_state(ckpt_ptr, (pid_b.to(tl.int64) * n_ckpt + chunk) * DIM * N, offs_d, mask_d, N,
                                    BLOCK_N)
            h = h_in
            for s in tl.static_range(SPLIT):
                h = _lane_rebuild(h, s, chunk, row_b, row_last, t_end, A2, bias, g, offs_d, u_ptr, delta_ptr, B_ptr,
                                  doc_ptr, DIM, G, N, HAS_BIAS, SOFTPLUS, HAS_DOC, BLOCK_N, BC_VEC, EVEN_N,
                                  BF16_PAIRS)
            mid = h  # h at step SPLIT - 1
            hs = ()
            for s in tl.static_range(SPLIT, 8):
                h = _lane_rebuild(h, s, chunk, row_b, row_last, t_end, A2, bias, g, offs_d, u_ptr, delta_ptr, B_ptr,
                                  doc_ptr, DIM, G, N, HAS_BIAS, SOFTPLUS, HAS_DOC, BLOCK_N, BC_VEC, EVEN_N,
                                  BF16_PAIRS)
                hs = hs + (h,)
            carry, dA, dD_acc, dbias_acc = _lane_adjoint_steps(
                hs, SPLIT, carry, dA, dD_acc, dbias_acc, chunk, row_b, row_last, t_end, A2, Dskip, bias, g, lane,
                offs_d, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, ypre_ptr, du_ptr, ddelta_ptr, dz_ptr,
                dB_ptr, dC_ptr, DIM, G, N, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, HAS_YPRE, BLOCK_N, BC_VEC,
                EVEN_N, BF16_PAIRS, SHFL_ASM)
            if SPLIT > 0:  # steps 0 .. SPLIT - 1: rebuilt again from the checkpoint
                h = h_in
                hs = ()
                for s in tl.static_range(SPLIT - 1):
                    h = _lane_rebuild(h, s, chunk, row_b, row_last, t_end, A2, bias, g, offs_d, u_ptr, delta_ptr,
                                      B_ptr, doc_ptr, DIM, G, N, HAS_BIAS, SOFTPLUS, HAS_DOC, BLOCK_N, BC_VEC, EVEN_N,
                                      BF16_PAIRS)
                    hs = hs + (h,)
                hs = hs + (mid,)
                carry, dA, dD_acc, dbias_acc = _lane_adjoint_steps(
                    hs, 0, carry, dA, dD_acc, dbias_acc, chunk, row_b, row_last, t_end, A2, Dskip, bias, g, lane,
                    offs_d, u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, ypre_ptr, du_ptr, ddelta_ptr,
                    dz_ptr, dB_ptr, dC_ptr, DIM, G, N, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, HAS_YPRE, BLOCK_N,
                    BC_VEC, EVEN_N, BF16_PAIRS, SHFL_ASM)
    offs_n = tl.arange(0, BLOCK_N)
    dn = offs_d[:, None] * N + offs_n[None, :]
    mask_dn = mask_d[:, None] & (offs_n < N)[None, :]
    if CARRY_ONLY:
        seg = seg_base + pid_s.to(tl.int64) * DIM * N
        for n in tl.static_range(BLOCK_N):
            dec = tl.exp2(sdt * A2[n])
            if HAS_DOC:
                dec = tl.where(nreset > 0, 0.0, dec)
            tl.store(seg_a_ptr + seg + offs_d * N + n, dec, mask=mask_d & (offs_d * 0 + n < N))
            tl.store(seg_b_ptr + seg + offs_d * N + n, carry[n], mask=mask_d & (offs_d * 0 + n < N))
    else:
        part = pid_b.to(tl.int64) * n_seg + pid_s
        tl.store(dA_ptr + part * DIM * N + dn, _lane_tile(dA), mask=mask_dn)
        tl.store(dD_ptr + part * DIM + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + part * DIM + offs_d, dbias_acc, mask=mask_d)
        if pid_s == 0:
            tl.store(dinit_ptr + state_base + dn, _lane_tile(carry), mask=mask_dn)
