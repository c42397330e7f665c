"""The fused Mamba-1 decode ops (seqlab.ops.mamba_step) equal the unfused ops they replace.

    conv_x_proj_step        == conv_step(..., "silu") then F.linear(u, x_proj_weight)
    selective_step_dt_proj  == selective_state_update(..., dt_softplus=True, A_is_log=True, dt_proj_weight=W_dt)

Kernel tests run under TRITON_INTERPRET=1 on the CPU (``make test`` sets it) or natively on CUDA, on small shapes
(D = 40, not a multiple of any block; N = 16; R = 8) over consecutive steps with the states carried.
Tolerances, relative error of the whole tensor: float32, <= 1e-5 (same math, float32 sums in another order);
bfloat16 outputs or states, <= 1e-2 (one rounding of a float32 value; the interpreter truncates float32 ->
bfloat16 where the GPU rounds to nearest, so bits may differ by one ulp); conv states are copies, compared exactly;
float64 reference paths, <= 1e-12.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops.conv import conv_step
from seqlab.ops.mamba_step import conv_x_proj_step, selective_step_dt_proj
from seqlab.ops.selective_scan import selective_state_update

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not (_INTERPRET or torch.cuda.is_available()),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"
DIM, WIDTH, N, RANK = 40, 4, 16, 8
STEPS = 2

# (input and weight dtype, state dtype)
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bf16-state-f32": (torch.bfloat16, torch.float32),
    "bf16-state-bf16": (torch.bfloat16, torch.bfloat16),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{name}: {out.dtype} {out.shape} vs {ref.shape}"
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 1e-2)
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


def column_slice(t: torch.Tensor, gen: torch.Generator, extra: int = 5) -> torch.Tensor:
    """The values of a (rows, cols) ``t`` as a view into a wider buffer, like one part of a split projection."""
    wide = randn(gen, t.shape[0], t.shape[1] + extra, dtype=t.dtype)
    wide[:, extra:] = t
    return wide[:, extra:]


# ------------------------------------------------------------------------------------ conv_x_proj_step


def conv_inputs(gen, batch, dtype, state_dtype, width=WIDTH, bias=True):
    return dict(
        conv_state=randn(gen, batch, DIM, width - 1, dtype=state_dtype),
        conv_weight=randn(gen, DIM, width, scale=0.5, dtype=dtype),
        conv_bias=randn(gen, DIM, dtype=dtype) if bias else None,
        x_proj_weight=randn(gen, RANK + 2 * N, DIM, scale=DIM**-0.5, dtype=dtype),
    )


def conv_x_proj_unfused(conv_state, x, conv_weight, conv_bias, x_proj_weight):
    """The unfused decode path: conv_step, then x_proj on the rounded u in float32."""
    u = conv_step(conv_state, x, conv_weight, conv_bias, activation="silu", backend="torch")
    x_dbl = F.linear(u.to(torch.float64 if x.dtype == torch.float64 else torch.float32),
                     x_proj_weight.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    return u, x_dbl.to(x.dtype)


@needs_triton
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_conv_x_proj_step_matches_conv_step_then_x_proj(batch, dtypes):
    """x is a column slice of a wider in_proj output; the state is carried from step to step."""
    dtype, state_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(batch)
    args = conv_inputs(gen, batch, dtype, state_dtype, bias=batch != 5)
    state_ref = args["conv_state"].clone()
    for step in range(STEPS):
        x = column_slice(randn(gen, batch, DIM, dtype=dtype), gen)
        u, x_dbl = conv_x_proj_step(x=x, **args, backend="triton")
        u_ref, x_dbl_ref = conv_x_proj_unfused(state_ref, x, args["conv_weight"], args["conv_bias"],
                                               args["x_proj_weight"])
        assert_close(f"u, step {step}", u, u_ref, dtype)
        assert_close(f"x_dbl, step {step}", x_dbl, x_dbl_ref, dtype)
        assert torch.equal(args["conv_state"], state_ref), f"conv_state, step {step}"
        assert u.is_contiguous() and x_dbl.is_contiguous()


@needs_triton
@pytest.mark.parametrize("config,dtype", [
    (dict(BLOCK_B=16, BLOCK_K=16, SPLIT=1, WARPS=4), torch.float32),  # one program per row tile, no workspace
    (dict(BLOCK_B=16, BLOCK_K=16, SPLIT=2, WARPS=4), torch.float32),  # slices of 32 and 8 channels
    (dict(BLOCK_B=32, BLOCK_K=16, SPLIT=5, WARPS=4), torch.bfloat16),  # asks for 5 slices, gets 16, 16 and 8
])
def test_conv_x_proj_step_split_k_is_deterministic_and_rearms(config, dtype):
    """40 rows (16-row tiles: the last one partial): every call finds the arrival counters zeroed again and
    returns the same bits (the last arrival sums the slots in a fixed order)."""
    from seqlab.ops.triton.mamba_step import conv_x_proj_step_triton

    gen = torch.Generator().manual_seed(11)
    args = conv_inputs(gen, 40, dtype, torch.float32)
    x = randn(gen, 40, DIM, dtype=dtype)
    start = args["conv_state"].clone()
    outs = []
    for _ in range(3):
        args["conv_state"].copy_(start)
        outs.append(conv_x_proj_step_triton(x=x, **args, config=config))
    state_ref = start.clone()
    u_ref, x_dbl_ref = conv_x_proj_unfused(state_ref, x, args["conv_weight"], args["conv_bias"],
                                           args["x_proj_weight"])
    assert_close("u", outs[0][0], u_ref, dtype)
    assert_close("x_dbl", outs[0][1], x_dbl_ref, dtype)
    assert torch.equal(args["conv_state"], state_ref)
    for u, x_dbl in outs[1:]:
        assert torch.equal(u, outs[0][0]) and torch.equal(x_dbl, outs[0][1])


@needs_triton
def test_conv_x_proj_step_default_shape_splits_wide_channels():
    """With 300 channels the default tile shape splits the channels over several programs."""
    from seqlab.ops.triton.mamba_step import conv_x_proj_config

    gen = torch.Generator().manual_seed(13)
    dim, outputs = 300, RANK + 2 * N
    assert conv_x_proj_config(5, dim, outputs)["SPLIT"] > 1
    state = randn(gen, 5, dim, WIDTH - 1, dtype=torch.bfloat16)
    x, conv_weight = randn(gen, 5, dim, dtype=torch.bfloat16), randn(gen, dim, WIDTH, dtype=torch.bfloat16)
    x_proj_weight = randn(gen, outputs, dim, scale=dim**-0.5, dtype=torch.bfloat16)
    state_ref = state.clone()
    u, x_dbl = conv_x_proj_step(state, x, conv_weight, None, x_proj_weight, backend="triton")
    u_ref, x_dbl_ref = conv_x_proj_unfused(state_ref, x, conv_weight, None, x_proj_weight)
    assert_close("u", u, u_ref, torch.bfloat16)
    assert_close("x_dbl", x_dbl, x_dbl_ref, torch.bfloat16)
    assert torch.equal(state, state_ref)


@needs_triton
@pytest.mark.parametrize("width", [1, 2])
def test_conv_x_proj_step_reads_strided_state_and_weights(width):
    """The state is a view into a wider cache, the conv weight a transposed (W, D) buffer, x_proj's weight a
    column slice; filter widths 1 (no state) and 2."""
    gen = torch.Generator().manual_seed(12)
    batch = 6
    cache = randn(gen, batch, DIM, width + 2, dtype=torch.bfloat16)
    state = cache[:, :, 1:width]  # (B, D, W-1), strides (D (W+2), W+2, 1)
    conv_weight = randn(gen, width, DIM, dtype=torch.bfloat16).t()
    x_proj_weight = column_slice(randn(gen, RANK + 2 * N, DIM, scale=DIM**-0.5, dtype=torch.bfloat16), gen)
    x = randn(gen, batch, DIM, dtype=torch.bfloat16)
    state_ref, cache_before = state.clone(), cache.clone()
    u, x_dbl = conv_x_proj_step(state, x, conv_weight, None, x_proj_weight, backend="triton")
    u_ref, x_dbl_ref = conv_x_proj_unfused(state_ref, x, conv_weight, None, x_proj_weight)
    assert_close("u", u, u_ref, torch.bfloat16)
    assert_close("x_dbl", x_dbl, x_dbl_ref, torch.bfloat16)
    assert torch.equal(state, state_ref)
    outside = torch.ones_like(cache, dtype=torch.bool)
    outside[:, :, 1:width] = False
    assert torch.equal(cache[outside], cache_before[outside]), "wrote outside the state view"


# ------------------------------------------------------------------------------------ selective_step_dt_proj


def step_params(gen, dtype, n=N, rank=RANK, bias=True, skip=True):
    return dict(
        dt_proj_weight=randn(gen, DIM, rank, scale=rank**-0.5, dtype=dtype),
        dt_bias=randn(gen, DIM, scale=0.5) - 2 if bias else None,
        A_log=torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(DIM, 1).to(DEVICE)
        + randn(gen, DIM, n, scale=0.1),
        D=randn(gen, DIM) if skip else None,
    )


def step_inputs(gen, batch, dtype, n=N, rank=RANK, gate=True):
    """x (the conv output), and dt_low, B, C as column slices of one x_proj output, z a slice of in_proj's."""
    x_dbl = randn(gen, batch, rank + 2 * n, dtype=dtype)
    dt_low, B, C = x_dbl.split([rank, n, n], dim=-1)
    z = randn(gen, batch, 2 * DIM, dtype=dtype)[:, DIM:] if gate else None
    return dict(x=randn(gen, batch, DIM, dtype=dtype), dt_low=dt_low, B=B, C=C, z=z)


def selective_step_unfused(state, x, dt_low, dt_proj_weight, dt_bias, A_log, B, C, D, z):
    return selective_state_update(state, x, dt_low, A_log, B, C, D, z, dt_bias, dt_softplus=True, backend="torch",
                                  A_is_log=True, dt_proj_weight=dt_proj_weight)


@needs_triton
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_selective_step_dt_proj_matches_selective_state_update(batch, dtypes):
    dtype, state_dtype = DTYPES[dtypes]
    gen = torch.Generator().manual_seed(20 + batch)
    params = step_params(gen, dtype)
    state = randn(gen, batch, DIM, N, dtype=state_dtype)
    state_ref = state.clone()
    for step in range(STEPS):
        inputs = step_inputs(gen, batch, dtype)
        y = selective_step_dt_proj(state, **inputs, **params, backend="triton")
        y_ref = selective_step_unfused(state_ref, **inputs, **params)
        assert_close(f"y, step {step}", y, y_ref, dtype)
        assert_close(f"state, step {step}", state, state_ref, state_dtype)
        assert y.is_contiguous()


@needs_triton
@pytest.mark.parametrize("n,rank,optional", [
    (12, 8, "none"),  # N not a power of two; no dt_bias, D or z
    (40, 100, "all"),  # N over five 8-state chunks, R over two 64-wide chunks
])
def test_selective_step_dt_proj_shapes_and_optional_inputs(n, rank, optional):
    gen = torch.Generator().manual_seed(30 + n)
    with_all = optional == "all"
    params = step_params(gen, torch.float32, n=n, rank=rank, bias=with_all, skip=with_all)
    cache = randn(gen, 5, DIM, n + 3)
    state = cache[:, :, 3:]  # a strided view of a wider cache
    state_ref = state.clone()
    for step in range(STEPS):
        inputs = step_inputs(gen, 5, torch.float32, n=n, rank=rank, gate=with_all)
        y = selective_step_dt_proj(state, **inputs, **params, backend="triton")
        y_ref = selective_step_unfused(state_ref, **inputs, **params)
        assert_close(f"y, step {step}", y, y_ref, torch.float32)
        assert_close(f"state, step {step}", state, state_ref, torch.float32)


@needs_triton
def test_selective_step_dt_proj_is_deterministic():
    gen = torch.Generator().manual_seed(40)
    params = step_params(gen, torch.bfloat16)
    inputs = step_inputs(gen, 20, torch.bfloat16)
    start = randn(gen, 20, DIM, N)
    outs = []
    for _ in range(2):
        state = start.clone()
        outs.append((selective_step_dt_proj(state, **inputs, **params, backend="triton"), state))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ------------------------------------------------------------------------------------ reference paths and errors


@pytest.mark.parametrize("backend", ["ref", "torch", "auto"])
def test_reference_paths_equal_the_unfused_ops_in_float64(backend):
    """On CPU every backend but 'triton' is the plain PyTorch step."""
    gen = torch.Generator().manual_seed(50)
    f64 = torch.float64
    args = {k: v.cpu().double() for k, v in conv_inputs(gen, 5, torch.float32, torch.float32).items()}
    x = torch.randn(5, DIM, generator=gen, dtype=f64)
    state_ref = args["conv_state"].clone()
    u, x_dbl = conv_x_proj_step(x=x, **args, backend=backend)
    u_ref, x_dbl_ref = conv_x_proj_unfused(state_ref, x, args["conv_weight"], args["conv_bias"],
                                           args["x_proj_weight"])
    assert_close("u", u, u_ref, f64)
    assert_close("x_dbl", x_dbl, x_dbl_ref, f64)
    assert torch.equal(args["conv_state"], state_ref)

    params = {k: v.cpu().double() for k, v in step_params(gen, torch.float32).items()}
    inputs = {k: v.cpu().double() for k, v in step_inputs(gen, 5, torch.float32).items()}
    state = torch.randn(5, DIM, N, generator=gen, dtype=f64)
    state_ref = state.clone()
    y = selective_step_dt_proj(state, **inputs, **params, backend=backend)
    y_ref = selective_step_unfused(state_ref, **inputs, **params)
    assert_close("y", y, y_ref, f64)
    assert_close("state", state, state_ref, f64)


def _conv_args(**changes):
    args = dict(conv_state=torch.zeros(2, 8, 3), x=torch.zeros(2, 8), conv_weight=torch.zeros(8, 4),
                conv_bias=torch.zeros(8), x_proj_weight=torch.zeros(40, 8))
    return {**args, **changes}


def _step_args(**changes):
    args = dict(state=torch.zeros(2, 8, 4), x=torch.zeros(2, 8), dt_low=torch.zeros(2, 3),
                dt_proj_weight=torch.zeros(8, 3), dt_bias=torch.zeros(8), A_log=torch.zeros(8, 4),
                B=torch.zeros(2, 4), C=torch.zeros(2, 4), D=torch.zeros(8), z=torch.zeros(2, 8))
    return {**args, **changes}


@pytest.mark.parametrize("changes,argument", [
    (dict(x=torch.zeros(2, 8, 1)), "x"),
    (dict(x=torch.zeros(2, 8, dtype=torch.int32)), "x"),
    (dict(conv_weight=torch.zeros(9, 4)), "conv_weight"),
    (dict(conv_bias=torch.zeros(7)), "conv_bias"),
    (dict(conv_state=torch.zeros(2, 8, 2)), "conv_state"),
    (dict(conv_state=torch.zeros(3, 8, 3)), "conv_state"),
    (dict(x_proj_weight=torch.zeros(40, 9)), "x_proj_weight"),
    (dict(x_proj_weight=torch.zeros(40, 8, dtype=torch.complex64)), "x_proj_weight"),
])
def test_conv_x_proj_step_errors_name_the_argument(changes, argument):
    with pytest.raises(InputError, match=f"^{argument}: expected"):
        conv_x_proj_step(**_conv_args(**changes))


@pytest.mark.parametrize("changes,argument", [
    (dict(state=torch.zeros(2, 8, 5)), "state"),
    (dict(dt_low=torch.zeros(2, 4)), "dt_low"),
    (dict(dt_proj_weight=torch.zeros(9, 3)), "dt_proj_weight"),
    (dict(dt_bias=torch.zeros(2, 8)), "dt_bias"),
    (dict(A_log=torch.zeros(7, 4)), "A_log"),
    (dict(B=torch.zeros(2, 5)), "B"),
    (dict(C=torch.zeros(1, 4)), "C"),
    (dict(D=torch.zeros(9)), "D"),
    (dict(z=torch.zeros(2, 9)), "z"),
    (dict(x=torch.zeros(2, 8, dtype=torch.int64)), "x"),
])
def test_selective_step_dt_proj_errors_name_the_argument(changes, argument):
    with pytest.raises(InputError, match=f"^{argument}: expected"):
        selective_step_dt_proj(**_step_args(**changes))


def test_unknown_backend_is_an_input_error():
    with pytest.raises(InputError, match="^backend: expected"):
        conv_x_proj_step(**_conv_args(), backend="cuda")
    with pytest.raises(InputError, match="^backend: expected"):
        selective_step_dt_proj(**_step_args(), backend="cuda")


@needs_triton
def test_triton_backend_names_the_input_it_does_not_take():
    conv_args = _conv_args(x_proj_weight=torch.zeros(513, 8))
    with pytest.raises(InputError, match="^x_proj_weight: expected at most 512 rows"):
        conv_x_proj_step(**{k: v.to(DEVICE) for k, v in conv_args.items()}, backend="triton")
    step_args = _step_args(x=torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="^x: expected float32, bfloat16 or float16"):
        selective_step_dt_proj(**{k: v.to(DEVICE) for k, v in step_args.items()}, backend="triton")


# ------------------------------------------------------------------------------------ GPU compiler front end

_LAUNCHED: list = []


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


def _tensor_core_variants(launched: list) -> list:
    """The interpreter runs every tl.dot on float32 operands (F32_DOT); the GPU multiplies 16-bit operands of one
    dtype on tensor cores. Each launch whose dot operands are both bf16 or both fp16, with F32_DOT off."""
    operands = {"_conv_x_proj_kernel": ("x_ptr", "w_ptr"), "_selective_step_dt_proj_kernel": ("low_ptr", "wdt_ptr")}
    variants = []
    for module, name, sig, consts in launched:
        a, b = (sig.get(p) for p in operands.get(name, ("", "")))
        if a is not None and a == b and a in ("*bf16", "*fp16"):
            index = list(sig).index("F32_DOT")
            variants.append((module, name, sig, [[i, False if i == index else v] for i, v in consts]))
    return variants


def test_launched_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects: lower every specialisation launched above, and its
    tensor-core form."""
    from triton_compile import assert_launched_compile_for_sm90

    assert_launched_compile_for_sm90(_LAUNCHED + _tensor_core_variants(_LAUNCHED))
