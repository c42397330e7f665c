"""y = x Wᵀ (+ residual) for the few rows of a decode step: a weight-streaming GEMM in one launch.

At decode time x has one row per sequence (M <= 128) and the GEMM only has to stream W (N, K) from memory once.
Programs own a BLOCK_N slice of the outputs and, with split-K, a slice of K; all M rows are one tile, so W is read
exactly once. Each split-K program stores its partial sum in its own float32 workspace slot; the last program of
each output slice to arrive (a per-slice arrival counter) sums the slots in a fixed order, adds the residual,
writes the output and zeroes the counter again. The call stays one launch (it can be recorded in a CUDA graph)
and is deterministic: the same inputs give the same bits whichever program arrives last.

The workspaces are cached per (device, N, tiles, split) and shared by every call of that shape: calls must not
run concurrently on different streams.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2

# Kernel shape per call, overridable for benchmarks that sweep it; keys BLOCK_N, BLOCK_K, SPLIT_K, STAGES, WARPS.
TUNING: dict = {}
MAX_ROWS = 128


@triton.jit
def _small_batch_linear_kernel(x_ptr, w_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
                               M, N, K, K_PER_SPLIT,
                               sx_m, sx_k, sw_n, sw_k, sr_m, sr_n,
                               HAS_RES: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
                               UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + offs_m[:, None] * sx_m + offs_k[None, :] * sx_k, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k, mask=mask_n[:, None] & mask_k[None, :],
                     other=0.0)
        if UPCAST:  # the interpreter's dot on 16-bit inputs
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        if IEEE:
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
    mask_mn = mask_m[:, None] & mask_n[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    res_off = offs_m[:, None] * sr_m + offs_n[None, :] * sr_n
    if SPLIT_K == 1:
        _store_output(acc, out_ptr, res_ptr, out_off, res_off, mask_mn, HAS_RES)
    else:
        slot = M * N  # workspace (SPLIT_K, M, N): one slot per K slice
        tl.store(ws_ptr + pid_k * slot + out_off, acc, mask=mask_mn)
        arrived = tl.atomic_add(count_ptr + pid_n, 1)  # acq_rel: the store above is visible to the last arrival
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(SPLIT_K):  # a fixed order: deterministic sums
                total += tl.load(ws_ptr + k * slot + out_off, mask=mask_mn, other=0.0, cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)
            _store_output(total, out_ptr, res_ptr, out_off, res_off, mask_mn, HAS_RES)


@triton.jit
def _store_output(total, out_ptr, res_ptr, out_off, res_off, mask, HAS_RES: tl.constexpr):
    if HAS_RES:
        total += tl.load(res_ptr + res_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=mask)


_WORKSPACES: dict = {}


def _workspace(device: torch.device, n: int, tiles: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (split, MAX_ROWS, n) partial sums and int32 (tiles,) arrival counters (zero between calls)."""
    key = (device, n, tiles, split)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(split * MAX_ROWS * n, device=device, dtype=torch.float32),
                            torch.zeros(tiles, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


def default_config(m: int, n: int, k: int) -> dict:
    """Tile shape: enough programs to stream W over every SM (split K when the outputs are few)."""
    block_n = TUNING.get("BLOCK_N", 64)
    block_k = TUNING.get("BLOCK_K", 128)
    tiles = triton.cdiv(n, block_n)
    split = TUNING.get("SPLIT_K") or max(1, min(8, 256 // tiles, triton.cdiv(k, 4 * block_k)))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=TUNING.get("STAGES", 4),
                WARPS=TUNING.get("WARPS", 4))


def small_batch_linear_triton(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                              config: dict | None = None) -> torch.Tensor:
    """x (M, K) with M <= 128, weight (N, K), residual (M, N) or None -> x weightᵀ (+ residual), (M, N) in x.dtype.

    Products accumulate in float32 (tensor cores for 16-bit inputs; IEEE float32 for float32 inputs)."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"small_batch_linear_triton: x: expected at most {MAX_ROWS} rows, got {m}")
    cfg = config or default_config(m, n, k)
    block_k, split = cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty K slices
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    ws, counts = _workspace(x.device, n, tiles, split)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ieee = x.dtype == torch.float32
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _small_batch_linear_kernel[(tiles, split)](
        x, weight, residual, out, ws, counts, m, n, k, k_per_split, *x.stride(), *weight.stride(),
        *(residual.stride() if residual is not None else (0, 0)),
        HAS_RES=residual is not None, SPLIT_K=split, IEEE=ieee or interpreting, UPCAST=interpreting,
        BLOCK_M=max(16, next_pow2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, STAGES=cfg["STAGES"],
        num_warps=cfg["WARPS"])
    return out
