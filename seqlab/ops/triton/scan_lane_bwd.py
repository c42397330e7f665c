"""Backward of the selective scan with its channels on the lanes: the lane forward's partner (see selective_scan.py).

A program is one warp over one time segment (grid (D / CH, batch, segments), the chunk backward's arguments and
outputs). PARTS lanes share a channel, CH = 32 / PARTS channels per warp: lane l holds channel l % CH and its states
n0 .. n0 + N / PARTS - 1, n0 = (l // CH) N / PARTS, as float32 registers. So a step's sums over states
(dx = <dh, B>, <q, A>, y = <h, C>) run inside the thread, plus one exchange with lane ^ CH per sum when PARTS = 2;
the sums over channels (dB_t, dC_t) are one reduce-scatter of the per-lane contributions over the CH lanes holding
the same states (15 shuffles at N = 16 and PARTS = 2), after which each lane owns one (n, B or C) sum and adds it to
memory with one atomic. PARTS = 2 halves the state registers a lane needs (at N = 16: 8 rebuilt steps x 8 states
instead of x 16) but doubles the per-step work per state (each lane of a channel loads the step's inputs, takes the
softplus and stores the gradients); on an H200 it is the slower one (selective_scan.TUNING has the numbers).

Per 8-step chunk, in reverse: rebuild the states from the forward's checkpoint (keeping each step's dt, u and
delta), then the adjoint steps
    dh_t = C_t dy_t + a_{t+1} dh_{t+1},    q_t = dh_t (a_t h_{t-1}),    a_t h_{t-1} = h_t - dt_t u_t B_t
(the last identity is the step's own update, so only h_t is kept).
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.scan_lanes import (
    LN2,
    _lane_channel_params,
    _lane_dt,
    _lane_fold,
    _lane_load_states,
    _lane_part_row,
    _lane_reduce_scatter,
    _lane_scaled_A,
    _lane_step,
    _lane_store_segment,
    _lane_store_states,
    _lane_xor,
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
    raw, dt = _lane_dt(tl.load(delta_ptr + io), bias, HAS_BIAS, SOFTPLUS)
    dt = tl.where(valid, dt, 0.0)
    u = tl.load(u_ptr + io).to(tl.float32)
    reset = valid
    if HAS_DOC:  # every lane reads the step's document id
        doc = tl.load(doc_ptr + row + offs_d * 0, mask=valid, other=0)
        prev = tl.load(doc_ptr + row - 1 + offs_d * 0, mask=valid & (offs_d * 0 + t > 0), other=0)
        reset = doc != prev
    return raw, dt, u, reset, valid


@triton.jit
def _lane_adjoint(h, carry, dA, A2, dt, dtu, dyg, reset, Bs, Cs, HAS_DOC: tl.constexpr, WANT_Y: tl.constexpr):
    """Adjoint of one step over the lane's states. h: h_t, carry: a_{t+1} dh_{t+1}, dA: the running sum of dt q
    (tuples of (BD,)). Returns the carry a_t dh_t, dA, the lane's parts of <dh, B>, <q, A2>, <h_t, C> (zeros without
    WANT_Y), and its contributions dh dt u to dB_t and dy h_t to dC_t (tuples)."""
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
def _lane_part_sum(x, PARTS: tl.constexpr, SHFL_ASM: tl.constexpr):
    """(32,) per-lane parts of a channel's sum -> the sum, in every lane of the channel (PARTS = 1 or 2)."""
    if PARTS == 2:
        x = x + _lane_xor(x, 16, SHFL_ASM)
    return x


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
def _lane_chunk_adjoint(h_in, carry, dA, dD_acc, dbias_acc, chunk, row_b, row_last, t_end, A2, Dskip, bias, g, lane,
                        offs_d, n0, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, ypre_ptr,
                        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, DIM, G, N,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                        HAS_DOC: tl.constexpr, HAS_YPRE: tl.constexpr, NL: tl.constexpr, PARTS: tl.constexpr,
                        BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, SHFL_ASM: tl.constexpr):
    """One 8-step chunk from its checkpoint h_in: rebuild the states, then the adjoint steps 7 .. 0, storing du,
    d delta, dz of each step and adding its dB, dC (summed over the warp's channels) to memory. Returns carry, dA,
    dD, d bias."""
    CH: tl.constexpr = 32 // PARTS
    PER_SUM: tl.constexpr = CH // (2 * NL)  # lanes of a group holding the same (n, B or C) sum after the scatter
    j = (lane % CH) // PER_SUM
    n_sum = n0 + j % NL
    h = h_in
    hs = ()
    raws = ()
    dts = ()
    us = ()
    resets = ()
    for s in tl.static_range(8):
        t = chunk * 8 + s
        row = tl.minimum(row_b + t, row_last)
        raw, dt, u, reset, valid = _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d, DIM,
                                                HAS_BIAS, SOFTPLUS, HAS_DOC)
        Bs = _lane_part_row(B_ptr, row, g, G, N, n0, NL, BC_VEC, EVEN_N, False)
        h = _lane_step(h, A2, dt, dt * u, Bs, Bs, reset, HAS_DOC, False)[0]
        hs = hs + (h,)
        raws = raws + (raw,)
        dts = dts + (dt,)
        us = us + (u,)
        resets = resets + (reset,)
    # A read again: the adjoint's decays exp2(dt A2r) then differ from the rebuild's for the compiler, which
    # recomputes them instead of keeping all 8 rebuilt steps' decays live (64 registers at NL = 8)
    A2r = _lane_scaled_A(A_ptr, offs_d, n0, offs_d < DIM, N, NL, True)
    for k in tl.static_range(8):
        t = chunk * 8 + 7 - k
        row = tl.minimum(row_b + t, row_last)
        valid = offs_d * 0 + t < t_end
        dt = dts[7 - k]
        u = us[7 - k]
        io = row * DIM + offs_d
        dy, zv, sz, dyg = _lane_grad_in(dy_ptr, z_ptr, io, valid, HAS_Z)
        Bs = _lane_part_row(B_ptr, row, g, G, N, n0, NL, BC_VEC, EVEN_N, True)
        Cs = _lane_part_row(C_ptr, row, g, G, N, n0, NL, BC_VEC, EVEN_N, False)
        dtu = dt * u
        carry, dA, dx, qa, y, gB, gC = _lane_adjoint(hs[7 - k], carry, dA, A2r, dt, dtu, dyg, resets[7 - k], Bs, Cs,
                                                     HAS_DOC, HAS_Z and not HAS_YPRE)
        dx = _lane_part_sum(dx, PARTS, SHFL_ASM)
        qa = _lane_part_sum(qa, PARTS, SHFL_ASM)
        du = dx * dt
        if HAS_D:
            du += Dskip * dyg
        ddt = dx * u + qa * LN2  # d/d dt of exp(dt A) h = A a h, with A = A2 ln 2
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raws[7 - k])
        ddt = tl.where(valid, ddt, 0.0)
        dbias_acc += ddt
        dD_acc += dyg * u
        tl.store(du_ptr + io, du.to(du_ptr.dtype.element_ty), mask=valid)
        tl.store(ddelta_ptr + io, ddt.to(ddelta_ptr.dtype.element_ty), mask=valid)
        if HAS_Z:
            if HAS_YPRE:
                y = tl.load(ypre_ptr + io, mask=valid, other=0.0).to(tl.float32)
            else:
                y = _lane_part_sum(y, PARTS, SHFL_ASM)
                if HAS_D:
                    y += Dskip * u
            dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
            tl.store(dz_ptr + io, dz.to(dz_ptr.dtype.element_ty), mask=valid)
        sums = _lane_reduce_scatter(gB + gC, lane, SHFL_ASM, CH)  # lane: sum of value j over its CH lanes
        bc = (row * G + g) * N + n_sum
        target = tl.where(j < NL, dB_ptr + bc, dC_ptr + bc)
        tl.atomic_add(target, sums, mask=valid & (lane % PER_SUM == 0) & (n_sum < N), sem="relaxed")
    return carry, dA, dD_acc, dbias_acc


@triton.jit
def _lane_chunk_carry(carry, sdt, nreset, chunk, row_b, row_last, t_end, A2, bias, g, offs_d, n0,
                      u_ptr, delta_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, DIM, G, N,
                      HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                      NL: tl.constexpr, BC_VEC: tl.constexpr, EVEN_N: tl.constexpr):
    """The carry-only pass over one chunk: carry <- a_t (C_t dy_t + carry) for t = 7 .. 0, and the segment's sum of
    dt and count of document starts."""
    for k in tl.static_range(8):
        t = chunk * 8 + 7 - k
        row = tl.minimum(row_b + t, row_last)
        raw, dt, u, reset, valid = _lane_inputs(u_ptr, delta_ptr, doc_ptr, bias, row, t, t_end, offs_d, DIM,
                                                HAS_BIAS, SOFTPLUS, HAS_DOC)
        dy, zv, sz, dyg = _lane_grad_in(dy_ptr, z_ptr, row * DIM + offs_d, valid, HAS_Z)
        Cs = _lane_part_row(C_ptr, row, g, G, N, n0, NL, BC_VEC, EVEN_N, False)
        stepped = ()
        for n in tl.static_range(NL):
            stepped = stepped + (_lane_decay(dt, A2[n], reset, HAS_DOC) * (dyg * Cs[n] + carry[n]),)
        carry = stepped
        sdt += dt
        if HAS_DOC:
            nreset += reset.to(tl.int32)
    return carry, sdt, nreset


@triton.jit
def _scan_bwd_lane_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, doc_ptr, ckpt_ptr,
                          dy_ptr, dfinal_ptr, seg_a_ptr, seg_b_ptr, ypre_ptr,
                          du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dinit_ptr,
                          L, DIM, G, N, n_ckpt, seg_len, n_seg, seg_first,
                          HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                          HAS_DFINAL: tl.constexpr, HAS_DOC: tl.constexpr, CARRY_ONLY: tl.constexpr,
                          HAS_YPRE: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr,
                          BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, SHFL_ASM: tl.constexpr):
    """Same grid, arguments and outputs as selective_scan._scan_bwd_chunk_kernel, with 32 / PARTS channels on one
    warp (they divide D / G), PARTS lanes per channel (1 or 2; BLOCK_N / PARTS >= 2 states each at PARTS = 2) and
    BLOCK_N <= 16. B and C are float32. CARRY_ONLY: from a zero carry, the segment's adjoint carry at its start
    (seg_b) and decay product (seg_a). BC_VEC: B/C elements per load; EVEN_N: N == BLOCK_N."""
    CH: tl.constexpr = 32 // PARTS
    NL: tl.constexpr = BLOCK_N // PARTS
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2) + seg_first
    lane = tl.arange(0, 32)
    offs_d = pid_d * CH + lane % CH
    n0 = (lane // CH) * NL
    mask_d = offs_d < DIM
    A2 = _lane_scaled_A(A_ptr, offs_d, n0, mask_d, N, NL, False)
    g = (pid_d * CH) // (DIM // G)
    state_base = pid_b.to(tl.int64) * DIM * N
    seg_base = pid_b.to(tl.int64) * n_seg * DIM * N
    carry = _lane_zeros(32, NL)
    dA = _lane_zeros(32, NL)
    if not CARRY_ONLY:
        if HAS_DFINAL:
            carry = _lane_load_states(dfinal_ptr, state_base, offs_d, n0, mask_d, N, NL, False)
        # the later segments, last first: carry <- a_j carry + b_j
        carry = _lane_fold(carry, seg_a_ptr, seg_b_ptr, seg_base, n_seg - 1, n_seg - 1 - pid_s, -1, DIM, N, offs_d,
                           n0, mask_d)
    Dskip, bias = _lane_channel_params(D_ptr, bias_ptr, offs_d, mask_d, HAS_D, HAS_BIAS)
    dD_acc = tl.zeros((32,), dtype=tl.float32)
    dbias_acc = tl.zeros((32,), dtype=tl.float32)
    sdt = tl.zeros((32,), dtype=tl.float32)
    nreset = tl.zeros((32,), dtype=tl.int32)
    t_begin = pid_s * seg_len
    t_end = tl.minimum(t_begin + seg_len, L)
    c_begin = t_begin // 8
    c_last = tl.cdiv(t_end, 8) - 1
    row_b = pid_b.to(tl.int64) * L
    row_last = row_b + L - 1
    for i in range(c_last + 1 - c_begin):
        chunk = c_last - i
        if CARRY_ONLY:
            carry, sdt, nreset = _lane_chunk_carry(carry, sdt, nreset, chunk, row_b, row_last, t_end, A2, bias, g,
                                                   offs_d, n0, u_ptr, delta_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, DIM,
                                                   G, N, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, NL, BC_VEC, EVEN_N)
        else:
            h_in = _lane_load_states(ckpt_ptr, (pid_b.to(tl.int64) * n_ckpt + chunk) * DIM * N, offs_d, n0, mask_d, N,
                                     NL, False)
            carry, dA, dD_acc, dbias_acc = _lane_chunk_adjoint(
                h_in, carry, dA, dD_acc, dbias_acc, chunk, row_b, row_last, t_end, A2, Dskip, bias, g, lane, offs_d,
                n0, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, z_ptr, doc_ptr, dy_ptr, ypre_ptr, du_ptr, ddelta_ptr, dz_ptr,
                dB_ptr, dC_ptr, DIM, G, N, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, HAS_YPRE, NL, PARTS, BC_VEC,
                EVEN_N, SHFL_ASM)
    if CARRY_ONLY:
        _lane_store_segment(seg_a_ptr, seg_b_ptr, seg_base + pid_s.to(tl.int64) * DIM * N, sdt, nreset > 0, A2,
                            carry, offs_d, n0, mask_d, N)
    else:
        part = pid_b.to(tl.int64) * n_seg + pid_s
        _lane_store_states(dA_ptr, part * DIM * N, dA, offs_d, n0, mask_d, N)
        first_part = lane < CH  # the channel sums are in every lane of the channel: one stores them
        tl.store(dD_ptr + part * DIM + offs_d, dD_acc, mask=mask_d & first_part)
        tl.store(dbias_ptr + part * DIM + offs_d, dbias_acc, mask=mask_d & first_part)
        if pid_s == 0:
            _lane_store_states(dinit_ptr, state_base, carry, offs_d, n0, mask_d, N)
