"""A decode step launches only the kernels it needs: the Triton step kernels read strided views of the
projections in place and form A = -exp(A_log) themselves; RMSNorm is one fused op.

Kernel tests run under TRITON_INTERPRET=1 on the CPU (``make test`` sets it) or natively on CUDA.
Tolerances: float32 kernels vs the torch reference, relative error <= 1e-5 (same math, differently ordered
float32 sums); model decode vs parallel forward, float32, atol 1e-4 / rtol 1e-4 on the logits.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from seqlab.mixers.norm import GatedRMSNorm, RMSNorm, rms_norm

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(
    not (_INTERPRET or torch.cuda.is_available()), reason="Triton kernels need CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if (torch.cuda.is_available() and not _INTERPRET) else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name, out, ref, tol=1e-5):
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


# ------------------------------------------------------------------------------------------------ RMSNorm


def rms_norm_reference(x, weight, eps):
    """Float32 statistics and scaling, one rounding to x.dtype at the end."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_float32_reference(dtype, with_weight):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 5, 48, generator=gen)).to(dtype)
    w = (1 + torch.randn(48, generator=gen)).to(dtype) if with_weight else None
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype
    ref = rms_norm_reference(x, w, 1e-5)
    # bfloat16: one rounding of the same float32 value; at most one ulp apart
    torch.testing.assert_close(out, ref, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)


def test_rms_norm_mixed_dtypes_and_autocast_keep_the_input_dtype():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    w = 1 + torch.randn(32, generator=gen)  # float32 weight, bfloat16 input
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rms_norm(x, w.to(torch.bfloat16), 1e-6).dtype == torch.bfloat16
        assert rms_norm(x.float(), w, 1e-6).dtype == torch.float32


def test_rms_norm_gradients_match_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    norm = RMSNorm(40, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn(40, generator=gen, dtype=torch.float64))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    (norm(x1) * g).sum().backward()
    w_grad = norm.weight.grad.clone()
    norm.weight.grad = None
    ref = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight  # float64 throughout
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w_grad, norm.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("group_size", [32, 8])
@pytest.mark.parametrize("weight_dtype", ["like_input", "float32"])
def test_gated_rms_norm_matches_float32_reference(dtype, gated, group_size, weight_dtype):
    gen = torch.Generator().manual_seed(3)
    norm = GatedRMSNorm(32, eps=1e-5, group_size=group_size)
    with torch.no_grad():
        norm.weight.add_(torch.randn(32, generator=gen))
    norm = norm.to(dtype if weight_dtype == "like_input" else torch.float32)
    y = (2 * torch.randn(2, 3, 32, generator=gen)).to(dtype)
    z = torch.randn(2, 3, 32, generator=gen).to(dtype) if gated else None
    h = y.float() * F.silu(z.float()) if gated else y.float()
    h = h.unflatten(-1, (32 // group_size, group_size))
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2)
    ref = (h * norm.weight.float()).to(dtype)
    out = norm(y, z)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=0, rtol=0 if dtype == torch.float32 else 2**-7)


# ------------------------------------------------------------------------------------ decode kernels


def strided(t: torch.Tensor, gen, extra: int = 3) -> torch.Tensor:
    """The values of ``t`` as a non-contiguous view: a slice of a wider buffer (like a split projection)."""
    wide = randn(gen, *t.shape[:-1], t.shape[-1] + extra)
    wide[..., extra:] = t
    view = wide[..., extra:]
    assert not view.is_contiguous()
    return view


def strided_rows(t: torch.Tensor, gen) -> torch.Tensor:
    """(B, ...) values as a view whose batch stride is wider than its rows."""
    flat = t.reshape(t.shape[0], -1)
    return strided(flat, gen).view(t.shape)


@needs_triton
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("A_is_log", [False, True])
@pytest.mark.parametrize("tile", [None, (2, 8, 2), (4, 4, 1), "evict_first"],
                         ids=["default", "rows2", "rows4", "evict_first"])
def test_selective_state_update_triton_reads_strided_views_and_A_log(groups, A_is_log, tile, monkeypatch):
    """Also with other program tiles (rows, channels, warps): 3 rows in tiles of 2 or 4 leave a row past the batch
    in the last program, 12 channels in blocks of 8 a partial block; and with the state streamed evict-first."""
    from seqlab.ops.selective_scan import selective_state_update
    from seqlab.ops.triton import decode
    from seqlab.ops.triton.decode import selective_state_update_triton

    if tile == "evict_first":
        monkeypatch.setitem(decode.TUNING, "state_policy", tile)
    elif tile is not None:
        for key, value in zip(("step_rows", "step_block_d", "step_warps"), tile):
            monkeypatch.setitem(decode.TUNING, key, value)

    batch, dim, N = 3, 12, 5
    gen = torch.Generator().manual_seed(4)
    state = randn(gen, batch, dim, N)
    x, dt, z = randn(gen, batch, dim), randn(gen, batch, dim), randn(gen, batch, dim)
    A_log = randn(gen, dim, N).abs()
    B, C = randn(gen, batch, groups, N), randn(gen, batch, groups, N)
    D, dt_bias = randn(gen, dim), randn(gen, dim)
    state_ref = state.clone()
    y_ref = selective_state_update(state_ref, x, dt, -torch.exp(A_log), B, C, D, z, dt_bias, True, backend="ref")
    A_arg = A_log if A_is_log else -torch.exp(A_log)
    y = selective_state_update_triton(state, strided(x, gen), strided(dt, gen), A_arg, strided_rows(B, gen),
                                      strided_rows(C, gen), D, strided(z, gen), dt_bias, True, A_is_log=A_is_log)
    assert_close("y", y, y_ref)
    assert_close("state", state, state_ref)
    assert y.is_contiguous() and y.shape == (batch, dim)


@pytest.mark.parametrize("backend", ["ref", "torch", "triton", "triton-fused-rows-2", "triton-fused-rows-4"])
@pytest.mark.parametrize("rank", [5, 80])  # 80: more than one 64-wide block of the low-rank input
def test_selective_state_update_fused_dt_projection_equals_projecting_first(backend, rank, monkeypatch):
    """dt_proj_weight (D, R) with a (B, R) dt equals projecting dt first; float32, relative error <= 1e-5. The
    Triton kernel projects first or inside the kernel, stepping 2 or 4 batch rows per program (3 rows: one
    program has a row past the batch)."""
    if backend.startswith("triton") and not (_INTERPRET or torch.cuda.is_available()):
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from seqlab.ops.selective_scan import selective_state_update
    from seqlab.ops.triton import decode

    if backend.startswith("triton"):
        monkeypatch.setitem(decode.TUNING, "dt_rows", int(backend.split("-")[-1]) if "rows" in backend else 0)
        backend = "triton"

    batch, dim, N = 3, 24, 4
    gen = torch.Generator().manual_seed(6)
    dev = DEVICE if backend == "triton" else "cpu"
    state = torch.randn(batch, dim, N, generator=gen).to(dev)
    x, z = torch.randn(batch, dim, generator=gen).to(dev), torch.randn(batch, dim, generator=gen).to(dev)
    low = torch.randn(batch, rank, generator=gen).to(dev)
    w = (torch.randn(dim, rank, generator=gen) / rank**0.5).to(dev)
    A_log, bias = torch.randn(dim, N, generator=gen).abs().to(dev), torch.randn(dim, generator=gen).to(dev)
    B, C, D = (torch.randn(*s, generator=gen).to(dev) for s in ((batch, N), (batch, N), (dim,)))
    s_ref = state.clone()
    y_ref = selective_state_update(s_ref, x, low @ w.t(), A_log, B, C, D, z, bias, True, backend="ref",
                                   A_is_log=True)
    y = selective_state_update(state, x, low, A_log, B, C, D, z, bias, True, backend=backend, A_is_log=True,
                               dt_proj_weight=w)
    assert_close("y", y, y_ref)
    assert_close("state", state, s_ref)


def test_selective_state_update_rejects_a_dt_that_does_not_fit_the_projection():
    from seqlab.errors import InputError
    from seqlab.ops.selective_scan import selective_state_update

    state, x = torch.zeros(2, 8, 4), torch.zeros(2, 8)
    A, B = torch.zeros(8, 4), torch.zeros(2, 4)
    with pytest.raises(InputError, match="dt"):
        selective_state_update(state, x, torch.zeros(2, 3), A, B, B, dt_proj_weight=torch.zeros(8, 5))
    with pytest.raises(InputError, match="dt_proj_weight"):
        selective_state_update(state, x, torch.zeros(2, 5), A, B, B, dt_proj_weight=torch.zeros(7, 5))


@needs_triton
@pytest.mark.parametrize("kernel", ["selective", "ssd"])
def test_step_kernels_keep_a_bfloat16_state_within_its_rounding(kernel):
    """A bfloat16 state is read, updated in float32 and rounded once: relative error vs a float32 state
    <= 1e-2 after one step (bf16 has an 8-bit mantissa)."""
    from seqlab.ops.triton.decode import selective_state_update_triton, ssd_state_update_triton

    gen = torch.Generator().manual_seed(8)
    batch, N = 2, 16
    if kernel == "selective":
        dim = 32
        state = randn(gen, batch, dim, N)
        args = (randn(gen, batch, dim), randn(gen, batch, dim), -randn(gen, dim, N).abs(), randn(gen, batch, 1, N),
                randn(gen, batch, 1, N), randn(gen, dim), randn(gen, batch, dim), randn(gen, dim), True)
        step = selective_state_update_triton
    else:
        H, P = 4, 8
        state = randn(gen, batch, H, P, N)
        args = (randn(gen, batch, H, P), randn(gen, batch, H), -randn(gen, H).abs(), randn(gen, batch, 1, N),
                randn(gen, batch, 1, N), randn(gen, H), randn(gen, batch, H, P), randn(gen, H), True)
        step = ssd_state_update_triton
    low = state.to(torch.bfloat16)
    ref = low.float()
    y_ref = step(ref, *args)
    y = step(low, *args)
    assert low.dtype == torch.bfloat16
    assert_close("state", low, ref, tol=1e-2)
    assert_close("y", y, y_ref, tol=1e-2)


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_selective_state_update_A_is_log_equals_A(backend):
    from seqlab.ops.selective_scan import selective_state_update

    batch, dim, N = 2, 8, 4
    gen = torch.Generator().manual_seed(5)
    state = torch.randn(batch, dim, N, generator=gen)
    x, dt, z = (torch.randn(batch, dim, generator=gen) for _ in range(3))
    A_log = torch.randn(dim, N, generator=gen).abs()
    B, C = torch.randn(batch, N, generator=gen), torch.randn(batch, N, generator=gen)
    s1, s2 = state.clone(), state.clone()
    y1 = selective_state_update(s1, x, dt, A_log, B, C, z=z, backend=backend, A_is_log=True)
    y2 = selective_state_update(s2, x, dt, -torch.exp(A_log), B, C, z=z, backend=backend)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)
    assert not torch.equal(s1, state)


@needs_triton
@pytest.mark.parametrize("A_is_log", [False, True])
@pytest.mark.parametrize("d_shape", ["per_head", "per_channel"])
def test_ssd_state_update_triton_reads_strided_views_and_A_log(A_is_log, d_shape):
    from seqlab.ops.ssd import ssd_state_update
    from seqlab.ops.triton.decode import ssd_state_update_triton

    batch, H, P, G, N = 2, 4, 6, 2, 8
    gen = torch.Generator().manual_seed(6)
    state = randn(gen, batch, H, P, N)
    x, z, dt = randn(gen, batch, H, P), randn(gen, batch, H, P), randn(gen, batch, H)
    A_log, B, C, dt_bias = randn(gen, H).abs(), randn(gen, batch, G, N), randn(gen, batch, G, N), randn(gen, H)
    D = randn(gen, H) if d_shape == "per_head" else randn(gen, H, P)
    state_ref = state.clone()
    y_ref = ssd_state_update(state_ref, x, dt, -torch.exp(A_log), B, C, D, z, dt_bias, True, backend="ref")
    A_arg = A_log if A_is_log else -torch.exp(A_log)
    y = ssd_state_update_triton(state, strided_rows(x, gen), strided(dt, gen), A_arg, strided_rows(B, gen),
                                strided_rows(C, gen), D, strided_rows(z, gen), dt_bias, True, A_is_log=A_is_log)
    assert_close("y", y, y_ref)
    assert_close("state", state, state_ref)
    s1, s2 = state_ref.clone(), state_ref.clone()  # the public op's A_is_log on the torch path
    y1 = ssd_state_update(s1, x, dt, A_log, B, C, D, z, dt_bias, True, backend="torch", A_is_log=True)
    y2 = ssd_state_update(s2, x, dt, -torch.exp(A_log), B, C, D, z, dt_bias, True, backend="torch")
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    torch.testing.assert_close(s1, s2, atol=0, rtol=0)


@needs_triton
def test_conv_step_triton_reads_a_strided_x():
    from seqlab.ops.conv import conv_step
    from seqlab.ops.triton.decode import conv_step_triton

    batch, dim, width = 3, 10, 4
    gen = torch.Generator().manual_seed(7)
    state, weight, bias = randn(gen, batch, dim, width - 1), randn(gen, dim, width), randn(gen, dim)
    state_ref = state.clone()
    for _ in range(3):  # the state carries across steps
        x = randn(gen, batch, dim)
        y = conv_step_triton(state, strided(x, gen), weight, bias, "silu")
        y_ref = conv_step(state_ref, x, weight, bias, "silu", backend="ref")
        assert_close("y", y, y_ref)
        assert_close("state", state, state_ref)


# ------------------------------------------------------------------------------------ whole decode steps


def _force_triton(monkeypatch):
    """Route the mixers' decode ops to the Triton kernels (the CUDA path) on any device."""
    import seqlab.mixers.mamba as mamba
    import seqlab.mixers.mamba2 as mamba2
    decode_linear = importlib.import_module("seqlab.ops.decode_linear")  # seqlab.ops binds the function's name

    mamba_ops = ("conv_step", "selective_state_update", "selective_step_dt_proj")
    for mod, names in ((mamba, mamba_ops), (mamba2, ("conv_step", "ssd_state_update")),
                       (decode_linear, ("conv_step",))):
        for name in names:
            monkeypatch.setattr(mod, name, functools.partial(getattr(mod, name), backend="triton"))


def _tiny(preset, seed=0):
    from seqlab.models.presets import from_preset

    torch.manual_seed(seed)
    return from_preset(preset, "tiny").eval()


@needs_triton
@pytest.mark.parametrize("preset", ["mamba", "mamba2"])
def test_triton_decode_matches_parallel_forward(preset, monkeypatch):
    model = _tiny(preset, seed=8).to(DEVICE)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 256, (2, 7), generator=gen).to(DEVICE)
    _force_triton(monkeypatch)
    with torch.no_grad():
        parallel = model(ids)
        state = model.allocate_state(2, ids.shape[1])
        steps = torch.cat([model(ids[:, t : t + 1], state=state) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(steps, parallel, atol=1e-4, rtol=1e-4)


class _OpLog(TorchDispatchMode):
    """Counts the aten ops that compute (views and allocations excluded); Triton launches are not aten ops."""

    SKIP = {"view", "_unsafe_view", "split", "split_with_sizes", "unsqueeze", "squeeze", "t", "transpose", "slice",
            "select", "as_strided", "detach", "empty", "empty_like", "empty_strided", "alias", "expand", "permute",
            "lift_fresh", "unbind", "_local_scalar_dense", "min", "max"}  # min/max: the CPU-only id check

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.SKIP:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.parametrize("preset,fused", [("mamba", "default"), ("mamba", "none"), ("mamba", "all"),
                                          ("mamba2", "default")])
def test_decode_step_launches_no_copies_or_elementwise_ops(preset, fused, monkeypatch):
    """Per layer: the projections' GEMMs (the residual added inside the out_proj GEMM) and one RMSNorm per norm;
    nothing else in torch. Mamba's fused step kernel leaves in_proj, x_proj and out_proj as GEMMs (the pre-norm
    and the conv step folded into in_proj run as their own ops here only because the GEMMs are forced to
    cuBLAS)."""
    import seqlab.mixers.base as mixer_base
    import seqlab.ops.triton.decode as decode
    import seqlab.ops.triton.mamba_step as mamba_step

    monkeypatch.setattr(mixer_base, "FUSE_DECODE", fused != "none")
    if fused == "all":
        monkeypatch.setitem(mixer_base.FUSED_DECODE_KERNELS, "dt_proj_step", True)
    model = _tiny(preset, seed=9).to(DEVICE).to(torch.bfloat16)
    _force_triton(monkeypatch)
    monkeypatch.setenv("SEQLAB_DECODE_GEMM", "torch")  # count the GEMMs as aten ops (on CUDA some could be Triton)
    log = _OpLog()
    launched = collections.Counter()

    def launcher(kernel):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launched[kernel.__name__] += 1
                    with torch.utils._python_dispatch._disable_current_modes():  # the interpreter's own copies
                        return kernel[grid](*args, **kwargs)
                return run
        return Launch()

    for name in ("_selective_step_kernel", "_ssd_step_kernel", "_conv_step_kernel"):
        monkeypatch.setattr(decode, name, launcher(getattr(decode, name)))
    monkeypatch.setattr(mamba_step, "_selective_step_dt_proj_kernel",
                        launcher(mamba_step._selective_step_dt_proj_kernel))
    rms = F.rms_norm

    def rms_norm_as_one_op(*args, **kwargs):  # one fused kernel on CUDA; a decomposition on the CPU
        log.ops["rms_norm"] += 1
        with torch.utils._python_dispatch._disable_current_modes():
            return rms(*args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", rms_norm_as_one_op)
    ids = torch.randint(0, 256, (2, 3)).to(DEVICE)
    with torch.no_grad():
        state = model.allocate_state(2, 8)
        model(ids, state=state)
        model(ids[:, -1:], state=state)  # a first step picks the kernels where they are timed (CUDA)
        log.ops.clear()  # count one decode step only
        launched.clear()
        with log:
            model(ids[:, -1:], state=state)
    n = model.config.n_layers
    norms_per_layer = 1 if preset == "mamba" else 2  # Mamba-2: block norm + gated norm
    ops = log.ops
    assert ops["rms_norm"] == n * norms_per_layer + 1, ops  # + final norm
    # mamba: in_proj, x_proj, dt_proj (unless inside the step kernel); mamba2: in_proj; both: out_proj + residual
    # in one addmm; + the head
    fused_step = launched["_selective_step_dt_proj_kernel"] == n  # the fused kernel in every layer, or in none
    assert fused_step or launched["_selective_step_dt_proj_kernel"] == 0, launched
    if fused == "all":
        assert fused_step, launched
    if fused == "none" or (fused == "default" and DEVICE == "cpu"):  # "auto" off CUDA: the pair
        assert not fused_step, launched
    if preset == "mamba2":
        gemms = 1
    elif not fused_step:
        gemms = 2 + (0 if decode.TUNING["dt_rows"] else 1)  # in_proj, x_proj, dt_proj (unless in the step kernel)
    else:
        gemms = 2  # in_proj, x_proj
    assert ops["mm"] == gemms * n + 1 and ops["addmm"] == n and ops["add"] == 0, ops
    # nothing else but the embedding, the float32 logits and the aux-loss zero
    allowed = ("rms_norm", "mm", "addmm", "add", "embedding", "_to_copy", "zeros")
    others = {k: v for k, v in ops.items() if k not in allowed}
    assert not others, others
    assert ops["_to_copy"] <= 1, ops


# ------------------------------------------------------------------------------- native compile check

_LAUNCHED: list = []


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    """Under the interpreter, remember each kernel specialisation this file launches (see the last test)."""
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


def test_launched_decode_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects: lower every specialisation launched above (strided
    inputs, A_IS_LOG, bfloat16 models), and each again with programmatic dependent launch, to Triton IR for sm_90
    in a clean process."""
    from triton_compile import assert_launched_compile_for_sm90, with_constexpr

    assert_launched_compile_for_sm90(_LAUNCHED + with_constexpr(_LAUNCHED, "PDL", True))
