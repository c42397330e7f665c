"""End states (forward) and start carries (backward) of the selective scan's time segments, summed and cut off
where the remaining terms underflow.

When batch x channels leave too few programs, the chunk forward cuts time into S segments: a first pass computes
each segment's end state from a zero start and its decay product, the second folds them and runs the scan. Run
forward, the first pass costs an exp per state and step, as the second does. Written as a sum,

    h_end = sum_t exp(A c_t) dt_t u_t B_t,    c_t = dt_{t+1} + ... + dt_end,

(unrolling h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t from h = 0), the same terms can be added from the segment's end
backwards, and with dt >= 0 (softplus) and A <= 0 their weights only shrink as t goes back: once A c_t log2 e is
below CUTOFF for every state of a program, the pass stops there. At CUTOFF = -127 every earlier term is exactly zero
in float32 (exp2 below -126 is subnormal, flushed to zero by the compiled kernels' exp2); above it, the terms left
out add at most 2^CUTOFF x (steps left out) x max |dt u B| over those steps to the end state, e.g. at -64 and
segments of at most 2^17 steps < 2^-47 of the largest input term, far below float32's resolution of the kept ones
unless the inputs' scale varies by more than 2^23 within a segment. So with decaying states the first pass reads
only the last few hundred steps of each segment (at dt ~ 0.13 and |A| >= 1: ~700 at -127, ~350 at -64) instead of
all of it. With dt < 0
possible (no softplus), A > 0, or slow states, it runs the whole segment: as many exps as the forward pass. A
document start (seq_idx) at step t zeroes every earlier term, and the pass stops after it. The steps it skips are
not read: a NaN or inf there stays in its own segment's outputs, where a full pass would carry it into every later
segment.

The backward's carry-only pass is the mirror image (_scan_segment_carries_kernel): the adjoint carry at a segment's
start is a sum over its steps weighted by exp(A (dt_start + ... + dt_t)), added from the start forwards and cut off
the same way.

Outputs as the forward kernels' states-only pass: seg_a (B, S, D, N) = exp(A (dt sum of the segment)), 0 after a
document start or where it underflows; seg_b = h_end (the first segment's from the initial state, if any). One
channel per lane, the N states in its registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.scan_lanes import (
    _lane_dt,
    _lane_load_states,
    _lane_load_steps,
    _lane_row_load,
    _lane_row_words,
    _lane_scaled_A,
    _lane_store_segment,
    _lane_words_widen,
    _lane_zeros,
)


@triton.jit
def _step_rows(B_ptr, row0, row_last, g, G, N, BLOCK_N: tl.constexpr, VEC: tl.constexpr, EVEN_N: tl.constexpr,
               BF16_PAIRS: tl.constexpr, CLAMP: tl.constexpr):
    """B (or C) rows row0 .. row0 + 7, each a tuple of scalars as loaded (scan_lanes._lane_row_words); CLAMP: rows
    past row_last read row_last."""
    rows = ()
    for s in tl.static_range(8):
        row = row0 + s
        if CLAMP:
            row = tl.minimum(row, row_last)
        rows = rows + (_lane_row_words(_lane_row_load(B_ptr, row, g, G, N, BLOCK_N, VEC, EVEN_N, BF16_PAIRS)),)
    return rows


@triton.jit
def _slowest(A2, N, zero):
    """The slowest decay (largest A log2 e) of each lane's states; padded states (A = 0) are not counted."""
    a2_max = tl.full(zero.shape, -1e30, tl.float32)
    for n in tl.static_range(len(A2)):
        a2_max = tl.where(zero + n < N, tl.maximum(a2_max, A2[n]), a2_max)
    return a2_max


@triton.jit
def _add_decayed(acc, A2, c, cut, x, row, HAS_DOC: tl.constexpr):
    """One term of a segment sum: acc[n] + exp2(A2[n] c) x row[n] for every state n (acc, A2: tuples of (BLOCK_D,)
    vectors; row: scalars); the weight is 0 where `cut` (a document start passed)."""
    new = ()
    for n in tl.static_range(len(acc)):
        w = tl.exp2(A2[n] * c)
        if HAS_DOC:
            w = tl.where(cut, 0.0, w)
        new = new + (acc[n] + w * (x * row[n]),)
    return new


@triton.jit
def _segment_setup(A_ptr, bias_ptr, DIM, G, N, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """A program's channels (offs_d, mask_d, zero: offs_d * 0), A log2 e as BLOCK_N (BLOCK_D,) vectors, the slowest
    of them per lane, the B/C group and the dt bias; and zero states."""
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    zero = offs_d * 0
    A2 = _lane_scaled_A(A_ptr, offs_d, zero, mask_d, N, BLOCK_N, False)
    g = (tl.program_id(0) * BLOCK_D) // (DIM // G)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, mask_d, zero, A2, _slowest(A2, N, zero), g, bias, _lane_zeros(BLOCK_D, BLOCK_N)


@triton.jit
def _scan_segment_states_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, doc_ptr, init_ptr, seg_a_ptr, seg_b_ptr,
                                L, DIM, G, N, seg_len, n_seg,
                                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DOC: tl.constexpr,
                                HAS_INIT: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BC_VEC: tl.constexpr,
                                EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr, CUTOFF: tl.constexpr):
    """Grid (D / BLOCK_D, batch, n_seg - 1), one warp of BLOCK_D = 32 channels (BLOCK_D divides D / G): seg_a,
    seg_b of segment pid_s, whose steps [pid_s seg_len, (pid_s + 1) seg_len) are whole 8-step chunks of the row."""
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d, mask_d, zero, A2, a2_max, g, bias, h = _segment_setup(A_ptr, bias_ptr, DIM, G, N, HAS_BIAS, BLOCK_D,
                                                                  BLOCK_N)
    c = tl.zeros((BLOCK_D,), dtype=tl.float32)  # dt summed over the steps after the current one
    row_b = pid_b.to(tl.int64) * L
    c_first = pid_s * seg_len // 8
    chunk = (pid_s + 1) * seg_len // 8 - 1
    nu = _lane_load_steps(u_ptr, row_b + chunk * 8, row_b, DIM, offs_d, False)
    nd = _lane_load_steps(delta_ptr, row_b + chunk * 8, row_b, DIM, offs_d, False)
    nb = _step_rows(B_ptr, row_b + chunk * 8, row_b + L - 1, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS, False)
    cut = zero != 0  # a document start seen: every earlier term is zero
    live = chunk >= c_first
    while live:
        row0 = row_b + chunk * 8
        u8, d8, b8 = nu, nd, nb
        prev = tl.maximum(chunk - 1, c_first) * 8 + row_b  # the chunk before (re-read on the last: unused)
        nu = _lane_load_steps(u_ptr, prev, row_b, DIM, offs_d, False)
        nd = _lane_load_steps(delta_ptr, prev, row_b, DIM, offs_d, False)
        nb = _step_rows(B_ptr, prev, row_b + L - 1, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS, False)
        for s in tl.static_range(7, -1, -1):
            _, dt = _lane_dt(d8[s], bias, HAS_BIAS, SOFTPLUS)
            dtu = dt * u8[s].to(tl.float32)
            h = _add_decayed(h, A2, c, cut, dtu, _lane_words_widen(b8[s], BF16_PAIRS), HAS_DOC)
            c += dt
            if HAS_DOC:  # a document starting at this step: the terms before it are zero
                t = chunk * 8 + s
                doc = tl.load(doc_ptr + row0 + s + zero)
                before = tl.load(doc_ptr + row0 + s - 1 + zero, mask=zero + t > 0, other=0)
                cut = cut | (doc != before)  # at the segment's first step it zeroes only the decay
        chunk -= 1
        live = chunk >= c_first
        if SOFTPLUS:  # dt >= 0: weights only shrink going back; stop once all are zero
            live = live & (tl.max(a2_max * c) > CUTOFF)
        if HAS_DOC:
            live = live & (tl.min(cut.to(tl.int32)) == 0)
    gone = cut | (zero + chunk >= c_first)  # stopped early (underflow or a document start): no decay is left
    if HAS_INIT:
        h0 = _lane_load_states(init_ptr, pid_b.to(tl.int64) * DIM * N, offs_d, zero, mask_d & (zero + pid_s == 0), N,
                               BLOCK_N, False)
        carried = ()
        for n in tl.static_range(BLOCK_N):
            carried = carried + (h[n] + tl.where(gone, 0.0, tl.exp2(A2[n] * c)) * h0[n],)
        h = carried
    _lane_store_segment(seg_a_ptr, seg_b_ptr, pid_b.to(tl.int64) * n_seg * DIM * N + pid_s.to(tl.int64) * DIM * N, c,
                        gone, A2, h, offs_d, zero, mask_d, N)


@triton.jit
def _scan_segment_carries_kernel(delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, doc_ptr, dy_ptr, seg_a_ptr, seg_b_ptr,
                                 L, DIM, G, N, seg_len, n_seg,
                                 HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                                 HAS_DOC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BC_VEC: tl.constexpr, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr,
                                 WHOLE_CHUNKS: tl.constexpr, CUTOFF: tl.constexpr):
    """The backward's counterpart: the adjoint carry a segment passes to the one before it, from a zero carry at its
    end, carry = sum_t exp(A c_t) C_t dy_t z_t sigmoid(z_t) with c_t = dt_start + ... + dt_t, summed forwards from
    the segment's start and stopped where every later term underflows (or at a document start: a_t = 0 there).
    Grid (D / BLOCK_D, batch, n_seg - 1) for segments 1 .. n_seg - 1 (the last may end mid-chunk, at L). Writes
    seg_a = exp(A (dt sum of the segment)) (0 after a document start or where it underflows) and seg_b = carry, as
    the backward kernels' carry-only pass does. WHOLE_CHUNKS: L is a multiple of 8, so every segment is whole chunks
    (no clamped reads, no masked steps)."""
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2) + 1
    offs_d, mask_d, zero, A2, a2_max, g, bias, carry = _segment_setup(A_ptr, bias_ptr, DIM, G, N, HAS_BIAS, BLOCK_D,
                                                                      BLOCK_N)
    c = tl.zeros((BLOCK_D,), dtype=tl.float32)  # dt summed from the segment's start through the current step
    row_b = pid_b.to(tl.int64) * L
    row_last = row_b + L - 1
    t_end = tl.minimum((pid_s + 1) * seg_len, L)
    c_last = tl.cdiv(t_end, 8) - 1
    chunk = pid_s * seg_len // 8
    CLAMP: tl.constexpr = not WHOLE_CHUNKS
    nd = _lane_load_steps(delta_ptr, row_b + chunk * 8, row_last, DIM, offs_d, CLAMP)
    ny = _lane_load_steps(dy_ptr, row_b + chunk * 8, row_last, DIM, offs_d, CLAMP)
    nz = ny
    if HAS_Z:
        nz = _lane_load_steps(z_ptr, row_b + chunk * 8, row_last, DIM, offs_d, CLAMP)
    nc = _step_rows(C_ptr, row_b + chunk * 8, row_last, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS, CLAMP)
    cut = zero != 0  # a document start seen: its step and every later one add nothing
    live = chunk <= c_last
    while live:
        row0 = row_b + chunk * 8
        d8, y8, z8, c8 = nd, ny, nz, nc
        nxt = row_b + tl.minimum(chunk + 1, c_last) * 8  # the next chunk (re-read on the last: unused)
        nd = _lane_load_steps(delta_ptr, nxt, row_last, DIM, offs_d, CLAMP)
        ny = _lane_load_steps(dy_ptr, nxt, row_last, DIM, offs_d, CLAMP)
        nz = ny
        if HAS_Z:
            nz = _lane_load_steps(z_ptr, nxt, row_last, DIM, offs_d, CLAMP)
        nc = _step_rows(C_ptr, nxt, row_last, g, G, N, BLOCK_N, BC_VEC, EVEN_N, BF16_PAIRS, CLAMP)
        for s in tl.static_range(8):
            t = chunk * 8 + s
            valid = zero + t < t_end
            _, dt = _lane_dt(d8[s], bias, HAS_BIAS, SOFTPLUS)
            p = y8[s].to(tl.float32)
            if HAS_Z:
                zv = z8[s].to(tl.float32)
                p = p * zv * tl.sigmoid(zv)
            if not WHOLE_CHUNKS:
                dt = tl.where(valid, dt, 0.0)
                p = tl.where(valid, p, 0.0)
            c += dt
            if HAS_DOC:  # a document starting at this step: a_t = 0 cuts it and every later step off
                doc = tl.load(doc_ptr + row0 + s + zero, mask=valid, other=0)
                before = tl.load(doc_ptr + row0 + s - 1 + zero, mask=valid & (zero + t > 0), other=0)
                cut = cut | (valid & (doc != before))
            carry = _add_decayed(carry, A2, c, cut, p, _lane_words_widen(c8[s], BF16_PAIRS), HAS_DOC)
        chunk += 1
        live = chunk <= c_last
        if SOFTPLUS:  # dt >= 0: weights only shrink going on; stop once all are zero
            live = live & (tl.max(a2_max * c) > CUTOFF)
        if HAS_DOC:
            live = live & (tl.min(cut.to(tl.int32)) == 0)
    gone = cut | (zero + chunk <= c_last)  # stopped early: no decay is left
    _lane_store_segment(seg_a_ptr, seg_b_ptr, pid_b.to(tl.int64) * n_seg * DIM * N + pid_s.to(tl.int64) * DIM * N, c,
                        gone, A2, carry, offs_d, zero, mask_d, N)
