"""Bulk prefetch of byte ranges into the L2 cache (Hopper's ``cp.async.bulk.prefetch.L2``).

A decode step streams each weight once, at batch sizes where its small kernels are bound by latency rather than
bandwidth: HBM sits idle through most of them. A prefetch issued ahead of a GEMM fills L2 with its weight during
that idle time; the GEMM then reads L2. The instruction is a hint: it returns at once, the copy runs in the
background, and the launching kernel exits without waiting for it, so a launch costs only its own few
microseconds. Nothing is written; results cannot change.

Each program issues LANES prefetches of CHUNK bytes (one per thread), over up to four ranges (grid axis 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

CHUNK = 16384  # bytes per prefetch instruction (a multiple of 16)
LANES = 32  # prefetches per program: one warp, one per thread
MAX_RANGES = 4

_PREFETCH = tl.constexpr("{ .reg .pred p; setp.ne.u32 p, $3, 0; "
             "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }")
_PREFETCH_EVICT_LAST = tl.constexpr("{ .reg .pred p; .reg .b64 pol; setp.ne.u32 p, $3, 0; "
                        "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
                        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.u32 $0, 0; }")


@triton.jit
def _l2_prefetch_kernel(addr0, size0, addr1, size1, addr2, size2, addr3, size3,
                        CHUNK: tl.constexpr, LANES: tl.constexpr, EVICT_LAST: tl.constexpr):
    """addrK: int64 byte address (16-byte aligned), sizeK: int64 bytes (a multiple of 16) of range K."""
    which = tl.program_id(1)
    addr = tl.where(which == 0, addr0, tl.where(which == 1, addr1, tl.where(which == 2, addr2, addr3)))
    size = tl.where(which == 0, size0, tl.where(which == 1, size1, tl.where(which == 2, size2, size3)))
    offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * CHUNK  # (LANES,) byte offsets
    valid = offs < size
    nbytes = tl.minimum(size - offs, CHUNK).to(tl.int32)
    nbytes = tl.where(valid, nbytes, 16)
    args = [addr + offs, nbytes, valid.to(tl.int32)]
    if EVICT_LAST:
        tl.inline_asm_elementwise(_PREFETCH_EVICT_LAST, "=r,l,r,r", args, dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(_PREFETCH, "=r,l,r,r", args, dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch_triton(ranges: list[tuple[int, int]], evict_last: bool = False) -> None:
    """Prefetch up to MAX_RANGES (address, bytes) ranges (16-byte aligned starts, sizes multiples of 16) into L2,
    on the current CUDA device and stream."""
    if not ranges:
        return
    padded = list(ranges) + [(0, 0)] * (MAX_RANGES - len(ranges))
    programs = max(triton.cdiv(size, CHUNK * LANES) for _, size in ranges)
    args = [v for pair in padded for v in pair]
    _l2_prefetch_kernel[(programs, len(ranges))](*args, CHUNK=CHUNK, LANES=LANES, EVICT_LAST=evict_last,
                                                 num_warps=1)
