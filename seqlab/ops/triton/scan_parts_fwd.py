"""The selective scan's forward with several lanes per channel, for launches with too few channels to fill the GPU.

The lane forward (selective_scan._scan_fwd_lane_kernel) keeps one channel per lane with its N states in registers,
so a warp holds 32 channels; at batch 1 and d_inner 4096 that is 128 warps, one per SM, and time has to be cut into
segments whose end states a first pass computes: that pass evaluates an exp per state and step as the second does,
(2 - 1/S) times the exps of the scan. Here PARTS lanes (2, 4 or 8) share a channel, each with N / PARTS of its
states, so the same launch fills PARTS times the warps without running any state twice. The per-channel work of a
step (softplus of delta, the gate, the loads and the store) is not repeated on every lane of a channel: lane p of
a channel's group handles the steps p, p + PARTS, ... of each 8-step chunk, and passes dt and dt u of a step to
the group's other lanes with one shuffle each; the group's partial sums <h_t, C_t> of the chunk's 8 steps meet in
one reduce-scatter (7 shuffles at PARTS = 8), after which lane p holds y of its own steps.

Same grid, arguments and outputs as the lane forward (checkpoints (B, L / 8, D, N) float32, the time split's
states-only pass and fold), so either backward reads them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.scan_lanes import (
    _lane_columns,
    _lane_dt,
    _lane_fold,
    _lane_load_states,
    _lane_reduce_scatter,
    _lane_scaled_A,
    _lane_step,
    _lane_store_segment,
    _lane_store_states,
    _lane_xor,
)


@triton.jit
def _group_broadcast(x, SRC: tl.constexpr, PARTS: tl.constexpr, SHFL_ASM: tl.constexpr):
    """x (32,) float32, one element per lane -> every lane gets the element of lane SRC of its group of PARTS
    consecutive lanes. SHFL_ASM: one indexed shuffle within PARTS-lane segments (PTX shfl.sync.idx, segment mask
    32 - PARTS); otherwise a select over the (32 / PARTS, PARTS) view, which the interpreter runs."""
    if SHFL_ASM:
        bits = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, $3, -1;", "=r,r,r,r",
                                         [x.to(tl.int32, bitcast=True), tl.full(x.shape, SRC, tl.int32),
                                          tl.full(x.shape, ((32 - PARTS) << 8) | 31, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        view = tl.reshape(x, (32 // PARTS, PARTS))
        picked = tl.sum(tl.where(tl.arange(0, PARTS)[None, :] == SRC, view, 0.0), axis=1)
        return tl.reshape(tl.broadcast_to(picked[:, None], (32 // PARTS, PARTS)), (32,))


@triton.jit
def _group_sum(x, PARTS: tl.constexpr, SHFL_ASM: tl.constexpr):
    """x (32,) float32 -> on every lane, the sum of x over its group of PARTS consecutive lanes."""
    for r in tl.static_range(3):
        if (PARTS >> (r + 1)) > 0:
            x = x + _lane_xor(x, PARTS >> (r + 1), SHFL_ASM)
    return x


@triton.jit
def _parts_own_rows(lane_ptr, row0, row_last, part, DIM: tl.constexpr, J: tl.constexpr, PARTS: tl.constexpr,
                    CLAMP: tl.constexpr):
    """A lane's own steps of the chunk starting at row0 of a (B, L, D) tensor, lane_ptr pointing at its channel of
    row 0: J raw (32,) values, step j PARTS + part. Without CLAMP the rows are one base and constant offsets;
    CLAMP: rows past row_last read row_last."""
    vals = ()
    base = lane_ptr + row0 * DIM
    for j in tl.static_range(J):
        if CLAMP:
            vals = vals + (tl.load(lane_ptr + tl.minimum(row0 + j * PARTS + part, row_last) * DIM),)
        else:
            vals = vals + (tl.load(base + (j * PARTS * DIM) + part * DIM),)
    return vals


@triton.jit
def _parts_bc_rows(B_lane, C_lane, row0, row_last, GN: tl.constexpr, K: tl.constexpr, STATES_ONLY: tl.constexpr,
                   CLAMP: tl.constexpr):
    """Float32 B and C of the 8 steps of the chunk starting at row0, a lane's K states (B_lane, C_lane: its first
    state of row 0; rows GN elements apart), each row one (32, K) load: a tuple of 8 (B, C) pairs of K-tuples of
    (32,) vectors (C = B when STATES_ONLY)."""
    rows = ()
    offs_k = tl.arange(0, K)[None, :]
    for s in tl.static_range(8):
        if CLAMP:
            off = tl.minimum(row0 + s, row_last) * GN
        else:
            off = row0 * GN + s * GN
        Bs = _lane_columns(tl.load(B_lane[:, None] + off + offs_k))
        Cs = Bs
        if not STATES_ONLY:
            Cs = _lane_columns(tl.load(C_lane[:, None] + off + offs_k))
        rows = rows + ((Bs, Cs),)
    return rows


@triton.jit
def _parts_chunk(h, sdt, nreset, queue, chunk, row_b, row_last, t_end, A2, Dskip, bias, part, lane,
                 u_lane, delta_lane, z_lane, y_lane, ypre_lane, B_lane, C_lane, ckpt_lane, doc_ptr, pid_b, n_ckpt,
                 DIM: tl.constexpr, GN: tl.constexpr, N: tl.constexpr, state_mask,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                 HAS_DOC: tl.constexpr, STORE_CKPT: tl.constexpr, STORE_YPRE: tl.constexpr,
                 STATES_ONLY: tl.constexpr, PARTS: tl.constexpr, K: tl.constexpr, SHFL_ASM: tl.constexpr,
                 AHEAD: tl.constexpr, TAIL: tl.constexpr):
    """Steps 8 chunk .. 8 chunk + 7. queue: the inputs of this chunk and the AHEAD - 1 after it, as
    _parts_inputs loaded them; this loads those of chunk + AHEAD. The *_lane pointers point at the lane's channel
    (and first state) of row 0. Without TAIL the caller guarantees that this chunk lies in the segment and the
    AHEAD after it in the batch row. Returns h, sdt, nreset and the queue for the next chunk."""
    J: tl.constexpr = 8 // PARTS
    row0 = row_b + chunk * 8
    u_j, d_j, z_j, bc = queue[0]
    rest = ()
    for k in tl.static_range(1, AHEAD):
        rest = rest + (queue[k],)
    queue = rest + (_parts_inputs(u_lane, delta_lane, z_lane, B_lane, C_lane, row0 + 8 * AHEAD, row_last, part,
                                  DIM, GN, K, HAS_Z, STATES_ONLY, PARTS, TAIL),)
    if STORE_CKPT and not STATES_ONLY:
        base = ckpt_lane + (pid_b.to(tl.int64) * n_ckpt + chunk) * (DIM * N)
        for k in tl.static_range(K):
            tl.store(base + k, h[k], mask=state_mask[k])
    # the lane's own steps: dt and dt u, to be shared with the group
    dts = ()
    dtus = ()
    for j in tl.static_range(J):
        _, dt = _lane_dt(d_j[j], bias, HAS_BIAS, SOFTPLUS)
        if TAIL:
            dt = tl.where(chunk * 8 + j * PARTS + part < t_end, dt, 0.0)  # steps past the segment: the identity
        if STATES_ONLY:
            sdt += dt
        dts = dts + (dt,)
        dtus = dtus + (dt * u_j[j].to(tl.float32),)
    ys = ()
    for s in tl.static_range(8):
        dt = _group_broadcast(dts[s // PARTS], s % PARTS, PARTS, SHFL_ASM)
        dtu = _group_broadcast(dtus[s // PARTS], s % PARTS, PARTS, SHFL_ASM)
        reset = lane < 0  # read only with documents
        if HAS_DOC:  # every lane reads the step's document id
            t = chunk * 8 + s
            in_seg = lane * 0 + t < t_end
            row = tl.minimum(row0 + s, row_last)
            doc = tl.load(doc_ptr + row + lane * 0, mask=in_seg, other=0)
            prev = tl.load(doc_ptr + row - 1 + lane * 0, mask=in_seg & (lane * 0 + t > 0), other=0)
            reset = doc != prev
            if STATES_ONLY:  # each step counted once in the group, by the lane that owns it
                nreset += (reset & (part == s % PARTS)).to(tl.int32)
        h, y = _lane_step(h, A2, dt, dtu, bc[s][0], bc[s][1], reset, HAS_DOC, not STATES_ONLY)
        ys = ys + (y,)
    if not STATES_ONLY:
        for j in tl.static_range(J):
            group = ()
            for p in tl.static_range(PARTS):
                group = group + (ys[j * PARTS + p],)
            y = _lane_reduce_scatter(group, lane, SHFL_ASM, PARTS)  # lane p: y of step j PARTS + p
            if HAS_D:
                y += Dskip * u_j[j].to(tl.float32)
            t = chunk * 8 + j * PARTS + part
            if TAIL:
                off = tl.minimum(row0 + j * PARTS + part, row_last) * DIM
            else:
                off = row0 * DIM + (j * PARTS * DIM) + part * DIM
            if HAS_Z:
                if STORE_YPRE:
                    if TAIL:
                        tl.store(ypre_lane + off, y.to(ypre_lane.dtype.element_ty), mask=t < t_end)
                    else:
                        tl.store(ypre_lane + off, y.to(ypre_lane.dtype.element_ty))
                zv = z_j[j].to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            if TAIL:
                tl.store(y_lane + off, y.to(y_lane.dtype.element_ty), mask=t < t_end)
            else:
                tl.store(y_lane + off, y.to(y_lane.dtype.element_ty))
    return h, sdt, nreset, queue


@triton.jit
def _parts_inputs(u_lane, delta_lane, z_lane, B_lane, C_lane, row0, row_last, part, DIM: tl.constexpr,
                  GN: tl.constexpr, K: tl.constexpr, HAS_Z: tl.constexpr, STATES_ONLY: tl.constexpr,
                  PARTS: tl.constexpr, CLAMP: tl.constexpr):
    """What a chunk starting at row0 reads: the lane's own steps' raw u, delta, z and the 8 steps' B, C rows."""
    J: tl.constexpr = 8 // PARTS
    nu = _parts_own_rows(u_lane, row0, row_last, part, DIM, J, PARTS, CLAMP)
    nd = _parts_own_rows(delta_lane, row0, row_last, part, DIM, J, PARTS, CLAMP)
    nz = nu
    if HAS_Z and not STATES_ONLY:
        nz = _parts_own_rows(z_lane, row0, row_last, part, DIM, J, PARTS, CLAMP)
    return nu, nd, nz, _parts_bc_rows(B_lane, C_lane, row0, row_last, GN, K, STATES_ONLY, CLAMP)


@triton.jit
def _scan_fwd_parts_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, init_ptr, doc_ptr,
                           y_ptr, final_ptr, ckpt_ptr, seg_a_ptr, seg_b_ptr, ypre_ptr,
                           L, DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr, n_ckpt, seg_len, n_seg,
                           seg_first,
                           HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DOC: tl.constexpr,
                           STORE_CKPT: tl.constexpr, STORE_YPRE: tl.constexpr, STATES_ONLY: tl.constexpr,
                           PARTS: tl.constexpr, BLOCK_N: tl.constexpr, AHEAD: tl.constexpr,
                           SHFL_ASM: tl.constexpr):
    """Grid (D / (32 / PARTS), batch, segments from seg_first), one warp per program: 32 / PARTS channels, lane i
    holding states (i % PARTS) K .. (i % PARTS) K + K - 1 (K = BLOCK_N / PARTS) of channel i // PARTS of the block
    (32 / PARTS divides D / G). D, G and N are compile-time constants, so that a chunk's loads and stores are one
    base and constant offsets. B and C are float32 (B, L, G, BLOCK_N): the caller's copies, zero-padded to BLOCK_N
    states, so their loads need no masks and no widening. AHEAD (1 to 4): chunks whose inputs are in flight ahead
    of the one computed. Outputs as the lane forward's."""
    K: tl.constexpr = BLOCK_N // PARTS
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2) + seg_first
    lane = tl.arange(0, 32)
    part = lane % PARTS
    ch = pid_d * (32 // PARTS) + lane // PARTS
    n0 = part * K
    mask_d = ch < DIM
    state_mask = ()
    for k in tl.static_range(K):
        state_mask = state_mask + (mask_d & (n0 + k < N),)
    A2 = _lane_scaled_A(A_ptr, ch, n0, mask_d, N, K, False)
    g = (pid_d * (32 // PARTS)) // (DIM // G)
    state_base = pid_b.to(tl.int64) * DIM * N
    seg_base = pid_b.to(tl.int64) * n_seg * DIM * N
    if HAS_INIT:
        h = _lane_load_states(init_ptr, state_base, ch, n0, mask_d & (lane * 0 + pid_s == 0), N, K, False)
    else:
        h = ()
        for _k in tl.static_range(K):
            h = h + (tl.zeros((32,), dtype=tl.float32),)
    if not STATES_ONLY:  # fold the earlier segments: h <- a_k h + b_k
        h = _lane_fold(h, seg_a_ptr, seg_b_ptr, seg_base, 0, pid_s, 1, DIM, N, ch, n0, mask_d)
    Dskip = tl.zeros((32,), dtype=tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((32,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    B_lane = B_ptr + g * BLOCK_N + n0
    C_lane = C_ptr + g * BLOCK_N + n0
    ckpt_lane = ckpt_ptr + ch * N + n0
    z_lane = u_ptr + ch  # stand-ins where absent
    if HAS_Z:
        z_lane = z_ptr + ch
    ypre_lane = y_ptr + ch
    if STORE_YPRE:
        ypre_lane = ypre_ptr + ch
    t_begin = pid_s * seg_len
    t_end = tl.minimum(t_begin + seg_len, L)
    c_begin = t_begin // 8
    c_end = tl.cdiv(t_end, 8)
    # chunks before c_safe: full, and the AHEAD after each in the batch row
    c_safe = tl.maximum(tl.minimum(t_end // 8, L // 8 - AHEAD), c_begin)
    sdt = tl.zeros((32,), dtype=tl.float32)
    nreset = tl.zeros((32,), dtype=tl.int32)
    row_b = pid_b.to(tl.int64) * L
    row_last = row_b + L - 1
    queue = ()
    for k in tl.static_range(AHEAD):
        queue = queue + (_parts_inputs(u_ptr + ch, delta_ptr + ch, z_lane, B_lane, C_lane, row_b + t_begin + 8 * k,
                                       row_last, part, DIM, G * BLOCK_N, K, HAS_Z, STATES_ONLY, PARTS, True),)
    for chunk in range(c_begin, c_safe):
        h, sdt, nreset, queue = _parts_chunk(
            h, sdt, nreset, queue, chunk, row_b, row_last, t_end, A2, Dskip, bias, part, lane,
            u_ptr + ch, delta_ptr + ch, z_lane, y_ptr + ch, ypre_lane, B_lane, C_lane, ckpt_lane, doc_ptr, pid_b,
            n_ckpt, DIM, G * BLOCK_N, N, state_mask, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, STORE_CKPT,
            STORE_YPRE, STATES_ONLY, PARTS, K, SHFL_ASM, AHEAD, False)
    for chunk in range(c_safe, c_end):
        h, sdt, nreset, queue = _parts_chunk(
            h, sdt, nreset, queue, chunk, row_b, row_last, t_end, A2, Dskip, bias, part, lane,
            u_ptr + ch, delta_ptr + ch, z_lane, y_ptr + ch, ypre_lane, B_lane, C_lane, ckpt_lane, doc_ptr, pid_b,
            n_ckpt, DIM, G * BLOCK_N, N, state_mask, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_DOC, STORE_CKPT,
            STORE_YPRE, STATES_ONLY, PARTS, K, SHFL_ASM, AHEAD, True)
    if STATES_ONLY:
        sdt = _group_sum(sdt, PARTS, SHFL_ASM)  # each lane summed its own steps' dt
        if HAS_DOC:
            nreset = _group_sum(nreset.to(tl.float32), PARTS, SHFL_ASM).to(tl.int32)
        _lane_store_segment(seg_a_ptr, seg_b_ptr, seg_base + pid_s.to(tl.int64) * DIM * N, sdt, nreset > 0, A2, h,
                            ch, n0, mask_d, N)
    else:
        if pid_s == n_seg - 1:
            _lane_store_states(final_ptr, state_base, h, ch, n0, mask_d, N)
