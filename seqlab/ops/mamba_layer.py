"""A whole Mamba-1 block's decode step as one op (Gu & Dao 2023, Sec. 3 at one position), residual included::

    h_out = mamba_layer_step(h, weights, conv_state, ssm_state)
        x, z  = rmsnorm(h) W_inᵀ                   u = silu(conv_step(conv_state, x))       # (B, D) each
        dt_low, B, C = u W_xᵀ                      Δ = softplus(dt_low W_dtᵀ + b_dt)         # (B, R), (B, N)
        h_s   = exp(Δ A) h_s + Δ u B,  A = -exp(A_log)                                       # (B, D, N)
        y     = (<h_s, C> + D u) silu(z)           h_out = h + y W_outᵀ                      # (B, d_model)

Glossary: B batch, D d_inner channels, N d_state, R dt_rank, W d_conv. Both states are updated in place.

On CUDA the Triton path (seqlab.ops.triton.mamba_layer) is one persistent launch per layer, its phases separated
by grid-wide barriers, where the unfused step is seven kernels (norm, in_proj, conv, x_proj, dt_proj, state
update, out_proj), each bound at a decode step's few rows by its own latency rather than its bytes. Measured on an
H200 the launch is nevertheless slower than those kernels at batch 1, 64 and 128 (a grid barrier costs what a
kernel boundary does: benchmarks/RESULTS.md, section 9), so models take it only when asked
(seqlab.mixers.base.FUSED_DECODE_KERNELS["layer"]). ``ref`` runs the unfused ops in plain PyTorch, rounding where
they round. Decode only: no backward. Eligible shapes: ``layer_step_fits``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import check_backend, check_tensor, require_triton, triton_interpreting, triton_usable
from seqlab.ops.conv import conv_step_ref
from seqlab.ops.mamba_step import selective_step_dt_proj_ref
from seqlab.ops.norm import rms_norm
from seqlab.ops.triton import next_pow2

MAX_ROWS = 128  # every batch row lives in one tile
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The launch's tiles (seqlab.ops.triton.mamba_layer names them); layer_step_config shrinks them to small layers.
# persistent: one launch with grid-wide barriers; False: one launch per phase (no barrier). last_phase: run the
# phases up to this one only (None: all), which leaves h_out unwritten: for timing the phases cumulatively.
# Eight warps: one program per SM, and at four the in_proj phase spilled (255 registers; eight: none; compiled
# offline for sm_90 with benchmarks/sass_report.py). num_stages: the GEMM loops' software pipeline depth (with
# one program per SM, the bytes each keeps in flight bound the bandwidth it streams weights at). programs_per_sm:
# programs per SM of a persistent launch, at most what the compiled kernel's registers and shared memory allow.
# prefetch: a persistent launch first asks L2 (Hopper bulk prefetch) for its weights, and after in_proj for its
# states and out_proj's weights, so that later phases find them there; measured slower on an H200 (69.3 against
# 52.9 us per layer at batch 64, 54.9 against 36.7 at batch 1: benchmarks/RESULTS.md section 9), so off.
CONFIG = dict(BLOCK_N_IN=64, BLOCK_K_IN=128, X_SPLIT=16, BLOCK_N_X=32, BLOCK_K_X=64, BLOCK_C=32, ROWS=32,
              OUT_SPLIT=2, BLOCK_N_OUT=32, BLOCK_K_OUT=128, BLOCK_E=1024, BLOCK_D=1024, num_warps=8, num_stages=4,
              persistent=True, programs_per_sm=1, prefetch=False, last_phase=None)
_SYNC: dict = {}  # (device, stream) -> int32 (3,): arrivals, generation, failure flag
_GRIDS: dict = {}  # (device, dtypes, FIRST, LAST, constexprs, programs_per_sm) -> programs of a persistent launch


def layer_step_config(d_model: int, d_inner: int, batch: int, config: dict | None = None) -> dict:
    """CONFIG (updated by ``config``) with its tiles no larger than the layer, and BLOCK_M for ``batch`` rows."""
    cfg = {**CONFIG, **(config or {})}
    cfg["BLOCK_M"] = max(16, next_pow2(batch))
    cfg["ROWS"] = min(cfg["ROWS"], cfg["BLOCK_M"])
    cfg["BLOCK_K_IN"] = min(cfg["BLOCK_K_IN"], d_model)
    for split, block in (("X_SPLIT", "BLOCK_K_X"), ("OUT_SPLIT", "BLOCK_K_OUT")):
        cfg[block] = min(cfg[block], d_inner)
        cfg[split] = max(1, min(cfg[split], d_inner // cfg[block]))
    cfg["BLOCK_N_IN"] = min(cfg["BLOCK_N_IN"], d_inner)
    cfg["BLOCK_C"] = min(cfg["BLOCK_C"], d_inner)
    cfg["BLOCK_N_OUT"] = min(cfg["BLOCK_N_OUT"], d_model)
    cfg["BLOCK_D"] = min(cfg["BLOCK_D"], next_pow2(d_model))
    return cfg


def layer_step_fits(batch: int, d_model: int, d_inner: int, d_state: int, d_conv: int,
                    config: dict | None = None) -> str | None:
    """None when the fused launch takes this layer, else why not (a sentence)."""
    if not 1 <= batch <= MAX_ROWS:
        return f"batch {batch} outside 1..{MAX_ROWS}"
    if not 2 <= d_conv <= 4:
        return f"d_conv {d_conv} outside 2..4"
    if d_state != next_pow2(d_state) or d_state < 2:
        return f"d_state {d_state} is not a power of two"
    cfg = layer_step_config(d_model, d_inner, batch, config)
    for name, size, block in (("d_model", d_model, cfg["BLOCK_K_IN"]), ("d_inner", d_inner, cfg["BLOCK_N_IN"]),
                              ("d_inner", d_inner, cfg["BLOCK_C"]), ("d_model", d_model, cfg["BLOCK_N_OUT"]),
                              ("d_inner", d_inner, cfg["X_SPLIT"] * cfg["BLOCK_K_X"]),
                              ("d_inner", d_inner, cfg["OUT_SPLIT"] * cfg["BLOCK_K_OUT"])):
        if block < 16 or block != next_pow2(block) or size % block:
            return f"{name} {size} is not a multiple of a power-of-two tile >= 16 ({block})"
    return None


def mamba_layer_step(
    h: torch.Tensor,
    in_proj_weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_proj_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    ssm_state: torch.Tensor,
    out_proj_weight: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    backend: str = "auto",
    config: dict | None = None,
) -> torch.Tensor:
    """h (B, d_model) -> h_out (B, d_model); conv_state (B, D, W-1) and ssm_state (B, D, N) updated in place.

    in_proj_weight (2D, d_model); conv_weight (D, W); conv_bias (D,) or None; x_proj_weight (R + 2N, D);
    dt_proj_weight (D, R); dt_proj_bias, D (D,); A_log (D, N); out_proj_weight (d_model, D); norm_weight
    (d_model,) or None (the pre-norm's scale, None: weightless); norm_eps None: no pre-norm at all.
    ``backend``: "auto" (Triton on CUDA where the layer fits, else "ref"), "ref"/"torch" (plain PyTorch) or
    "triton" (under TRITON_INTERPRET=1 also on the CPU, phase by phase). ``config``: tiles (CONFIG's keys)."""
    check_backend(backend)
    args = _check(h, in_proj_weight, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                  dt_proj_bias, A_log, D, ssm_state, out_proj_weight, norm_weight)
    tensors = (h, in_proj_weight, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
               A_log, D, ssm_state, out_proj_weight, norm_weight)
    misfit = layer_step_fits(*args, config=config)
    if h.dtype not in _DTYPES:
        misfit = misfit or f"dtype {h.dtype} is not float32, bfloat16 or float16"
    if backend == "triton":
        require_triton("mamba_layer_step", *tensors)
        if misfit is not None:
            raise InputError("h", "a layer the fused launch takes (backend='ref' runs any)", misfit)
    use_triton = backend == "triton" or (backend == "auto" and h.is_cuda and misfit is None
                                         and triton_usable(*tensors))
    if use_triton:
        return _triton(h, in_proj_weight, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                       dt_proj_bias, A_log, D, ssm_state, out_proj_weight, norm_weight, norm_eps, config)
    return mamba_layer_step_ref(h, in_proj_weight, conv_state, conv_weight, conv_bias, x_proj_weight,
                                dt_proj_weight, dt_proj_bias, A_log, D, ssm_state, out_proj_weight, norm_weight,
                                norm_eps)


def _check(h, in_w, conv_state, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, ssm_state, out_w, norm_w):
    """(batch, d_model, d_inner, d_state, d_conv) after checking every shape, device and dtype."""
    check_tensor("h", h, ("B", "d_model"))
    batch, d_model = h.shape
    dev = h.device
    check_tensor("in_proj_weight", in_w, (None, d_model), device=dev)
    if in_w.shape[0] % 2:
        raise InputError("in_proj_weight", "(2 D, d_model): an even number of rows", f"shape {tuple(in_w.shape)}")
    d_inner = in_w.shape[0] // 2
    check_tensor("A_log", A_log, (d_inner, None), device=dev)
    d_state = A_log.shape[1]
    check_tensor("conv_weight", conv_w, (d_inner, None), device=dev)
    d_conv = conv_w.shape[1]
    check_tensor("conv_state", conv_state, (batch, d_inner, d_conv - 1), device=dev)
    check_tensor("conv_bias", conv_b, (d_inner,), optional=True, device=dev)
    check_tensor("dt_proj_weight", dt_w, (d_inner, None), device=dev)
    rank = dt_w.shape[1]
    check_tensor("x_proj_weight", x_w, (rank + 2 * d_state, d_inner), device=dev)
    check_tensor("dt_proj_bias", dt_b, (d_inner,), device=dev)
    check_tensor("D", D, (d_inner,), device=dev)
    check_tensor("ssm_state", ssm_state, (batch, d_inner, d_state), device=dev)
    check_tensor("out_proj_weight", out_w, (d_model, d_inner), device=dev)
    check_tensor("norm_weight", norm_w, (d_model,), optional=True, device=dev)
    for name, w in (("in_proj_weight", in_w), ("x_proj_weight", x_w), ("dt_proj_weight", dt_w),
                    ("out_proj_weight", out_w)):
        if w.dtype != h.dtype:
            raise InputError(name, f"dtype {h.dtype} like h", f"dtype {w.dtype}")
    for name, s in (("conv_state", conv_state), ("ssm_state", ssm_state)):
        if not s.is_contiguous():
            raise InputError(name, "a contiguous tensor (it is updated in place)", f"strides {s.stride()}")
    return batch, d_model, d_inner, d_state, d_conv


def mamba_layer_step_ref(h, in_proj_weight, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                         dt_proj_bias, A_log, D, ssm_state, out_proj_weight, norm_weight=None, norm_eps=1e-5):
    """The unfused step in plain PyTorch, each op's output in h's dtype as the module's step rounds it."""
    d_inner, d_state, rank = A_log.shape[0], A_log.shape[1], dt_proj_weight.shape[1]
    xn = h if norm_eps is None else rms_norm(h, norm_weight, norm_eps)
    xs, z = F.linear(xn, in_proj_weight).split(d_inner, dim=-1)
    u = conv_step_ref(conv_state, xs, conv_weight, conv_bias, activation="silu")
    dt_low, B, C = F.linear(u, x_proj_weight).split([rank, d_state, d_state], dim=-1)
    y = selective_step_dt_proj_ref(ssm_state, u, dt_low, dt_proj_weight, dt_proj_bias, A_log, B, C, D, z)
    return h + F.linear(y, out_proj_weight)


def _sync_buffer(device: torch.device) -> torch.Tensor:
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    if key not in _SYNC:
        _SYNC[key] = torch.zeros(3, dtype=torch.int32, device=device)
    return _SYNC[key]


def barrier_failures(device: torch.device | str) -> int:
    """1 if a grid barrier of a launch on ``device`` ever gave up waiting (its results are then wrong), else 0."""
    device = torch.device(device)
    return max((int(buf[2]) for (dev, _), buf in _SYNC.items() if dev == device), default=0)


def _resident_per_sm(kernel, warps: int, limits: dict | None = None) -> int:
    """How many programs of the compiled ``kernel`` an SM holds at once (registers, shared memory, warps): a
    persistent launch must not have more programs than the GPU holds, or its barriers wait. ``limits``: Triton's
    device properties (max_num_regs, max_shared_mem), read from the current device when None."""
    kernel._init_handles()
    if limits is None:
        try:
            from triton.runtime import driver

            limits = driver.active.utils.get_device_properties(torch.cuda.current_device())
        except (AttributeError, RuntimeError):  # a Triton without the query: the smallest SM of sm_80 and later
            limits = {"max_num_regs": 65536, "max_shared_mem": 99 * 1024}
    regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = limits.get("max_num_regs", 65536) // max(1, regs_per_warp * warps)
    by_shared = limits.get("max_shared_mem", 227 * 1024) // max(1, kernel.metadata.shared + 1024)  # +1 KB reserved
    return max(1, min(by_regs, by_shared, 64 // warps, 32))


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE products for float32 (as the unfused float32 step); the interpreter's dot needs float32 operands."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if triton_interpreting() else "tf32"


def _triton(h, in_w, conv_state, conv_w, conv_b, x_w, dt_w, dt_b, A_log, D, ssm_state, out_w, norm_w, eps,
            config):
    import triton

    from seqlab.ops.triton import sm_count
    from seqlab.ops.triton.mamba_layer import mamba_layer_step_kernel

    batch, d_model = h.shape
    d_inner, d_state = A_log.shape
    rank = dt_w.shape[1]
    nx = rank + 2 * d_state
    cfg = layer_step_config(d_model, d_inner, batch, config)
    bm = cfg["BLOCK_M"]
    h = h.contiguous()
    dev, act = h.device, h.dtype
    out = torch.empty_like(h)
    u = torch.empty(batch, d_inner, device=dev, dtype=act)
    z = torch.empty_like(u)
    y = torch.empty_like(u)
    xn = torch.empty_like(h)
    xpart = torch.empty(cfg["X_SPLIT"], bm, nx, device=dev, dtype=torch.float32)
    dbc = torch.empty(bm, nx, device=dev, dtype=act)
    opart = torch.empty(cfg["OUT_SPLIT"], bm, d_model, device=dev, dtype=torch.float32)
    items = (batch, 2 * d_inner // cfg["BLOCK_N_IN"], cfg["X_SPLIT"] * triton.cdiv(nx, cfg["BLOCK_N_X"]),
             triton.cdiv(bm * nx, cfg["BLOCK_E"]), d_inner // cfg["BLOCK_C"],
             cfg["OUT_SPLIT"] * (d_model // cfg["BLOCK_N_OUT"]), triton.cdiv(batch * d_model, cfg["BLOCK_E"]))
    has_norm = eps is not None
    first = 0 if has_norm else 1
    last = 6 if cfg["OUT_SPLIT"] > 1 else 5
    if cfg["last_phase"] is not None:
        last = min(last, int(cfg["last_phase"]))
    nw = norm_w if norm_w is not None else torch.ones(d_model, device=dev, dtype=act)
    launch_args = (h, nw.contiguous(), in_w.contiguous(), conv_state, conv_w.contiguous(),
                   conv_b if conv_b is not None else D, x_w.contiguous(), dt_w.contiguous(), dt_b.contiguous(),
                   A_log.contiguous(), D.contiguous(), ssm_state, out_w.contiguous(), out, xn, u, z, xpart, dbc, y,
                   opart, _sync_buffer(dev), batch, float(eps or 0.0))
    consts = dict(DM=d_model, DI=d_inner, N=d_state, R=rank, W=conv_w.shape[1], HAS_NORM=has_norm,
                  HAS_CONV_BIAS=conv_b is not None, BLOCK_M=bm, BLOCK_D=cfg["BLOCK_D"],
                  BLOCK_N_IN=cfg["BLOCK_N_IN"], BLOCK_K_IN=cfg["BLOCK_K_IN"], X_SPLIT=cfg["X_SPLIT"],
                  BLOCK_N_X=cfg["BLOCK_N_X"], BLOCK_K_X=cfg["BLOCK_K_X"], BLOCK_C=cfg["BLOCK_C"],
                  BLOCK_R=max(16, next_pow2(rank)), ROWS=cfg["ROWS"], OUT_SPLIT=cfg["OUT_SPLIT"],
                  BLOCK_N_OUT=cfg["BLOCK_N_OUT"], BLOCK_K_OUT=cfg["BLOCK_K_OUT"], BLOCK_E=cfg["BLOCK_E"],
                  CONV_RUN=next_pow2((conv_w.shape[1] - 1) * cfg["BLOCK_N_IN"]),
                  DOT_PRECISION=_dot_precision(act), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["persistent"] and h.is_cuda and not triton_interpreting():
        aligned = all(t.data_ptr() % 16 == 0 for t in (in_w, x_w, dt_w, out_w, ssm_state))
        consts["PREFETCH"] = (cfg["prefetch"] and aligned and last >= 5
                              and torch.cuda.get_device_capability(dev)[0] >= 9)
        key = (dev, act, conv_state.dtype, ssm_state.dtype, first, last, tuple(sorted(consts.items())),
               cfg["programs_per_sm"])
        if key not in _GRIDS:  # compile once and size the grid to what the GPU keeps resident
            kernel = mamba_layer_step_kernel.warmup(*launch_args, FIRST=first, LAST=last, PERSISTENT=True,
                                                    grid=(1,), **consts)
            per_sm = min(cfg["programs_per_sm"], _resident_per_sm(kernel, cfg["num_warps"]))
            _GRIDS[key] = min(sm_count() * per_sm, max(items[first: last + 1]))
        mamba_layer_step_kernel[(_GRIDS[key],)](*launch_args, FIRST=first, LAST=last, PERSISTENT=True, **consts)
    else:
        for phase in range(first, last + 1):
            mamba_layer_step_kernel[(items[phase],)](*launch_args, FIRST=phase, LAST=phase, PERSISTENT=False,
                                                     **consts)
    return out
