"""The fused Mamba-1 decode ops (seqlab.ops.mamba_step) equal the unfused ops they replace.

    selective_step_dt_proj  == selective_state_update(..., dt_softplus=True, A_is_log=True, dt_proj_weight=W_dt)

Kernel tests run under TRITON_INTERPRET=1 on the CPU (``make test`` sets it) or natively on CUDA, on small shapes
(D = 40, not a multiple of any block; N = 16; R = 8) over consecutive steps with the states carried.
Tolerances, relative error of the whole tensor: float32, <= 1e-5 (same math, float32 sums in another order);
bfloat16 outputs or states, <= 1e-2 (one rounding of a float32 value; the interpreter truncates float32 ->
bfloat16 where the GPU rounds to nearest, so bits may differ by one ulp); float64 reference paths, <= 1e-12.
"""

from __future__ import annotations

import os

import pytest
import torch
from stand_in_clock import stand_in_clock

from seqlab.errors import InputError
from seqlab.ops.mamba_step import FUSED_CANDIDATES, selective_step_dt_proj
from seqlab.ops.selective_scan import selective_state_update

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(not (_INTERPRET or torch.cuda.is_available()),
                                  reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"
DIM, N, RANK = 40, 16, 8
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
    params = {k: v.cpu().double() for k, v in step_params(gen, torch.float32).items()}
    inputs = {k: v.cpu().double() for k, v in step_inputs(gen, 5, torch.float32).items()}
    state = torch.randn(5, DIM, N, generator=gen, dtype=f64)
    state_ref = state.clone()
    y = selective_step_dt_proj(state, **inputs, **params, backend=backend)
    y_ref = selective_step_unfused(state_ref, **inputs, **params)
    assert_close("y", y, y_ref, f64)
    assert_close("state", state, state_ref, f64)


def _step_args(**changes):
    args = dict(state=torch.zeros(2, 8, 4), x=torch.zeros(2, 8), dt_low=torch.zeros(2, 3),
                dt_proj_weight=torch.zeros(8, 3), dt_bias=torch.zeros(8), A_log=torch.zeros(8, 4),
                B=torch.zeros(2, 4), C=torch.zeros(2, 4), D=torch.zeros(8), z=torch.zeros(2, 8))
    return {**args, **changes}


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
        selective_step_dt_proj(**_step_args(), backend="cuda")


@needs_triton
def test_triton_backend_names_the_input_it_does_not_take():
    step_args = _step_args(x=torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="^x: expected float32, bfloat16 or float16"):
        selective_step_dt_proj(**{k: v.to(DEVICE) for k, v in step_args.items()}, backend="triton")


# ------------------------------------------------------------------------------------ GPU compiler front end

# ------------------------------------------------------------------------- the fused kernel or the pair


@needs_triton
@pytest.mark.parametrize("tile", range(len(FUSED_CANDIDATES)))
def test_every_candidate_tile_matches_the_unfused_op(tile):
    """5 rows and 40 channels leave partial row and channel blocks in every candidate tile."""
    dtype, state_dtype = DTYPES["bf16-state-bf16"]
    gen = torch.Generator().manual_seed(70 + tile)
    params = step_params(gen, dtype)
    state = randn(gen, 5, DIM, N, dtype=state_dtype)
    state_ref = state.clone()
    inputs = step_inputs(gen, 5, dtype)
    y = selective_step_dt_proj(state, **inputs, **params, backend="triton", config=FUSED_CANDIDATES[tile])
    y_ref = selective_step_unfused(state_ref, **inputs, **params)
    assert_close("y", y, y_ref, dtype)
    assert_close("state", state, state_ref, state_dtype)


def test_the_faster_kind_is_chosen_and_refused_tiles_are_skipped(monkeypatch):
    """With a stand-in clock (pair first, then each candidate tile in order): the least time wins; a tile the
    compiler refuses is skipped; off CUDA the choice is the pair, untimed."""
    from triton.runtime.errors import OutOfResources

    import seqlab.ops.mamba_step as ms

    def clock(times):
        stand_in_clock(monkeypatch, ms, times)

    args = _step_args()
    clock([1.0, OutOfResources(1, 0, "shared memory"), 0.8, 0.9])
    assert ms._time_step_kinds(*args.values()) == ("fused", FUSED_CANDIDATES[1])
    clock([0.7, 0.8, 0.9, 1.0])
    assert ms._time_step_kinds(*args.values()) == ("pair", None)
    clock([1.0, 0.9, 0.8, 0.5])
    assert ms._time_step_kinds(*args.values()) == ("fused", None)  # the kernel's default tile
    clock([])
    assert ms.dt_proj_step_choice(*args.values()) == ("pair", None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _INTERPRET, reason="needs a CUDA device")
def test_cuda_choice_is_timed_once_and_remembered(monkeypatch):
    import seqlab.ops.mamba_step as ms

    monkeypatch.setattr(ms, "_STEP_CHOICE", {})
    gen = torch.Generator().manual_seed(3)
    params = step_params(gen, torch.bfloat16)
    args = dict(state=randn(gen, 64, DIM, N, dtype=torch.bfloat16), **step_inputs(gen, 64, torch.bfloat16), **params)
    order = ("state", "x", "dt_low", "dt_proj_weight", "dt_bias", "A_log", "B", "C", "D", "z")
    before = args["state"].clone()
    kind, tile = ms.dt_proj_step_choice(*(args[k] for k in order))
    assert kind in ("fused", "pair") and (kind == "fused" or tile is None)
    assert torch.equal(args["state"], before)  # timing steps copies of the state
    assert list(ms._STEP_CHOICE.values()) == [(kind, tile)]
    monkeypatch.setattr(ms, "_time_step_kinds", lambda *a: pytest.fail("timed twice"))
    assert ms.dt_proj_step_choice(*(args[k] for k in order)) == (kind, tile)


_LAUNCHED: list = []


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


def _tensor_core_variants(launched: list) -> list:
    """The interpreter runs every tl.dot on float32 operands (F32_DOT); the GPU multiplies 16-bit operands of one
    dtype on tensor cores. Each launch whose dot operands are both bf16 or both fp16, with F32_DOT off."""
    operands = {"_selective_step_dt_proj_kernel": ("low_ptr", "wdt_ptr")}
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
