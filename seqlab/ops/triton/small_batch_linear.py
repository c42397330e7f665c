"""y = rms_norm(x) Wᵀ (+ residual) for the few rows of a decode step: a weight-streaming GEMM in one launch.

At decode time x has one row per sequence (M <= 128) and the GEMM only has to stream W (N, K) from memory once.
Programs own a BLOCK_N slice of the outputs and, with split-K, a slice of K; all M rows are one tile, so W is read
exactly once. Each split-K program stores its partial sum in its own float32 workspace slot; the last program of
each output slice to arrive (a per-slice arrival counter, ``last_to_arrive``) sums the slots in a fixed order
(``sum_slots``), adds the residual, writes the output and zeroes the counter again. The call stays one launch (it
can be recorded in a CUDA graph) and is deterministic: the same inputs give the same bits whichever program
arrives last.

The optional RMSNorm of x (a pre-norm followed by an in-projection) is fused. Its row scale is per row, so it
commutes with the K-reduction:

    rms_norm(x) Wᵀ = diag(r) (x ⊙ g) Wᵀ,    r_m = 1 / sqrt(Σ_k x_mk² / K + eps),  g the norm weight (K,)

Each program multiplies its x tiles by g (float32, rounded to the input dtype for the tensor-core dot), sums x² in
float32 over its K slice, and the epilogue scales each row by r_m. With split-K the partial sums of squares sit in
the workspace beside the partial products and are added in the same fixed order.

With programmatic dependent launch (seqlab.ops.triton.PDL) a program loads its first W tile before waiting for the
previous kernel (which writes x), so the launch and the first weight fetch overlap that kernel's tail.

The workspaces are cached per (device, N, tiles, split) and shared by every call of that shape: calls must not
run concurrently on different streams.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from seqlab.ops.triton import next_pow2, pdl_launch, sm_count

# Kernel shape per call, overridable for benchmarks that sweep it; keys BLOCK_N, BLOCK_K, SPLIT_K, STAGES, WARPS.
# A non-empty TUNING also leaves candidate_configs with the one shape it describes.
TUNING: dict = {}
MAX_ROWS = 128


@triton.jit
def last_to_arrive(count_ptr, ARRIVALS: tl.constexpr):
    """True in the last of the ARRIVALS programs that call this on the int32 counter at ``count_ptr``; that program
    then sees every global store the others made before their call (read them with ``cache_modifier=".cg"``, e.g.
    through ``sum_slots``) and has reset the counter to 0 for the next launch.

    Triton performs a scalar atomic from one thread of the CTA, and its release orders only that thread's own
    stores: without the barrier before it, other warps' stores may not yet be visible when the last program
    reads them. The barrier after it keeps every warp's loads behind the acquire. (CUTLASS's semaphore does the
    same: __syncthreads, then one thread's release; one thread's acquire, then __syncthreads.)
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    last = arrived == ARRIVALS - 1
    if last:
        tl.store(count_ptr, 0)
    return last


@triton.jit
def sum_slots(ptr, offs, mask, SLOT, SLOTS: tl.constexpr):
    """Σ_{s < SLOTS} ptr[s * SLOT + offs] in float32, in slot order: the same bits whichever program sums.

    Loads with ``.cg`` (from L2): the slots were written by other CTAs, after ``last_to_arrive``."""
    total = tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for s in tl.static_range(1, SLOTS):
        total += tl.load(ptr + s * SLOT + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return total


@triton.jit
def _small_batch_linear_kernel(x_ptr, w_ptr, g_ptr, res_ptr, out_ptr, ws_ptr, count_ptr,
                               cs_ptr, cw_ptr, cb_ptr,
                               M, N, K, K_PER_SPLIT, CONV_DIM,
                               sx_m, sx_k, sw_n, sw_k, sg_k, sr_m, sr_n,
                               HAS_RES: tl.constexpr, NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr,
                               EPS: tl.constexpr, CONV_W: tl.constexpr, CONV_BIAS: tl.constexpr,
                               SPLIT_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               STAGES: tl.constexpr, PDL: tl.constexpr, CONV_RUN: tl.constexpr,
                               CONV_WHOLE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ_k x² over this K slice (NORM)
    k_loop = k_begin
    if PDL:  # the first W tile while the previous kernel finishes, then wait for its x (module docstring)
        offs_k = k_begin + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        wt = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k, mask=mask_n[:, None] & mask_k[None, :],
                     other=0.0)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        xt = tl.load(x_ptr + offs_m[:, None] * sx_m + offs_k[None, :] * sx_k, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        acc, sumsq = _accumulate(acc, sumsq, xt, wt, g_ptr, offs_k, mask_k, sg_k, NORM, NORM_WEIGHT, IEEE, UPCAST)
        k_loop = k_begin + BLOCK_K
    for k0 in tl.range(k_loop, k_end, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + offs_m[:, None] * sx_m + offs_k[None, :] * sx_k, mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0)
        wt = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k, mask=mask_n[:, None] & mask_k[None, :],
                     other=0.0)
        acc, sumsq = _accumulate(acc, sumsq, xt, wt, g_ptr, offs_k, mask_k, sg_k, NORM, NORM_WEIGHT, IEEE, UPCAST)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    out_off = offs_m[:, None] * N + offs_n[None, :]
    res_off = offs_m[:, None] * sr_m + offs_n[None, :] * sr_n
    if SPLIT_K == 1:
        _store_output(acc, sumsq, K, out_ptr, res_ptr, out_off, res_off, mask_mn, cs_ptr, cw_ptr, cb_ptr, CONV_DIM,
                      offs_m, mask_m, offs_n, pid_n * BLOCK_N, HAS_RES, NORM, EPS, CONV_W, CONV_BIAS, CONV_RUN,
                      CONV_WHOLE)
    else:
        # workspace: partial products (SPLIT_K, M, N), then partial sums of squares (SPLIT_K, tiles, M)
        slot = M * N
        sq_ptr = ws_ptr + SPLIT_K * slot
        sq_slot = tl.num_programs(0) * M
        tl.store(ws_ptr + pid_k * slot + out_off, acc, mask=mask_mn)
        if NORM:
            tl.store(sq_ptr + pid_k * sq_slot + pid_n * M + offs_m, sumsq, mask=mask_m)
        if last_to_arrive(count_ptr + pid_n, SPLIT_K):
            total = sum_slots(ws_ptr, out_off, mask_mn, slot, SPLIT_K)
            row_sumsq = sumsq
            if NORM:
                row_sumsq = sum_slots(sq_ptr, pid_n * M + offs_m, mask_m, sq_slot, SPLIT_K)
            _store_output(total, row_sumsq, K, out_ptr, res_ptr, out_off, res_off, mask_mn, cs_ptr, cw_ptr, cb_ptr,
                          CONV_DIM, offs_m, mask_m, offs_n, pid_n * BLOCK_N, HAS_RES, NORM, EPS, CONV_W, CONV_BIAS,
                          CONV_RUN, CONV_WHOLE)


@triton.jit
def _accumulate(acc, sumsq, xt, wt, g_ptr, offs_k, mask_k, sg_k, NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr,
                IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x' wᵀ for one K tile, x' = x (⊙ g) (NORM); sumsq += Σ_k x² over the tile (NORM)."""
    if NORM:
        xf = xt.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        if NORM_WEIGHT:
            g = tl.load(g_ptr + offs_k * sg_k, mask=mask_k, other=0.0).to(tl.float32)
            xt = (xf * g[None, :]).to(xt.dtype)
    if UPCAST:  # the interpreter's dot on 16-bit inputs
        xt, wt = xt.to(tl.float32), wt.to(tl.float32)
    if IEEE:
        acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
    else:
        acc += tl.dot(xt, tl.trans(wt))
    return acc, sumsq


@triton.jit
def _store_output(total, sumsq, K, out_ptr, res_ptr, out_off, res_off, mask, cs_ptr, cw_ptr, cb_ptr, CONV_DIM, offs_m,
                  mask_m, offs_n, n0, HAS_RES: tl.constexpr, NORM: tl.constexpr, EPS: tl.constexpr, CONV_W: tl.constexpr,
                  CONV_BIAS: tl.constexpr, CONV_RUN: tl.constexpr, CONV_WHOLE: tl.constexpr):
    if NORM:
        total = total * tl.math.rsqrt(sumsq / K + EPS)[:, None]
    if HAS_RES:
        total += tl.load(res_ptr + res_off, mask=mask, other=0.0).to(tl.float32)
    out = total.to(out_ptr.dtype.element_ty)
    if CONV_W > 0:
        out = _conv_step_epilogue(out, cs_ptr, cw_ptr, cb_ptr, CONV_DIM, offs_m, mask_m, offs_n, n0, CONV_W,
                                  CONV_BIAS, CONV_RUN, CONV_WHOLE)
    tl.store(out_ptr + out_off, out, mask=mask)


@triton.jit
def _conv_step_epilogue(out, cs_ptr, cw_ptr, cb_ptr, CONV_DIM, offs_m, mask_m, offs_n, n0, W: tl.constexpr,
                        HAS_BIAS: tl.constexpr, RUN: tl.constexpr, WHOLE: tl.constexpr):
    """Columns n < CONV_DIM of the (BLOCK_M, BLOCK_N) output tile through one step of the depthwise causal conv
    and SiLU: y = silu(b_n + Σ_{j<W-1} w_nj s_mnj + w_n,W-1 x_mn), state s (M, CONV_DIM, W-1) shifted left by one
    with x appended (x as rounded to the output dtype, as the unfused conv step reads it). The program that stores
    an output tile owns those (row, channel) states: no other program reads or writes them. n0: the tile's first
    column (offs_n[0]).

    Row m's states of the tile's channels n0 .. n0 + BLOCK_N - 1 are one contiguous run of (W - 1) BLOCK_N elements,
    read and written whole (RUN: that length rounded up to a power of two, masked) and picked apart with gathers:
    per-tap accesses of 2-byte elements at a (W - 1)-element stride filled the load/store queue (RESULTS.md §9)."""
    BLOCK_M: tl.constexpr = out.shape[0]
    BLOCK_N: tl.constexpr = out.shape[1]
    TAPS: tl.constexpr = W - 1
    is_conv = offs_n < CONV_DIM
    x = out.to(tl.float32)
    w_off = offs_n * W
    acc = x * tl.load(cw_ptr + w_off + TAPS, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(cb_ptr + offs_n, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    offs_r = tl.arange(0, RUN)
    run_off = (offs_m[:, None] * CONV_DIM + n0) * TAPS + offs_r[None, :]
    # whole runs (CONV_DIM a multiple of BLOCK_N: every tile all conv channels or none) load and store as vectors;
    # otherwise the tile holding the last conv channel masks channels inside a vector, so every access goes singly
    run_mask = mask_m[:, None] & ((offs_r < TAPS * BLOCK_N) & (offs_r * 0 + n0 < CONV_DIM))[None, :]
    if not WHOLE:
        run_mask = run_mask & (n0 + offs_r // TAPS < CONV_DIM)[None, :]
    run = tl.load(cs_ptr + run_off, mask=run_mask, other=0.0)  # (BLOCK_M, RUN)
    for j in tl.static_range(TAPS):
        tap = tl.gather(run, tl.broadcast_to((tl.arange(0, BLOCK_N) * TAPS + j)[None, :], (BLOCK_M, BLOCK_N)), 1)
        acc += tap.to(tl.float32) * tl.load(cw_ptr + w_off + j, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    # the new run: tap j of channel n is the old tap j + 1, the last tap x_n
    state_dtype = cs_ptr.dtype.element_ty
    older = tl.gather(run, tl.broadcast_to(tl.minimum(offs_r + 1, RUN - 1)[None, :], (BLOCK_M, RUN)), 1)
    newest = tl.gather(x.to(state_dtype), tl.broadcast_to(tl.minimum(offs_r // TAPS, BLOCK_N - 1)[None, :],
                                                          (BLOCK_M, RUN)), 1)
    tl.store(cs_ptr + run_off, tl.where((offs_r % TAPS == TAPS - 1)[None, :], newest, older), mask=run_mask)
    y = acc * tl.sigmoid(acc)
    return tl.where(is_conv[None, :], y.to(out.dtype), out)


_WORKSPACES: dict = {}


def _workspace(device: torch.device, n: int, tiles: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 partial products (split, MAX_ROWS, n) and sums of squares (split, tiles, MAX_ROWS) in one buffer,
    and int32 (tiles,) arrival counters (zero between calls)."""
    key = (device, n, tiles, split)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(split * MAX_ROWS * (n + tiles), device=device, dtype=torch.float32),
                            torch.zeros(tiles, device=device, dtype=torch.int32))
    return _WORKSPACES[key]


@contextlib.contextmanager
def transient_workspaces():
    """Workspaces first made inside the block are dropped at its end: for timing runs whose graphs no one replays
    later (the shape finally chosen makes its own on its next call)."""
    before = set(_WORKSPACES)
    try:
        yield
    finally:
        for key in set(_WORKSPACES) - before:
            del _WORKSPACES[key]


def _split(n: int, k: int, block_n: int, block_k: int) -> int:
    """Enough programs to stream W over every SM: split K when the output tiles are few."""
    return max(1, min(8, 256 // triton.cdiv(n, block_n), triton.cdiv(k, 4 * block_k)))


def default_config(m: int, n: int, k: int) -> dict:
    """The tile shape used without timing: BLOCK_N 64, BLOCK_K 128, split by ``_split`` (TUNING overrides)."""
    block_n = TUNING.get("BLOCK_N", 64)
    block_k = TUNING.get("BLOCK_K", 128)
    split = TUNING.get("SPLIT_K") or _split(n, k, block_n, block_k)
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=TUNING.get("STAGES", 4),
                WARPS=TUNING.get("WARPS", 4))


def candidate_configs(m: int, n: int, k: int) -> list[dict]:
    """A few tile shapes worth timing for one GEMM shape, the default first: narrower and wider output tiles (each
    with its own split), no split, twice the split, and 16 or 32 slices of K where the default leaves fewer
    programs than an H200 has SMs. Distinct after ``_effective_split``; only the default when TUNING is set."""
    base = default_config(m, n, k)
    if TUNING:
        return [base]
    variants = [
        base,
        {**base, "SPLIT_K": 1},
        {**base, "SPLIT_K": min(8, 2 * base["SPLIT_K"])},
        {**base, "BLOCK_N": 32, "SPLIT_K": _split(n, k, 32, 128)},
        {**base, "BLOCK_N": 128, "SPLIT_K": _split(n, k, 128, 128), "STAGES": 3, "WARPS": 8},
    ]
    # few output tiles (x_proj's N = dt_rank + 2 d_state): deeper splits put more SMs on the weight
    for block_n in (32, 64):
        tiles = triton.cdiv(n, block_n)
        variants += [{**base, "BLOCK_N": block_n, "BLOCK_K": 64, "SPLIT_K": split} for split in (16, 32)
                     if tiles * split <= 512 and triton.cdiv(k, 64) >= split and tiles * base["SPLIT_K"] < 132]
    # the same tiles with fewer pipeline stages where that fits every program on the GPU at once (one wave): with
    # 4 stages a (64 + 64) x 128 tile takes 128 KB of shared memory, one program per SM, and 256 programs run in
    # two waves
    variants += [cfg for cfg in (_one_wave(v, m, n, k) for v in variants[:1] + variants[4:5]) if cfg is not None]
    configs, seen = [], set()
    for cfg in variants:
        cfg = {**cfg, "SPLIT_K": _effective_split(k, cfg["BLOCK_K"], cfg["SPLIT_K"])}
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            configs.append(cfg)
    return configs


SHARED_BYTES_PER_SM = 220 * 1024  # sm_90 has 227 KB for CTAs; the rest is margin for the epilogue's scratch


def _one_wave(cfg: dict, m: int, n: int, k: int, element_bytes: int = 2) -> dict | None:
    """``cfg`` with the most pipeline stages (at least 2, fewer than its own) that let all its programs be resident
    at once, counting shared memory per stage (BLOCK_M + BLOCK_N) x BLOCK_K 16-bit elements; None if ``cfg``
    already runs in one wave or no such stage count exists."""
    block_m = max(16, next_pow2(m))
    per_stage = (block_m + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * element_bytes
    programs = triton.cdiv(n, cfg["BLOCK_N"]) * _effective_split(k, cfg["BLOCK_K"], cfg["SPLIT_K"])
    per_sm = triton.cdiv(programs, sm_count())
    if cfg["STAGES"] * per_stage * per_sm <= SHARED_BYTES_PER_SM:
        return None
    stages = min(cfg["STAGES"] - 1, SHARED_BYTES_PER_SM // (per_sm * per_stage))
    return {**cfg, "STAGES": stages} if stages >= 2 else None


def _k_slices(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(K per slice, slices) actually launched for a requested split: slices are whole BLOCK_Ks, none is empty."""
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def _effective_split(k: int, block_k: int, split: int) -> int:
    return _k_slices(k, block_k, split)[1]


def _check_conv(conv, m: int, n: int, residual) -> None:
    conv_state, conv_weight, conv_bias = conv
    channels, width = conv_weight.shape
    if not 2 <= width <= 4 or channels > n:
        raise ValueError(f"small_batch_linear_triton: conv: expected a (C, W) weight with 2 <= W <= 4 and C <= {n}, "
                         f"got shape {tuple(conv_weight.shape)}")
    if tuple(conv_state.shape) != (m, channels, width - 1) or not conv_state.is_contiguous():
        raise ValueError(f"small_batch_linear_triton: conv: expected a contiguous state of shape "
                         f"{(m, channels, width - 1)}, got {tuple(conv_state.shape)}")
    if not conv_weight.is_contiguous() or (conv_bias is not None and tuple(conv_bias.shape) != (channels,)):
        raise ValueError("small_batch_linear_triton: conv: expected a contiguous weight and a bias of shape "
                         f"({channels},) or None")
    if residual is not None:
        raise ValueError("small_batch_linear_triton: residual: not taken with conv")


def small_batch_linear_triton(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None,
                              config: dict | None = None, *, normalize: bool = False,
                              norm_weight: torch.Tensor | None = None, norm_eps: float = 1e-5,
                              conv: tuple | None = None) -> torch.Tensor:
    """x (M, K) with M <= 128, weight (N, K), residual (M, N) or None -> (M, N) in x.dtype:

        x Wᵀ (+ residual),  or with ``normalize``  rms_norm(x, norm_weight, norm_eps) Wᵀ (+ residual)

    ``norm_weight`` (K,) or None (the weightless norm). Products accumulate in float32 (tensor cores for 16-bit
    inputs; IEEE float32 for float32 inputs); the norm's statistics are float32. ``config``: a tile shape
    (``default_config``'s keys), None for the default. ``conv=(conv_state (M, C, W-1) contiguous, conv_weight
    (C, W) contiguous, conv_bias (C,) or None)`` with 2 <= W <= 4, C <= N: the first C output columns go through
    one step of the depthwise causal conv and SiLU (Mamba's conv after its in-projection), the state updated in
    place; no residual then."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"small_batch_linear_triton: x: expected at most {MAX_ROWS} rows, got {m}")
    if norm_weight is not None and not normalize:
        raise ValueError("small_batch_linear_triton: norm_weight: given without normalize=True")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"small_batch_linear_triton: norm_weight: expected shape ({k},), "
                         f"got {tuple(norm_weight.shape)}")
    if conv is not None:
        _check_conv(conv, m, n, residual)
    cfg = config or default_config(m, n, k)
    block_k = cfg["BLOCK_K"]
    k_per_split, split = _k_slices(k, block_k, cfg["SPLIT_K"])
    tiles = triton.cdiv(n, cfg["BLOCK_N"])
    ws, counts = _workspace(x.device, n, tiles, split)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    ieee = x.dtype == torch.float32
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    conv_state, conv_weight, conv_bias = conv if conv is not None else (None, None, None)
    pdl = pdl_launch(x)
    _small_batch_linear_kernel[(tiles, split)](
        x, weight, norm_weight, residual, out, ws, counts, conv_state, conv_weight, conv_bias,
        m, n, k, k_per_split, conv_state.shape[1] if conv is not None else 0, *x.stride(), *weight.stride(),
        norm_weight.stride(0) if norm_weight is not None else 0,
        *(residual.stride() if residual is not None else (0, 0)),
        HAS_RES=residual is not None, NORM=normalize, NORM_WEIGHT=norm_weight is not None,
        EPS=float(norm_eps) if normalize else 0.0, CONV_W=conv_weight.shape[1] if conv is not None else 0,
        CONV_RUN=next_pow2((conv_weight.shape[1] - 1) * cfg["BLOCK_N"]) if conv is not None else 1,
        CONV_WHOLE=conv is not None and conv_weight.shape[0] % cfg["BLOCK_N"] == 0,
        CONV_BIAS=conv_bias is not None, SPLIT_K=split, IEEE=ieee or interpreting, UPCAST=interpreting,
        PDL=pdl, launch_pdl=pdl,
        BLOCK_M=max(16, next_pow2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, STAGES=cfg["STAGES"],
        num_warps=cfg["WARPS"])
    return out
