"""SSD Triton kernels: the shared C Bᵀ tile, and float32 gradients of A and dt under extreme step sizes.

Under TRITON_INTERPRET=1 on the CPU (``make test``), natively on a CUDA machine. References run in float64
(``seqlab.ops.ssd`` with backend="ref"). Tolerances: C Bᵀ to float32 rounding (1e-6); every output and gradient
within 1e-4 relative error (norm) as in tests/test_triton_kernels.py; under extreme steps dA per head within
1e-3 of its own magnitude (the in-chunk log decays reach -1e4, so float32 rounding of their differences alone
moves a decay by ~1e-3 relative), dt per head within 1e-5 and dt_bias per head within 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from triton_env import DEVICE, TRITON_MARKS  # noqa: E402
from triton_env import INTERPRET as _INTERPRET  # noqa: E402

pytestmark = TRITON_MARKS
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]
_LAUNCHED: list = []  # kernel specialisations launched under the interpreter, compiled by the last test


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def inputs(batch, seqlen, H, P, G, N, *, seed, raw_dt=None, docs=False):
    """x, dt, A, B, C, D, z, dt_bias, initial_state (float32) and seq_idx. raw_dt (H,): dt constant per head."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    x, z = r(batch, seqlen, H, P), r(batch, seqlen, H, P)
    dt = 0.5 * r(batch, seqlen, H) - 1.0 if raw_dt is None else raw_dt.expand(batch, seqlen, H).clone()
    A = -torch.exp(torch.rand(H, generator=gen) * math.log(16))
    B, C = r(batch, seqlen, G, N), r(batch, seqlen, G, N)
    D, bias, init = r(H), 0.1 * r(H), r(batch, H, P, N)
    seq_idx = None
    if docs:
        seq_idx = (torch.arange(seqlen) >= seqlen // 3).int() + (torch.arange(seqlen) >= seqlen // 2).int()
        seq_idx = seq_idx.expand(batch, seqlen).contiguous().to(DEVICE)
    return [t.to(DEVICE) for t in (x, dt, A, B, C, D, z, bias, init)], seq_idx


def gradients(ins, chunk, seq_idx, backend):
    """(y, final_state, {name: gradient}) of a fixed random linear functional of y and the final state."""
    from seqlab.ops.ssd import ssd

    leaves = [t.detach().clone().requires_grad_(True) for t in ins]
    x, dt, A, B, C, D, z, bias, init = leaves
    y, fin = ssd(x, dt, A, B, C, chunk_size=chunk, D=D, z=z, dt_bias=bias, initial_state=init,
                 return_final_state=True, seq_idx=seq_idx, backend=backend)
    gen = torch.Generator().manual_seed(2)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in (y, fin))
    return y, fin, dict(zip(NAMES, torch.autograd.grad(loss, leaves)))


def triton_and_reference(ins, chunk, seq_idx):
    """The Triton path on float32 inputs and the float64 reference on the same values."""
    return (gradients(ins, chunk, seq_idx, "triton"),
            gradients([t.double() for t in ins], chunk, seq_idx, "ref"))


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    from triton_compile import recording_launches

    with recording_launches(_LAUNCHED):
        yield


# ------------------------------------------------------------------------------------------- shared C Bᵀ


def test_chunk_cb_is_c_bt_per_chunk_and_group_and_zero_beyond_the_sequence():
    """cb[b, c, g, i, j] = C_{cT+i}·B_{cT+j} of group g; rows and columns past L are 0. N = 80 takes two N
    slices of 64, the second one partial."""
    from seqlab.ops.triton import ssd as tssd

    batch, L, G, N, T = 2, 40, 2, 80, 16
    gen = torch.Generator().manual_seed(3)
    B, C = (torch.randn(batch, L, G, N, generator=gen).to(DEVICE) for _ in range(2))
    nchunks = triton.cdiv(L, T)
    cb = tssd._chunk_cb(B, C, T, nchunks, True, _INTERPRET)
    pad = lambda t: torch.nn.functional.pad(t.double(), (0, 0, 0, 0, 0, nchunks * T - L))
    Bc, Cc = (pad(t).view(batch, nchunks, T, G, N) for t in (B, C))
    want = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)
    assert cb.shape == (batch, nchunks, G, T, T) and cb.dtype == torch.float32
    assert rel_err(cb, want) <= 1e-6
    assert (cb[:, -1, :, L - (nchunks - 1) * T:] == 0).all() and (cb[:, -1, :, :, L - (nchunks - 1) * T:] == 0).all()


@pytest.mark.parametrize("bwd_variant", ["split", "chunk"])
def test_ssd_triton_forming_c_bt_in_every_program_matches_ref(bwd_variant, monkeypatch):
    """TUNING["shared_cb"] = False, the A/B baseline: chunk_out (2 heads per program), dx and the backward chunk
    kernel form C Bᵀ themselves; 3 chunks with a partial last one, 2 heads per group, documents, states."""
    from seqlab.ops.triton import ssd as tssd

    monkeypatch.setattr(tssd, "TUNING", {"shared_cb": False, "bwd_variant": bwd_variant, "out_heads": 2,
                                         "bwd_dx_block_n": 16})
    ins, seq_idx = inputs(2, 45, 4, 16, 2, 32, seed=5, docs=True)
    (y, fin, g), (y_ref, fin_ref, g_ref) = triton_and_reference(ins, 16, seq_idx)
    for name, out, ref in [("y", y, y_ref), ("final_state", fin, fin_ref)] + [
            (f"grad {n}", g[n], g_ref[n]) for n in NAMES]:
        assert rel_err(out, ref) <= 1e-4, f"{name}: {rel_err(out, ref):.2e}"


# -------------------------------------------------------------------------------------- extreme step sizes

# softplus(dt + dt_bias) per head from ~1e-13 to 100, constant over positions (as benchmarks/gpu_check.py's
# extreme case draws it): decays that sit at 1 next to decays that underflow within one step
EXTREME_RAW_DT = torch.tensor([-30.0, -25.0, -14.0, -4.0, 0.5, 13.0, 50.0, 100.0])


@pytest.mark.parametrize("bwd_variant", ["split", "chunk"])
def test_dA_and_dt_gradients_under_extreme_steps_match_float64(bwd_variant, monkeypatch):
    """float32 dA per head matches the float64 reference to 1e-3 of its own size, though the true values span
    1e-34 to 1: summed as differences of near-equal totals, the step-13 head came out 100x too large with the
    wrong sign, and the ~1e-13-step heads as 0 (softplus rounded their steps to 0)."""
    from seqlab.ops.triton import ssd as tssd

    monkeypatch.setattr(tssd, "TUNING", {"bwd_variant": bwd_variant})
    ins, _ = inputs(1, 256, EXTREME_RAW_DT.numel(), 16, 1, 32, seed=0, raw_dt=EXTREME_RAW_DT)
    (_, _, g), (_, _, g_ref) = triton_and_reference(ins, 128, None)
    dA, dA_ref = g["A"].double().cpu(), g_ref["A"].cpu()
    # 1e-36: below float32's normal range a value carries no relative precision (the reference reaches 1e-200)
    bad = (dA - dA_ref).abs() > 1e-3 * dA_ref.abs() + 1e-36
    assert not bad.any(), f"dA per head {dA.tolist()} vs float64 {dA_ref.tolist()}"
    ddt, ddt_ref = g["dt"].double().cpu(), g_ref["dt"].cpu()  # (1, L, H)
    err = (ddt - ddt_ref).norm(dim=(0, 1)) / ddt_ref.norm(dim=(0, 1))
    assert (err <= 1e-5).all(), f"dt per head: relative errors {err.tolist()}"
    dbias, dbias_ref = g["dt_bias"].double().cpu(), g_ref["dt_bias"].cpu()
    err = (dbias - dbias_ref).abs() / dbias_ref.abs()
    assert (err <= 1e-5).all(), f"dt_bias per head: relative errors {err.tolist()}"
    assert all(torch.isfinite(g[n]).all() for n in NAMES)


def test_every_launched_kernel_compiles_for_sm90_front_end():
    """Lower every specialisation the tests above launched (shared_cb off included) to Triton IR for sm_90."""
    from triton_compile import assert_launched_compile_for_sm90

    assert_launched_compile_for_sm90(_LAUNCHED)
