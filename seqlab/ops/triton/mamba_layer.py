"""A Mamba layer's whole decode step in one persistent launch (the math: seqlab.ops.mamba_layer).

One program per SM walks the step's seven phases; a grid-wide barrier separates phases whose inputs other programs
wrote. Each phase splits its work into items (a program takes items pid, pid + P, ...):

    0 norm    a batch row: xn = RMSNorm(h) (skipped without a pre-norm: phase 1 reads h)
    1 in      in_proj tile of BLOCK_N_IN columns: xz = xn W_inᵀ; x columns then take the conv step (state rolled
              in place) and silu, giving u; z columns are stored as they are
    2 x       x_proj split over K: partial (u W_xᵀ) of X_SPLIT slices of d_inner, BLOCK_N_X columns each
    3 x_sum   the X_SPLIT partials summed in a fixed order: dbc = [dt_low, B, C] (M, R + 2N)
    4 step    BLOCK_C channels: Δ = softplus(dt_low W_dtᵀ + b), the state update, y = (<h, C> + D u) silu(z)
    5 out     out_proj split over K: partial y W_outᵀ of OUT_SPLIT slices (OUT_SPLIT = 1: h + y W_outᵀ, done)
    6 out_sum h_out = h + the OUT_SPLIT partials, in a fixed order

The sums run in a fixed order (no atomics on data), so a launch is bit-for-bit repeatable. A barrier that waits too
long (the launch's programs not all resident, e.g. another kernel holding SMs) gives up and raises a flag; from
then on every launch sharing that barrier buffer writes NaN for its output, never a wrong number. With PERSISTENT = False
a launch runs the phases FIRST..LAST without barriers, one item per program: how the interpreter runs it (its
programs run one after another, so a barrier would wait forever) and how the GPU can run it phase by phase.
Every batch row lives in one tile of BLOCK_M rows (M <= BLOCK_M <= 128).
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.jit_math import softplus
from seqlab.ops.triton.l2_prefetch import _PREFETCH
from seqlab.ops.triton.small_batch_linear import _conv_step_epilogue

LOG2E = tl.constexpr(1.4426950408889634)
SPIN_LIMIT = tl.constexpr(1 << 20)  # polls before a barrier gives up (~1 s) and raises the failure flag


@triton.jit
def _grid_barrier(sync_ptr, nprog, generation):
    """Sense-reversing barrier over the launch's programs: sync[0] counts arrivals, sync[1] is the generation (read
    once per launch: ``generation`` is its value at this barrier's start), and the last to arrive resets the count
    and advances the generation; sync[2] is raised if a wait gave up. The counters end each barrier where they
    began, so one buffer serves every launch on a stream. Returns the next barrier's generation."""
    tl.debug_barrier()  # every thread of the program has issued its stores
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
        polls = 0
        while (seen == generation) & (polls < SPIN_LIMIT):
            seen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
            polls += 1
        if polls >= SPIN_LIMIT:
            tl.atomic_xchg(sync_ptr + 2, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return generation + 1


@triton.jit
def _prefetch(ptrs, nbytes, valid):
    """One bulk L2 prefetch (Hopper's cp.async.bulk.prefetch.L2) per element where ``valid``: ``nbytes`` from each
    of ``ptrs`` (16-byte aligned; nbytes a multiple of 16). A hint: returns at once, writes nothing."""
    addr = ptrs.to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise(_PREFETCH, "=r,l,r,r", [addr, tl.full(addr.shape, nbytes, tl.int32), valid.to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_weights(pid, nprog, w_in_ptr, wx_ptr, wdt_ptr, DM: tl.constexpr, DI: tl.constexpr, NX: tl.constexpr,
                      R: tl.constexpr, BLOCK_N_IN: tl.constexpr, X_SPLIT: tl.constexpr, BLOCK_N_X: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """At the launch's start: this program's in_proj rows, x_proj slices and dt_proj rows into L2, so that the
    phases after the norm find them there (phases 1, 2 and 4)."""
    size: tl.constexpr = w_in_ptr.dtype.element_ty.primitive_bitwidth // 8
    for item in range(pid, 2 * DI // BLOCK_N_IN, nprog):
        cols = item * BLOCK_N_IN + tl.arange(0, BLOCK_N_IN)
        _prefetch(w_in_ptr + cols * DM, DM * size, cols >= 0)
    TILES_X: tl.constexpr = (NX + BLOCK_N_X - 1) // BLOCK_N_X
    for item in range(pid, X_SPLIT * TILES_X, nprog):
        cols = (item % TILES_X) * BLOCK_N_X + tl.arange(0, BLOCK_N_X)
        _prefetch(wx_ptr + cols * DI + (item // TILES_X) * (DI // X_SPLIT), (DI // X_SPLIT) * size, cols < NX)
    for item in range(pid, DI // BLOCK_C, nprog):
        _prefetch(wdt_ptr + item * BLOCK_C * R + tl.arange(0, 1), BLOCK_C * R * size, tl.arange(0, 1) >= 0)


@triton.jit
def _prefetch_step_and_out(pid, nprog, ssm_ptr, w_out_ptr, M, DM: tl.constexpr, DI: tl.constexpr,
                           N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OUT_SPLIT: tl.constexpr,
                           BLOCK_N_OUT: tl.constexpr):
    """After in_proj: this program's state rows (phase 4) and out_proj slices (phase 5) into L2."""
    state_size: tl.constexpr = ssm_ptr.dtype.element_ty.primitive_bitwidth // 8
    size: tl.constexpr = w_out_ptr.dtype.element_ty.primitive_bitwidth // 8
    rows = tl.arange(0, BLOCK_M)
    for item in range(pid, DI // BLOCK_C, nprog):
        _prefetch(ssm_ptr + (rows * DI + item * BLOCK_C) * N, BLOCK_C * N * state_size, rows < M)
    TILES_OUT: tl.constexpr = DM // BLOCK_N_OUT
    for item in range(pid, OUT_SPLIT * TILES_OUT, nprog):
        cols = (item % TILES_OUT) * BLOCK_N_OUT + tl.arange(0, BLOCK_N_OUT)
        _prefetch(w_out_ptr + cols * DI + (item // TILES_OUT) * (DI // OUT_SPLIT), (DI // OUT_SPLIT) * size,
                  cols >= 0)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b in float32; DOT_PRECISION "upcast" (the interpreter's dot on 16-bit inputs) takes float32 copies."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _norm_row(m, h_ptr, nw_ptr, xn_ptr, eps, DM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Phase 0, row m: xn = h * rsqrt(mean(h²) + eps) * w_norm, rounded once to h's dtype (as RMSNorm rounds)."""
    sumsq = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, DM, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_ptr + m * DM + ks, mask=ks < DM, other=0.0).to(tl.float32)
        sumsq += x * x
    scale = tl.rsqrt(tl.sum(sumsq, axis=0) / DM + eps)
    for k0 in range(0, DM, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_ptr + m * DM + ks, mask=ks < DM, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + ks, mask=ks < DM, other=0.0).to(tl.float32)
        tl.store(xn_ptr + m * DM + ks, (x * scale * w).to(xn_ptr.dtype.element_ty), mask=ks < DM)


@triton.jit
def _in_proj_tile(item, x_ptr, w_in_ptr, conv_ptr, cw_ptr, cb_ptr, u_ptr, z_ptr, M,
                  DM: tl.constexpr, DI: tl.constexpr, W: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CONV_RUN: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Phase 1, columns [item * BLOCK_N, +BLOCK_N) of in_proj over the normed rows x (M, DM). x columns take the
    conv step (state rolled in place) and silu, giving u; z columns are stored as they are. CONV_RUN: (W - 1)
    BLOCK_N rounded up to a power of two."""
    rows = tl.arange(0, BLOCK_M)
    row_ok = (rows < M)[:, None]
    cols = item * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, DM, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * DM + ks[None, :], mask=row_ok, other=0.0, cache_modifier=".cg")
        w = tl.load(w_in_ptr + cols[None, :] * DM + ks[:, None])  # (BLOCK_K, BLOCK_N) of W_in (2 DI, DM)
        acc = _dot(x, w, acc, DOT_PRECISION)
    xz = acc.to(u_ptr.dtype.element_ty)  # in_proj's output, rounded as the unfused step rounds it
    at = rows[:, None] * DI + cols[None, :]
    if item * BLOCK_N < DI:  # the conv step and silu (the state rolled in place, read and written as whole runs)
        u = _conv_step_epilogue(xz, conv_ptr, cw_ptr, cb_ptr, DI, rows, rows < M, cols, item * BLOCK_N, W,
                                HAS_CONV_BIAS, CONV_RUN, True)
        tl.store(u_ptr + at, u, mask=row_ok)
    else:
        tl.store(z_ptr + at - DI, xz, mask=row_ok)


@triton.jit
def _split_k_part(item, x_ptr, w_ptr, part_ptr, h_ptr, out_ptr, M, failed,
                  K: tl.constexpr, NOUT: tl.constexpr, SPLIT: tl.constexpr, TILES: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  ADD_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Phases 2 and 5: item = (slice s of K, column tile t). x (M, K) @ W (NOUT, K)ᵀ over the slice into
    part[s] (BLOCK_M, NOUT) in float32; with SPLIT = 1 and ADD_RESIDUAL the tile is final: out = h + x Wᵀ (NaN where
    ``failed``)."""
    s = item // TILES
    cols = (item % TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    rows = tl.arange(0, BLOCK_M)
    row_ok = (rows < M)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K // SPLIT, BLOCK_K):
        ks = s * (K // SPLIT) + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok, other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=col_ok[None, :], other=0.0)
        acc = _dot(x, w, acc, DOT_PRECISION)
    if ADD_RESIDUAL:
        at = rows[:, None] * NOUT + cols[None, :]
        ok = row_ok & col_ok[None, :]
        acc += tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        acc = tl.where(failed != 0, float("nan"), acc)
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(part_ptr + s * (BLOCK_M * NOUT) + rows[:, None] * NOUT + cols[None, :], acc,
                 mask=col_ok[None, :])


@triton.jit
def _split_k_sum(item, part_ptr, h_ptr, out_ptr, M, failed, NOUT: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Phases 3 and 6: out = (h +) part[0] + ... + part[SPLIT-1] over BLOCK_E elements of the (M, NOUT) output
    (with the residual, NaN where ``failed``)."""
    e = item * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < M * NOUT
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(h_ptr + e, mask=ok, other=0.0).to(tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * (BLOCK_M * NOUT) + e, mask=ok, other=0.0, cache_modifier=".cg")
    if HAS_RESIDUAL:
        acc = tl.where(failed != 0, float("nan"), acc)
    tl.store(out_ptr + e, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _step_tile(item, dbc_ptr, u_ptr, z_ptr, wdt_ptr, bdt_ptr, alog_ptr, dskip_ptr, ssm_ptr, y_ptr, M,
               DI: tl.constexpr, N: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_R: tl.constexpr, ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Phase 4, channels [item * BLOCK_C, +BLOCK_C), ROWS batch rows at a time (Gu & Dao 2023, Alg. 2 at one
    position): Δ = softplus(dt_low W_dtᵀ + b) (the dt GEMM's output rounded as the unfused step rounds it),
    h = exp(Δ A) h + Δ u B, y = (<h, C> + D u) silu(z)."""
    ch = item * BLOCK_C + tl.arange(0, BLOCK_C)
    ns = tl.arange(0, N)
    rs = tl.arange(0, BLOCK_R)
    # A = -exp(A_log), scaled by log2 e for exp2
    a2 = -tl.exp(tl.load(alog_ptr + ch[:, None] * N + ns[None, :]).to(tl.float32)) * LOG2E  # (C, N)
    dskip = tl.load(dskip_ptr + ch).to(tl.float32)
    bias = tl.load(bdt_ptr + ch).to(tl.float32)
    wdt = tl.load(wdt_ptr + ch[None, :] * R + rs[:, None], mask=(rs < R)[:, None], other=0.0)  # (R, C)
    NX: tl.constexpr = R + 2 * N
    for m0 in range(0, BLOCK_M, ROWS):
        rows = m0 + tl.arange(0, ROWS)
        row_ok = (rows < M)[:, None]
        at = rows[:, None] * DI + ch[None, :]
        # every load first (the state, the largest, before all): they overlap instead of waiting on the dt GEMM
        sp = ssm_ptr + at[:, :, None] * N + ns[None, None, :]
        ok3 = row_ok[:, :, None]
        h = tl.load(sp, mask=ok3, other=0.0)
        low = tl.load(dbc_ptr + rows[:, None] * NX + rs[None, :], mask=row_ok & (rs < R)[None, :], other=0.0,
                      cache_modifier=".cg")
        u = tl.load(u_ptr + at, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        z = tl.load(z_ptr + at, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        Bm = tl.load(dbc_ptr + rows[:, None] * NX + R + ns[None, :], mask=row_ok, other=0.0,
                     cache_modifier=".cg").to(tl.float32)
        Cm = tl.load(dbc_ptr + rows[:, None] * NX + R + N + ns[None, :], mask=row_ok, other=0.0,
                     cache_modifier=".cg").to(tl.float32)
        dt = _dot(low, wdt, None, DOT_PRECISION).to(y_ptr.dtype.element_ty).to(tl.float32)
        delta = softplus(dt + bias[None, :])  # (ROWS, C)
        h = tl.exp2(delta[:, :, None] * a2[None, :, :]) * h.to(tl.float32) + (delta * u)[:, :, None] * Bm[:, None, :]
        tl.store(sp, h.to(ssm_ptr.dtype.element_ty), mask=ok3)
        y = tl.sum(h * Cm[:, None, :], axis=2) + dskip[None, :] * u
        y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def mamba_layer_step_kernel(
    h_ptr, nw_ptr, w_in_ptr, conv_ptr, cw_ptr, cb_ptr, wx_ptr, wdt_ptr, bdt_ptr, alog_ptr, dskip_ptr, ssm_ptr,
    w_out_ptr, out_ptr, xn_ptr, u_ptr, z_ptr, xpart_ptr, dbc_ptr, y_ptr, opart_ptr, sync_ptr, M, eps,
    DM: tl.constexpr, DI: tl.constexpr, N: tl.constexpr, R: tl.constexpr, W: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N_IN: tl.constexpr, BLOCK_K_IN: tl.constexpr,
    X_SPLIT: tl.constexpr, BLOCK_N_X: tl.constexpr, BLOCK_K_X: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, ROWS: tl.constexpr, OUT_SPLIT: tl.constexpr, BLOCK_N_OUT: tl.constexpr,
    BLOCK_K_OUT: tl.constexpr, BLOCK_E: tl.constexpr, CONV_RUN: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, PERSISTENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    """Phases FIRST..LAST (0 norm, 1 in, 2 x, 3 x_sum, 4 step, 5 out, 6 out_sum) of one layer's step; PERSISTENT:
    every program walks every phase's items with grid barriers between phases, else one item per program."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NX: tl.constexpr = R + 2 * N
    TILES_X: tl.constexpr = (NX + BLOCK_N_X - 1) // BLOCK_N_X
    TILES_OUT: tl.constexpr = DM // BLOCK_N_OUT
    generation = 0
    if PERSISTENT:  # no barrier of this launch can complete before every program has read it
        generation = tl.atomic_add(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
        if PREFETCH:
            _prefetch_weights(pid, nprog, w_in_ptr, wx_ptr, wdt_ptr, DM, DI, NX, R, BLOCK_N_IN, X_SPLIT, BLOCK_N_X,
                              BLOCK_C)
    if FIRST <= 0 and LAST >= 0:
        if PERSISTENT:
            for item in range(pid, M, nprog):
                _norm_row(item, h_ptr, nw_ptr, xn_ptr, eps, DM, BLOCK_D)
            if LAST >= 1:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _norm_row(pid, h_ptr, nw_ptr, xn_ptr, eps, DM, BLOCK_D)
    x_in = xn_ptr if HAS_NORM else h_ptr
    if FIRST <= 1 and LAST >= 1:
        if PERSISTENT:
            for item in range(pid, 2 * DI // BLOCK_N_IN, nprog):
                _in_proj_tile(item, x_in, w_in_ptr, conv_ptr, cw_ptr, cb_ptr, u_ptr, z_ptr, M, DM, DI, W,
                              HAS_CONV_BIAS, BLOCK_M, BLOCK_N_IN, BLOCK_K_IN, CONV_RUN, DOT_PRECISION)
            if PREFETCH:
                _prefetch_step_and_out(pid, nprog, ssm_ptr, w_out_ptr, M, DM, DI, N, BLOCK_M, BLOCK_C, OUT_SPLIT,
                                       BLOCK_N_OUT)
            if LAST >= 2:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _in_proj_tile(pid, x_in, w_in_ptr, conv_ptr, cw_ptr, cb_ptr, u_ptr, z_ptr, M, DM, DI, W,
                          HAS_CONV_BIAS, BLOCK_M, BLOCK_N_IN, BLOCK_K_IN, CONV_RUN, DOT_PRECISION)
    if FIRST <= 2 and LAST >= 2:
        if PERSISTENT:
            for item in range(pid, X_SPLIT * TILES_X, nprog):
                _split_k_part(item, u_ptr, wx_ptr, xpart_ptr, h_ptr, out_ptr, M, 0, DI, NX, X_SPLIT, TILES_X,
                              BLOCK_M, BLOCK_N_X, BLOCK_K_X, False, DOT_PRECISION)
            if LAST >= 3:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _split_k_part(pid, u_ptr, wx_ptr, xpart_ptr, h_ptr, out_ptr, M, 0, DI, NX, X_SPLIT, TILES_X,
                          BLOCK_M, BLOCK_N_X, BLOCK_K_X, False, DOT_PRECISION)
    if FIRST <= 3 and LAST >= 3:
        if PERSISTENT:
            for item in range(pid, (BLOCK_M * NX + BLOCK_E - 1) // BLOCK_E, nprog):
                _split_k_sum(item, xpart_ptr, h_ptr, dbc_ptr, BLOCK_M, 0, NX, X_SPLIT, BLOCK_M, BLOCK_E, False)
            if LAST >= 4:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _split_k_sum(pid, xpart_ptr, h_ptr, dbc_ptr, BLOCK_M, 0, NX, X_SPLIT, BLOCK_M, BLOCK_E, False)
    if FIRST <= 4 and LAST >= 4:
        if PERSISTENT:
            for item in range(pid, DI // BLOCK_C, nprog):
                _step_tile(item, dbc_ptr, u_ptr, z_ptr, wdt_ptr, bdt_ptr, alog_ptr, dskip_ptr, ssm_ptr, y_ptr, M,
                           DI, N, R, BLOCK_M, BLOCK_C, BLOCK_R, ROWS, DOT_PRECISION)
            if LAST >= 5:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _step_tile(pid, dbc_ptr, u_ptr, z_ptr, wdt_ptr, bdt_ptr, alog_ptr, dskip_ptr, ssm_ptr, y_ptr, M,
                       DI, N, R, BLOCK_M, BLOCK_C, BLOCK_R, ROWS, DOT_PRECISION)
    # a barrier of this stream that ever gave up (sync[2]) leaves its counters unreliable: the output is poisoned
    failed = tl.load(sync_ptr + 2, volatile=True)
    if FIRST <= 5 and LAST >= 5:
        if PERSISTENT:
            for item in range(pid, OUT_SPLIT * TILES_OUT, nprog):
                _split_k_part(item, y_ptr, w_out_ptr, opart_ptr, h_ptr, out_ptr, M, failed, DI, DM, OUT_SPLIT,
                              TILES_OUT, BLOCK_M, BLOCK_N_OUT, BLOCK_K_OUT, OUT_SPLIT == 1, DOT_PRECISION)
            if LAST >= 6:
                generation = _grid_barrier(sync_ptr, nprog, generation)
        else:
            _split_k_part(pid, y_ptr, w_out_ptr, opart_ptr, h_ptr, out_ptr, M, failed, DI, DM, OUT_SPLIT, TILES_OUT,
                          BLOCK_M, BLOCK_N_OUT, BLOCK_K_OUT, OUT_SPLIT == 1, DOT_PRECISION)
    if FIRST <= 6 and LAST >= 6:
        if PERSISTENT:
            for item in range(pid, (M * DM + BLOCK_E - 1) // BLOCK_E, nprog):
                _split_k_sum(item, opart_ptr, h_ptr, out_ptr, M, failed, DM, OUT_SPLIT, BLOCK_M, BLOCK_E, True)
        else:
            _split_k_sum(pid, opart_ptr, h_ptr, out_ptr, M, failed, DM, OUT_SPLIT, BLOCK_M, BLOCK_E, True)
