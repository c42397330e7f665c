"""Specification of the S4D ops: initialisations equal their published formulas, discretisations equal the
exact/trapezoidal solutions of the ODE, the fast kernel and FFT convolution equal the loops, and the
convolution mode equals the recurrent (decode) mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops.s4 import (
    fft_conv,
    hippo_legs,
    s4d_discretize,
    s4d_init,
    s4d_init_C,
    s4d_init_log_dt,
    s4d_kernel,
    s4d_step,
)

FAST = settings(max_examples=25, deadline=None)


def random_ssm(H, N, seed, kind="legs", dtype=torch.complex128):
    """log_dt (H,), A (H, N/2), C (H, N/2), D (H,) around the usual initialisation, perturbed per channel."""
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    log_dt = s4d_init_log_dt(H, generator=g).to(real)
    A = s4d_init(N, kind, H=H, dtype=dtype)
    A = A + torch.complex(-0.3 * torch.rand(A.shape, generator=g), 0.5 * torch.randn(A.shape, generator=g)).to(dtype)
    C = s4d_init_C(H, N // 2, generator=g, dtype=dtype)
    D = torch.randn(H, generator=g, dtype=real)
    return log_dt, A, C, D


# ---------------------------------------------------------------------------------------------------------
# initialisation


@pytest.mark.parametrize("N", [1, 2, 5, 8])
def test_hippo_legs_equals_published_formula(N):
    A, B = hippo_legs(N)
    for n in range(N):
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1), rel=1e-15)
        for k in range(N):
            if n > k:
                want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                want = -(n + 1)
            else:
                want = 0.0
            assert A[n, k].item() == pytest.approx(want, rel=1e-15, abs=0)


@pytest.mark.parametrize("N", [2, 8, 64])
def test_s4d_lin_equals_closed_form(N):
    A = s4d_init(N, "lin", dtype=torch.complex128)
    assert A.shape == (N // 2,)
    for n in range(N // 2):
        assert complex(A[n]) == pytest.approx(complex(-0.5, math.pi * n), rel=1e-14, abs=1e-14)


@pytest.mark.parametrize("N", [2, 8, 64])
def test_s4d_inv_equals_closed_form(N):
    A = s4d_init(N, "inv", dtype=torch.complex128)
    for n in range(N // 2):
        want = complex(-0.5, (N / math.pi) * (N / (2 * n + 1) - 1))
        assert complex(A[n]) == pytest.approx(want, rel=1e-14, abs=1e-14)


@pytest.mark.parametrize("N", [2, 4, 16, 64])
def test_s4d_legs_equals_eigenvalues_of_nplr_normal_part(N):
    # normal part of HiPPO-LegS (S4 Thm. 1): A + P Pᵀ with P_n = sqrt(n + 1/2), built element by element
    S = np.zeros((N, N))
    for n in range(N):
        for k in range(N):
            a = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (-(n + 1) if n == k else 0.0)
            S[n, k] = a + math.sqrt(n + 0.5) * math.sqrt(k + 0.5)
    eig = np.linalg.eigvals(S)
    eig = np.sort_complex(eig[eig.imag > 0])
    eig = eig[np.argsort(eig.imag)]
    A = s4d_init(N, "legs", dtype=torch.complex128).numpy()
    assert A.shape == (N // 2,)
    np.testing.assert_allclose(A.real, -0.5, atol=1e-12)
    np.testing.assert_allclose(A.imag, eig.imag, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eig.real, -0.5, atol=1e-8)  # the normal part's real parts are indeed -1/2


@pytest.mark.parametrize("kind", ["legs", "lin", "inv"])
def test_init_has_negative_real_parts_and_repeats_over_channels(kind):
    A = s4d_init(16, kind, H=3)
    assert A.shape == (3, 8) and A.dtype == torch.complex64
    assert (A.real < 0).all()
    assert (A == A[0]).all()


def test_init_C_and_log_dt():
    g = torch.Generator().manual_seed(0)
    C = s4d_init_C(64, 32, generator=g)
    assert C.shape == (64, 32) and C.dtype == torch.complex64
    assert C.abs().square().mean().item() == pytest.approx(1.0, abs=0.1)  # standard complex normal
    log_dt = s4d_init_log_dt(1000, 1e-3, 1e-1, generator=g)
    assert log_dt.min() >= math.log(1e-3) and log_dt.max() <= math.log(1e-1)


# ---------------------------------------------------------------------------------------------------------
# discretisation


def as_real_block(a: complex) -> torch.Tensor:
    """The complex scalar mode x' = a x as a 2x2 real system acting on (Re x, Im x)."""
    return torch.tensor([[a.real, -a.imag], [a.imag, a.real]], dtype=torch.float64)


def complex_scalar(a: complex) -> torch.Tensor:
    return torch.tensor([[a]], dtype=torch.complex128)  # (H=1, N2=1)


def expm_taylor(M: torch.Tensor) -> torch.Tensor:
    """Matrix exponential by scaling and squaring of a 30-term Taylor series (accurate to float64 rounding)."""
    squarings = max(0, math.ceil(math.log2(max(M.abs().sum(dim=1).max().item(), 1e-300) / 0.25)))
    X = M / 2**squarings
    term = E = torch.eye(M.shape[0], dtype=M.dtype)
    for k in range(1, 30):
        term = term @ X / k
        E = E + term
    for _ in range(squarings):
        E = E @ E
    return E


@pytest.mark.parametrize("a", [complex(-0.5, 3.0), complex(-2.0, 0.0), complex(-0.1, 40.0)])
@pytest.mark.parametrize("dt", [1e-3, 0.05, 0.7])
def test_zoh_equals_matrix_exponential_solution(a, dt):
    # Exact solution over one step with u held constant: exp([[M, b], [0, 0]] dt) = [[Ā, B̄], [0, 1]]
    M = as_real_block(a)
    aug = torch.zeros(3, 3, dtype=torch.float64)
    aug[:2, :2] = M
    aug[0, 2] = 1.0  # B = 1 (real input drives the real part)
    E = expm_taylor(aug * dt)
    dA, dB = s4d_discretize(torch.tensor([math.log(dt)], dtype=torch.float64), complex_scalar(a), "zoh")
    dA, dB = complex(dA[0, 0]), complex(dB[0, 0])
    torch.testing.assert_close(E[:2, :2], as_real_block(dA), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(E[:2, 2], torch.tensor([dB.real, dB.imag], dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [complex(-0.5, 3.0), complex(-2.0, 0.0), complex(-0.1, 40.0)])
@pytest.mark.parametrize("dt", [1e-3, 0.05, 0.7])
def test_bilinear_equals_trapezoidal_step(a, dt):
    # trapezoid rule: (x1 - x0)/dt = a (x0 + x1)/2 + u, solved as a real 2x2 linear system
    M = as_real_block(a)
    eye = torch.eye(2, dtype=torch.float64)
    x0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    u = 0.7
    x1 = torch.linalg.solve(eye - dt / 2 * M, (eye + dt / 2 * M) @ x0 + dt * u * torch.tensor([1.0, 0.0]).double())
    dA, dB = s4d_discretize(torch.tensor([math.log(dt)], dtype=torch.float64), complex_scalar(a), "bilinear")
    got = complex(dA[0, 0]) * complex(x0[0], x0[1]) + complex(dB[0, 0]) * u
    torch.testing.assert_close(torch.tensor([got.real, got.imag], dtype=torch.float64), x1, rtol=1e-12, atol=1e-12)


def test_zoh_and_bilinear_agree_to_third_order_for_small_steps():
    A = s4d_init(8, "lin", H=1, dtype=torch.complex128)
    for dt in (1e-2, 1e-3):
        log_dt = torch.tensor([math.log(dt)], dtype=torch.float64)
        dA_z, dB_z = s4d_discretize(log_dt, A, "zoh")
        dA_b, dB_b = s4d_discretize(log_dt, A, "bilinear")
        bound = 2 * (dt * A.abs()).pow(3).max().item()
        assert (dA_z - dA_b).abs().max().item() <= bound
        assert (dB_z - dB_b).abs().max().item() <= bound * dt / (dt * A.abs()).min().item()


# ---------------------------------------------------------------------------------------------------------
# kernel and convolution


@FAST
@given(
    H=st.integers(1, 3),
    N=st.sampled_from([2, 4, 8, 16]),
    L=st.integers(1, 64),
    kind=st.sampled_from(["legs", "lin", "inv"]),
    discretization=st.sampled_from(["zoh", "bilinear"]),
    seed=st.integers(0, 2**16),
)
def test_kernel_torch_matches_ref(H, N, L, kind, discretization, seed):
    log_dt, A, C, _ = random_ssm(H, N, seed, kind)
    K_ref = s4d_kernel(log_dt, A, C, L, discretization, backend="ref")
    K = s4d_kernel(log_dt, A, C, L, discretization, backend="torch")
    assert K.shape == (H, L) and K.dtype == torch.float64
    torch.testing.assert_close(K, K_ref, rtol=1e-9, atol=1e-9 * K_ref.abs().max().item())


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_kernel_float32_close_to_float64(discretization):
    log_dt, A, C, _ = random_ssm(4, 16, 0)
    K64 = s4d_kernel(log_dt, A, C, 256, discretization)
    K32 = s4d_kernel(log_dt.float(), A.to(torch.complex64), C.to(torch.complex64), 256, discretization)
    assert K32.dtype == torch.float32
    torch.testing.assert_close(K32.double(), K64, rtol=0, atol=1e-4 * K64.abs().max().item())


def test_kernel_gradients_flow_to_every_parameter():
    log_dt, A, C, _ = random_ssm(2, 4, 1)
    inputs = tuple(t.clone().requires_grad_() for t in (log_dt, A, C))
    assert torch.autograd.gradcheck(lambda a, b, c: s4d_kernel(a, b, c, 12, "zoh", backend="torch"), inputs)
    assert torch.autograd.gradcheck(lambda a, b, c: s4d_kernel(a, b, c, 12, "bilinear", backend="torch"), inputs)


@FAST
@given(
    Bsz=st.integers(1, 2),
    L=st.integers(1, 40),
    H=st.integers(1, 3),
    Lk=st.integers(1, 48),
    with_D=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fft_conv_torch_matches_ref(Bsz, L, H, Lk, with_D, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(Bsz, L, H, generator=g, dtype=torch.float64)
    k = torch.randn(H, Lk, generator=g, dtype=torch.float64)
    D = torch.randn(H, generator=g, dtype=torch.float64) if with_D else None
    y_ref = fft_conv(u, k, D, backend="ref")
    y = fft_conv(u, k, D, backend="torch")
    assert y.shape == (Bsz, L, H)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


def test_fft_conv_ref_is_the_causal_sum():
    u = torch.randn(2, 6, 3, dtype=torch.float64)
    k = torch.randn(3, 6, dtype=torch.float64)
    D = torch.randn(3, dtype=torch.float64)
    y = fft_conv(u, k, D, backend="ref")
    for t in range(6):
        want = sum(k[:, t - s] * u[:, s] for s in range(t + 1)) + D * u[:, t]
        torch.testing.assert_close(y[:, t], want, rtol=1e-12, atol=1e-12)


def test_fft_conv_gradients_match_ref_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 9, 2, generator=g, dtype=torch.float64)
    k = torch.randn(2, 9, generator=g, dtype=torch.float64)
    D = torch.randn(2, generator=g, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (u, k, D))
    assert torch.autograd.gradcheck(lambda a, b, c: fft_conv(a, b, c, backend="torch"), inputs)
    grads = {}
    for backend in ("ref", "torch"):
        leaves = [t.clone().requires_grad_() for t in (u, k, D)]
        fft_conv(*leaves, backend=backend).square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, b in zip(grads["ref"], grads["torch"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_fft_conv_bfloat16_within_bound():
    # bf16 input, fp32 kernel: the FFT runs in fp32, so the only large error is the final bf16 rounding.
    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 128, 8, generator=g).bfloat16()
    k = torch.randn(8, 128, generator=g) / 16
    y = fft_conv(u, k)
    assert y.dtype == torch.bfloat16
    want = fft_conv(u.double(), k.double(), backend="ref")
    assert (y.double() - want).abs().max().item() <= 2**-8 * want.abs().max().item() + 1e-4


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("kind", ["legs", "lin", "inv"])
def test_convolution_mode_equals_recurrent_mode(kind, discretization):
    H, N, L, Bsz = 3, 8, 50, 2
    log_dt, A, C, D = random_ssm(H, N, 5, kind)
    u = torch.randn(Bsz, L, H, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y_conv = fft_conv(u, s4d_kernel(log_dt, A, C, L, discretization), D)

    dA, dB = s4d_discretize(log_dt, A, discretization)
    state = torch.zeros(Bsz, H, N // 2, dtype=torch.complex128)
    y_rec = torch.stack([s4d_step(state, u[:, t], dA, dB, C, D) for t in range(L)], dim=1)
    torch.testing.assert_close(y_rec, y_conv, rtol=1e-9, atol=1e-9)


def test_step_in_float32_matches_float64_and_keeps_dtypes():
    log_dt, A, C, D = random_ssm(2, 8, 7, dtype=torch.complex64)
    dA, dB = s4d_discretize(log_dt, A)
    state = torch.zeros(1, 2, 4, dtype=torch.complex64)
    state64 = state.to(torch.complex128)
    for _ in range(20):
        u = torch.randn(1, 2)
        y = s4d_step(state, u.bfloat16(), dA, dB, C, D)
        dA64, dB64, C64 = (t.to(torch.complex128) for t in (dA, dB, C))
        y64 = s4d_step(state64, u.bfloat16().double(), dA64, dB64, C64, D.double())
        assert y.dtype == torch.bfloat16 and state.dtype == torch.complex64
        torch.testing.assert_close(y.double(), y64, rtol=2**-7, atol=2**-7 * y64.abs().max().item())


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_long_sequence_stays_finite(discretization):
    L = 16384
    log_dt, A, C, D = random_ssm(2, 64, 8, dtype=torch.complex64)
    K = s4d_kernel(log_dt, A, C, L, discretization)
    assert torch.isfinite(K).all()
    assert K[:, -64:].abs().max() < K[:, :64].abs().max()  # the kernel decays (Re A < 0)
    y = fft_conv(torch.randn(1, L, 2), K, D)
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------
# errors


def bad_calls():
    log_dt, A, C, D = random_ssm(2, 4, 0, dtype=torch.complex64)
    dA, dB = s4d_discretize(log_dt, A)
    u = torch.randn(1, 5, 2)
    state = torch.zeros(1, 2, 2, dtype=torch.complex64)
    yield "N", lambda: s4d_init(7, "legs")
    yield "N", lambda: s4d_init(0, "lin")
    yield "kind", lambda: s4d_init(8, "fourier")
    yield "dtype", lambda: s4d_init(8, "lin", dtype=torch.float32)
    yield "discretization", lambda: s4d_discretize(log_dt, A, "euler")
    yield "A", lambda: s4d_discretize(log_dt, A.real)
    yield "A", lambda: s4d_discretize(log_dt[:1], A)
    yield "log_dt", lambda: s4d_kernel(log_dt[None], A, C, 8)
    yield "C", lambda: s4d_kernel(log_dt, A, C[:, :1], 8)
    yield "L", lambda: s4d_kernel(log_dt, A, C, 0)
    yield "backend", lambda: s4d_kernel(log_dt, A, C, 8, backend="fast")
    yield "k", lambda: fft_conv(u, torch.randn(3, 5))
    yield "D", lambda: fft_conv(u, torch.randn(2, 5), torch.randn(3))
    yield "u", lambda: fft_conv(u[0], torch.randn(2, 5))
    yield "state", lambda: s4d_step(state.real, u[:, 0], dA, dB, C, D)
    yield "u", lambda: s4d_step(state, u[:, 0, :1], dA, dB, C, D)
    yield "dB", lambda: s4d_step(state, u[:, 0], dA, dB[:, :1], C, D)


@pytest.mark.parametrize("argument,call", list(bad_calls()))
def test_bad_inputs_raise_input_error_naming_the_argument(argument, call):
    with pytest.raises(InputError) as info:
        call()
    assert argument in str(info.value)


def test_triton_backend_is_unavailable_for_s4d_ops():
    log_dt, A, C, D = random_ssm(2, 4, 0, dtype=torch.complex64)
    with pytest.raises(BackendUnavailable):
        s4d_kernel(log_dt, A, C, 8, backend="triton")
    with pytest.raises(BackendUnavailable):
        fft_conv(torch.randn(1, 4, 2), torch.randn(2, 4), backend="triton")
