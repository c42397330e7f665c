"""Helpers of the selective scan's lane kernels, which keep one channel per lane: its N states as a tuple of N
(BLOCK_D,) vectors, one element per lane, so a step's sums over states run inside a thread with no shuffles.

The forward (selective_scan._scan_fwd_lane_kernel) and the backward (scan_lane_bwd) share these; the backward's sums
over channels (dB, dC) are a reduce-scatter over the warp's lanes (_lane_reduce_scatter).
"""

from __future__ import annotations

import triton
import triton.language as tl

from seqlab.ops.triton.jit_math import softplus

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _halve(p):
    """p (W,) or (R, W), W an even power of two -> (even, odd) elements along the last axis (W = 2: that axis
    dropped)."""
    if len(p.shape) == 1:
        if p.shape[0] > 2:
            p = tl.reshape(p, (p.shape[0] // 2, 2))
    elif p.shape[1] > 2:
        p = tl.reshape(p, (p.shape[0], p.shape[1] // 2, 2))
    return tl.split(p)


@triton.jit
def _last_axis_parts(x, W: tl.constexpr):
    """x (W,) or (R, W), W >= 2 a power of two -> tuple of its W slices along the last axis, in order."""
    parts = (x,)
    for _ in tl.static_range(6):
        if len(parts) < W:
            ev = ()
            od = ()
            for i in tl.static_range(len(parts)):
                e, o = _halve(parts[i])
                ev = ev + (e,)
                od = od + (o,)
            # parts[i] held the slices = i mod len(parts); evens first keeps them in order mod 2 len(parts)
            parts = ev + od
    return parts


@triton.jit
def _elements(x):
    """(W,), W a power of two -> tuple of its W elements in order (scalars; W = 1: (x,))."""
    parts = (x,)
    if x.shape[0] > 1:
        parts = _last_axis_parts(x, x.shape[0])
    return parts


@triton.jit
def _lane_row_load(ptr, row, g, G, N, BLOCK_N: tl.constexpr, VEC: tl.constexpr, EVEN_N: tl.constexpr,
                   BF16_PAIRS: tl.constexpr):
    """B or C (B, L, G, N) at flat row `row` (batch x L) and group g, as loaded: a tuple of the (VEC,) pieces (0 for
    n >= N) that every lane reads alike. BF16_PAIRS (bf16, N = BLOCK_N, a multiple of 8): (4,) int32 pieces, each
    word two bf16."""
    pieces = ()
    if BF16_PAIRS:
        base = ptr.to(tl.pointer_type(tl.int32), bitcast=True) + (row * G + g) * (BLOCK_N // 2)
        for k in tl.static_range(BLOCK_N // 8):
            pieces = pieces + (tl.load(base + k * 4 + tl.arange(0, 4)),)
    else:
        for k in tl.static_range(BLOCK_N // VEC):
            offs = k * VEC + tl.arange(0, VEC)
            if EVEN_N:
                pieces = pieces + (tl.load(ptr + (row * G + g) * N + offs),)
            else:
                pieces = pieces + (tl.load(ptr + (row * G + g) * N + offs, mask=offs < N, other=0.0),)
    return pieces


@triton.jit
def _lane_row_words(pieces):
    """_lane_row_load's pieces -> tuple of their scalar elements, as loaded (int32 words of two bf16 with
    BF16_PAIRS). Split where loaded, a row can be carried across loop iterations as scalars: carried as pieces, the
    compiler converts their layout through shared memory at every use."""
    words = ()
    for k in tl.static_range(len(pieces)):
        words = words + _elements(pieces[k])
    return words


@triton.jit
def _lane_words_widen(words, BF16_PAIRS: tl.constexpr):
    """_lane_row_words' scalars -> tuple of BLOCK_N float32 scalars. A bf16 pair's even element is the word's low
    half (word << 16), the odd one its high half (word & 0xffff0000): one integer op each."""
    vals = ()
    for i in tl.static_range(len(words)):
        if BF16_PAIRS:
            vals = vals + ((words[i] << 16).to(tl.float32, bitcast=True),
                           (words[i] & -65536).to(tl.float32, bitcast=True))
        else:
            vals = vals + (words[i].to(tl.float32),)
    return vals


@triton.jit
def _lane_row_widen(pieces, BF16_PAIRS: tl.constexpr):
    """_lane_row_load's pieces -> tuple of BLOCK_N float32 scalars (see _lane_words_widen)."""
    return _lane_words_widen(_lane_row_words(pieces), BF16_PAIRS)


@triton.jit
def _lane_load_state(ptr, base, offs_d, mask, N, BLOCK_N: tl.constexpr):
    """(BLOCK_D, N) float32 rows at ptr + base as a tuple of BLOCK_N (BLOCK_D,) vectors (0 where n >= N)."""
    return _lane_load_states(ptr, base, offs_d, offs_d * 0, mask, N, BLOCK_N, False)


@triton.jit
def _lane_load_states(ptr, base, offs_d, n0, mask, N, COUNT: tl.constexpr, AGAIN: tl.constexpr):
    """States n0 + k, k < COUNT, of each lane's channel from (D, N) float32 rows at ptr + base: a tuple of COUNT
    (BD,) vectors (0 where n >= N); n0 (BD,) is the lane's first state (0, or its part's with several lanes per
    channel). AGAIN: a second read of rows read before, with another eviction hint so the compiler keeps the two
    apart (see _lane_part_row)."""
    h = ()
    for k in tl.static_range(COUNT):
        if AGAIN:
            v = tl.load(ptr + base + offs_d * N + n0 + k, mask=mask & (n0 + k < N), other=0.0,
                        eviction_policy="evict_last")
        else:
            v = tl.load(ptr + base + offs_d * N + n0 + k, mask=mask & (n0 + k < N), other=0.0)
        h = h + (v.to(tl.float32),)
    return h


@triton.jit
def _lane_store_states(ptr, base, h, offs_d, n0, mask, N):
    """The inverse of _lane_load_states: h[k] to state n0 + k of each lane's channel (where n0 + k < N)."""
    for k in tl.static_range(len(h)):
        tl.store(ptr + base + offs_d * N + n0 + k, h[k], mask=mask & (n0 + k < N))


@triton.jit
def _lane_columns(x):
    """(R, W) tile, W a power of two, each row in one thread -> tuple of its W (R,) columns in order."""
    if x.shape[1] == 1:
        cols = (tl.reshape(x, (x.shape[0],)),)
    else:
        cols = _last_axis_parts(x, x.shape[1])
    return cols


@triton.jit
def _lane_part_row(ptr, row, g, G, N, n0, COUNT: tl.constexpr, VEC: tl.constexpr, EVEN_N: tl.constexpr,
                   AGAIN: tl.constexpr):
    """Float32 B or C (B, L, G, N) at flat row `row` and group g, states n0 .. n0 + COUNT - 1 of each lane (n0 (BD,)
    its part's first state): a tuple of COUNT (BD,) vectors, read VEC at a time (0 for n >= N). AGAIN: a second read
    of a row read before, with another eviction hint so the compiler does not merge the two (which would keep the
    first read's values live in registers until the second's use)."""
    vals = ()
    for k in tl.static_range(COUNT // VEC):
        n = n0[:, None] + (k * VEC + tl.arange(0, VEC))[None, :]
        if EVEN_N:
            if AGAIN:
                tile = tl.load(ptr + (row * G + g) * N + n, eviction_policy="evict_last")
            else:
                tile = tl.load(ptr + (row * G + g) * N + n)
        elif AGAIN:
            tile = tl.load(ptr + (row * G + g) * N + n, mask=n < N, other=0.0, eviction_policy="evict_last")
        else:
            tile = tl.load(ptr + (row * G + g) * N + n, mask=n < N, other=0.0)
        vals = vals + _lane_columns(tile)
    return vals


@triton.jit
def _lane_tile(h):
    """Tuple of BLOCK_N (BLOCK_D,) vectors -> (BLOCK_D, BLOCK_N) tile, each row in one lane's registers."""
    parts = h
    for _ in tl.static_range(6):
        if len(parts) > 1:
            nxt = ()
            for k in tl.static_range(len(parts) // 2):
                nxt = nxt + (tl.join(parts[k], parts[k + len(parts) // 2]),)  # new last axis: the high bit of n
            parts = nxt
    x = parts[0]
    if len(h) == 1:
        x = x[:, None]
    return tl.reshape(x, (x.shape[0], len(h)))


@triton.jit
def _lane_step(h, A2, dt, dtu, Bs, Cs, reset, HAS_DOC: tl.constexpr, WANT_Y: tl.constexpr):
    """h_{t-1} -> h_t for the tuple of N (BD,) state vectors; dt, dtu, reset (BD,); B, C tuples of scalars.
    Returns h_t and y_t = <h_t, C_t> (BD,) (zeros without WANT_Y)."""
    new = ()
    y0 = tl.zeros_like(dt)
    y1 = tl.zeros_like(dt)
    for n in tl.static_range(len(h)):
        a = tl.exp2(dt * A2[n])
        if HAS_DOC:
            a = tl.where(reset, 0.0, a)
        hn = a * h[n] + dtu * Bs[n]
        new = new + (hn,)
        if WANT_Y:
            if n % 2 == 0:  # two partial sums halve the dependent FMA chain
                y0 += hn * Cs[n]
            else:
                y1 += hn * Cs[n]
    return new, y0 + y1


@triton.jit
def _lane_load_steps(ptr, row0, row_last, DIM, offs_d, CLAMP: tl.constexpr):
    """Eight (BD,) rows row0 .. row0 + 7 of a (B, L, D) tensor, raw dtype; CLAMP: rows past row_last read row_last."""
    vals = ()
    for s in tl.static_range(8):
        if CLAMP:
            vals = vals + (tl.load(ptr + tl.minimum(row0 + s, row_last) * DIM + offs_d),)
        else:
            vals = vals + (tl.load(ptr + (row0 + s) * DIM + offs_d),)
    return vals


@triton.jit
def _lane_xor(x, OFFSET: tl.constexpr, SHFL_ASM: tl.constexpr):
    """x (32,) float32, one element per lane of one warp -> the element held by lane ^ OFFSET. SHFL_ASM: one
    butterfly shuffle (PTX shfl.sync.bfly); otherwise a flip of the (32 / (2 OFFSET), 2, OFFSET) view, which the
    interpreter runs."""
    if SHFL_ASM:
        bits = tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 31, -1;", "=r,r,r",
                                         [x.to(tl.int32, bitcast=True), tl.full(x.shape, OFFSET, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.reshape(tl.flip(tl.reshape(x, (32 // (2 * OFFSET), 2, OFFSET)), 1), (32,))


@triton.jit
def _lane_reduce_scatter(vals, lane, SHFL_ASM: tl.constexpr, WIDTH: tl.constexpr):
    """vals: tuple of M (32,) vectors, M a power of two <= WIDTH, one element per lane; WIDTH (a power of two <= 32)
    lanes form a group. Returns (32,): lane i holds the sum over its group of vals[(i % WIDTH) M / WIDTH] (lanes of a
    group with equal (i % WIDTH) M / WIDTH hold the same sum).

    Each round pairs each lane with lane ^ o, o = WIDTH / 2, ..., 1: while more than one value is left, the lane
    with that bit set keeps the upper half of its values and sends the lower half, its partner the reverse, and
    each adds what it receives; so 31 shuffles in all for M = WIDTH = 32, against 5 per value (160) for a butterfly
    all-reduce of each."""
    for r in tl.static_range(5):
        if (16 >> r) < WIDTH:
            upper = (lane & (16 >> r)) != 0
            if len(vals) > 1:
                kept = ()
                for k in tl.static_range(len(vals) // 2):
                    lo = vals[k]
                    hi = vals[k + len(vals) // 2]
                    kept = kept + (tl.where(upper, hi, lo) + _lane_xor(tl.where(upper, lo, hi), 16 >> r, SHFL_ASM),)
                vals = kept
            else:
                vals = (vals[0] + _lane_xor(vals[0], 16 >> r, SHFL_ASM),)
    return vals[0]


@triton.jit
def _lane_scaled_A(A_ptr, offs_d, n0, mask_d, N, BLOCK_N: tl.constexpr, AGAIN: tl.constexpr):
    """A (D, N) float32, states n0 .. n0 + BLOCK_N - 1 of each lane's channel, as BLOCK_N (BLOCK_D,) vectors times
    log2(e) (the kernels take exp2). AGAIN: read a second time (see _lane_load_states)."""
    A2 = _lane_load_states(A_ptr, 0, offs_d, n0, mask_d, N, BLOCK_N, AGAIN)
    scaled = ()
    for n in tl.static_range(BLOCK_N):
        scaled = scaled + (A2[n] * LOG2E,)
    return scaled


@triton.jit
def _lane_zeros(BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """BLOCK_N float32 (BLOCK_D,) zero vectors."""
    zeros = ()
    for _n in tl.static_range(BLOCK_N):
        zeros = zeros + (tl.zeros((BLOCK_D,), dtype=tl.float32),)
    return zeros


@triton.jit
def _lane_fold(h, seg_a_ptr, seg_b_ptr, seg_base, first, count, step, DIM, N, offs_d, n0, mask_d):
    """h <- a_j h + b_j for j = first, first + step, ... (count segments); a_j, b_j (B, S, D, N) float32 rows of
    segment j at seg_base + j D N (the time split's states-only pass or carry-only pass); h holds each lane's states
    n0 .. n0 + len(h) - 1."""
    for i in range(count):
        off = seg_base + (first + i * step) * DIM * N
        sa = _lane_load_states(seg_a_ptr, off, offs_d, n0, mask_d, N, len(h), False)
        sb = _lane_load_states(seg_b_ptr, off, offs_d, n0, mask_d, N, len(h), False)
        folded = ()
        for n in tl.static_range(len(h)):
            folded = folded + (sa[n] * h[n] + sb[n],)
        h = folded
    return h


@triton.jit
def _lane_channel_params(D_ptr, bias_ptr, offs_d, mask_d, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The skip D and the dt bias of the block's channels, (BLOCK_D,) float32 (zeros where absent)."""
    Dskip = tl.zeros(offs_d.shape, dtype=tl.float32)
    if HAS_D:
        Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros(offs_d.shape, dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return Dskip, bias


@triton.jit
def _lane_dt(delta, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """A step's raw delta (as loaded) -> (delta + bias, dt = softplus of it, or it without SOFTPLUS), float32."""
    raw = delta.to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = softplus(raw)
    return raw, dt


@triton.jit
def _lane_store_segment(seg_a_ptr, seg_b_ptr, seg, sdt, gone, A2, h, offs_d, n0, mask_d, N):
    """A time segment's decay product exp(A sdt) (0 where `gone`: a document start in it, or a sum cut off) and its
    end state or carry h to the (B, S, D, N) rows at seg, states n0 + k of each lane's channel."""
    dec = ()
    for k in tl.static_range(len(h)):
        dec = dec + (tl.where(gone, 0.0, tl.exp2(sdt * A2[k])),)
    _lane_store_states(seg_a_ptr, seg, dec, offs_d, n0, mask_d, N)
    _lane_store_states(seg_b_ptr, seg, h, offs_d, n0, mask_d, N)
