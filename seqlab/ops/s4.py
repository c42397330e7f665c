"""Structured state spaces with a diagonal state matrix (S4D): initialisation, discretisation, kernel, convolution.

Papers: HiPPO (Gu et al. 2020), S4 "Efficiently Modeling Long Sequences with Structured State Spaces" (Gu et al.
2022), S4D "On the Parameterization and Initialization of Diagonal State Space Models" (Gu et al. 2022).

Glossary (S4D notation), per channel h of H independent single-input single-output SSMs::

    x'(t) = A x(t) + B u(t),   y(t) = C x(t) + D u(t)      continuous, A diagonal complex (N,)

    N      state size of the real SSM; S4D stores N2 = N // 2 modes, one of each conjugate pair, and takes
           2 Re(...) of every sum over modes, so the SSM stays real.
    A      (H, N2) complex, Re A < 0           B = 1 (folded into C, S4D Sec. 3)
    C      (H, N2) complex                     D (H,) real skip connection
    dt     step size Δ = exp(log_dt), log_dt (H,)
    dA, dB discrete Ā, B̄ (H, N2): x_k = Ā x_{k-1} + B̄ u_k,  y_k = 2 Re(C x_k) + D u_k
    K      (H, L) real convolution kernel K_l = 2 Re(sum_n C_n B̄_n Ā_n^l), y = K * u + D u

Training runs the convolution (``s4d_kernel`` then ``fft_conv``, O(L log L)); decoding runs the recurrence
(``s4d_step``, O(N) per token). Both give the same outputs.
"""

from __future__ import annotations

import math

import torch

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops._common import check_backend, check_dim, check_tensor

INIT_KINDS = ("legs", "lin", "inv")
DISCRETIZATIONS = ("zoh", "bilinear")


def _check_positive_int(name: str, value, expected: str = "a positive int") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(name, expected, repr(value))
    return value


def _check_complex(name: str, t: torch.Tensor) -> None:
    if not t.is_complex():
        raise InputError(name, "a complex tensor (one mode of each conjugate pair)", f"dtype {t.dtype}")


def _check_real(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.is_complex():
        raise InputError(name, "a real floating-point tensor", f"dtype {t.dtype}")


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


# ---------------------------------------------------------------------------------------------------------
# initialisation


def hippo_legs(N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS state matrix and input vector ``(A (N, N), B (N,))`` (HiPPO Thm. 2, sign as in S4 eq. 2)::

        A_nk = -sqrt(2n+1) sqrt(2k+1)  if n > k,   -(n+1)  if n = k,   0  if n < k
        B_n  =  sqrt(2n+1)
    """
    _check_positive_int("N", N)
    n = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * n + 1)  # (N,)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(n + 1)  # (N, N)
    return A.to(dtype), r.to(dtype)


def hippo_legs_nplr(N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal-plus-low-rank split of HiPPO-LegS (S4 Thm. 1): ``A = S - P Pᵀ`` with ``P_n = sqrt(n + 1/2)``.

    Returns ``(S (N, N), P (N,))`` in float64, where ``S = A + P Pᵀ = -I/2 + (skew-symmetric)`` is normal.
    """
    A, _ = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)  # (N,)
    return A + P[:, None] * P[None, :], P


def s4d_init(N: int, kind: str = "legs", H: int | None = None, dtype: torch.dtype = torch.complex64) -> torch.Tensor:
    """Diagonal state matrix ``A (N//2,)`` complex, or ``(H, N//2)`` when ``H`` is given (same row repeated).

    - ``"legs"`` (S4D-LegS): the eigenvalues of the normal part ``S = A + P Pᵀ`` of HiPPO-LegS (S4 Thm. 1),
      ``-1/2 + i ω`` with ``i ω`` the eigenvalues of its skew-symmetric part; the N/2 with ω > 0, ascending.
    - ``"lin"`` (S4D-Lin, S4D Sec. 4): ``A_n = -1/2 + i π n``.
    - ``"inv"`` (S4D-Inv, S4D Sec. 4): ``A_n = -1/2 + i (N/π) (N/(2n+1) - 1)``.
    """
    _check_positive_int("N", N)
    if N % 2:
        raise InputError("N", "an even state size (S4D keeps one mode of each of N/2 conjugate pairs)", N)
    if kind not in INIT_KINDS:
        raise InputError("kind", f"one of {INIT_KINDS}", repr(kind))
    if H is not None:
        _check_positive_int("H", H)
    if not dtype.is_complex:
        raise InputError("dtype", "a complex dtype (torch.complex64 or torch.complex128)", dtype)
    N2 = N // 2
    n = torch.arange(N2, dtype=torch.float64)
    if kind == "lin":
        imag = math.pi * n
    elif kind == "inv":
        imag = (N / math.pi) * (N / (2 * n + 1) - 1)
    else:
        S, _ = hippo_legs_nplr(N)
        skew = S + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric: eigenvalues ±iω
        omega = torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))  # Hermitian, real ω ascending
        imag = omega[N - N2 :]  # the N/2 with positive imaginary part
    A = torch.complex(torch.full((N2,), -0.5, dtype=torch.float64), imag.to(torch.float64))
    if H is not None:
        A = A.expand(H, N2).clone()
    return A.to(dtype)


def s4d_init_C(H: int, N2: int, generator: torch.Generator | None = None, dtype=torch.complex64) -> torch.Tensor:
    """Output projection ``C (H, N2)`` ~ standard complex normal (S4D Sec. 4; input projection B = 1)."""
    _check_positive_int("H", H)
    _check_positive_int("N2", N2)
    return torch.randn(H, N2, generator=generator, dtype=dtype)


def s4d_init_log_dt(
    H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``log_dt (H,)`` uniform in [log dt_min, log dt_max] (the S4/S4D default step-size range)."""
    _check_positive_int("H", H)
    if not 0 < dt_min <= dt_max:
        raise InputError("dt_min, dt_max", "0 < dt_min <= dt_max", (dt_min, dt_max))
    u = torch.rand(H, generator=generator, dtype=torch.float64)
    return (math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))).float()


# ---------------------------------------------------------------------------------------------------------
# discretisation and kernel


def _check_ssm(log_dt: torch.Tensor, A: torch.Tensor, discretization: str) -> tuple[int, int]:
    check_tensor("log_dt", log_dt, ("H",))
    _check_real("log_dt", log_dt)
    check_tensor("A", A, ("H", "N2"), device=log_dt.device, complex_ok=True)
    _check_complex("A", A)
    check_dim("A", A, 0, log_dt.shape[0], "H, the size of log_dt")
    if discretization not in DISCRETIZATIONS:
        raise InputError("discretization", f"one of {DISCRETIZATIONS}", repr(discretization))
    return A.shape


def s4d_discretize(log_dt: torch.Tensor, A: torch.Tensor, discretization: str = "zoh"):
    """Discrete ``(dA, dB)``, each ``(H, N2)`` complex, for step ``dt = exp(log_dt)`` and B = 1 (S4D Sec. 2).

    ZOH:       Ā = exp(Δ A),                 B̄ = (exp(Δ A) - 1) / A
    bilinear:  Ā = (1 + Δ A/2) / (1 - Δ A/2), B̄ = Δ / (1 - Δ A/2)
    """
    _check_ssm(log_dt, A, discretization)
    dt = torch.exp(log_dt).to(A.dtype).unsqueeze(-1)  # (H, 1)
    dtA = dt * A  # (H, N2)
    if discretization == "zoh":
        dA = torch.exp(dtA)
        dB = (dA - 1) / A
    else:
        denom = 1 - dtA / 2
        dA = (1 + dtA / 2) / denom
        dB = dt / denom
    return dA, dB


def s4d_kernel(
    log_dt: torch.Tensor,
    A: torch.Tensor,
    C: torch.Tensor,
    L: int,
    discretization: str = "zoh",
    backend: str = "auto",
) -> torch.Tensor:
    """Convolution kernel ``K (H, L)`` real: ``K_l = 2 Re(sum_n C_n B̄_n Ā_n^l)`` (S4D Sec. 3).

    ``torch`` evaluates the Vandermonde product ``sum_n w_n Ā_n^l`` as one batched matmul of two
    O(sqrt L) power tables (autograd; memory O(H N2 sqrt L + H L)); ``ref`` multiplies by Ā once per step.
    The result is float64 for complex128 inputs, else float32.
    """
    check_backend(backend)
    H, N2 = _check_ssm(log_dt, A, discretization)
    check_tensor("C", C, (H, N2), device=A.device, complex_ok=True)
    _check_complex("C", C)
    _check_positive_int("L", L, "a positive int sequence length")
    if backend == "triton":
        raise BackendUnavailable("s4d_kernel: no Triton kernel; use backend='torch' (the Vandermonde product)")
    if backend == "ref":
        return s4d_kernel_ref(log_dt, A, C, L, discretization)
    return s4d_kernel_torch(log_dt, A, C, L, discretization)


def s4d_kernel_ref(log_dt, A, C, L, discretization="zoh"):
    """K_l by repeated multiplication: w <- C B̄, then K_l = 2 Re(sum w), w <- w Ā."""
    dA, dB = s4d_discretize(log_dt, A, discretization)
    w = C.to(dA.dtype) * dB  # (H, N2)
    taps = []
    for _ in range(L):
        taps.append(2 * w.sum(dim=-1).real)  # (H,)
        w = w * dA
    return torch.stack(taps, dim=-1)  # (H, L)


def _powers(log_dA: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re, Im) of ``Ā^e = exp(e log Ā)``, each (H, N2, E), in real arithmetic (complex exp is slow on CPU)."""
    magnitude = torch.exp(log_dA.real.unsqueeze(-1) * exponents)
    phase = log_dA.imag.unsqueeze(-1) * exponents
    return magnitude * torch.cos(phase), magnitude * torch.sin(phase)


def s4d_kernel_torch(log_dt, A, C, L, discretization="zoh"):
    """Vandermonde product K = 2 Re((C B̄) · [Ā_n^l]_{n,l}), factored so no (H, N2, L) tensor is formed.

    Write l = q R + r with R = ceil(sqrt(L)): Ā^l = (Ā^R)^q Ā^r, so
    ``K[h, q, r] = 2 Re(sum_n (Ā_n^R)^q · C_n B̄_n Ā_n^r)``, one batched real matmul over (Re, Im) of two
    (H, N2, ~sqrt L) power tables. Powers are ``exp(l log Ā)``: exact for ZOH (log Ā = Δ A); for bilinear any
    branch of the log gives the same integer powers.
    """
    dA, dB = s4d_discretize(log_dt, A, discretization)
    if discretization == "zoh":
        log_dA = torch.exp(log_dt).to(A.dtype).unsqueeze(-1) * A  # (H, N2), exactly Δ A
    else:
        log_dA = torch.log(dA)
    real = _real_dtype(dA.dtype)
    R = math.isqrt(L - 1) + 1  # ceil(sqrt(L)) for L >= 1
    Q = -(-L // R)
    w = (C.to(dA.dtype) * dB).unsqueeze(-1)  # (H, N2, 1)
    p_re, p_im = _powers(log_dA, torch.arange(R, device=A.device, dtype=real))  # Ā^r: (H, N2, R)
    inner_re = w.real * p_re - w.imag * p_im  # C B̄ Ā^r
    inner_im = w.real * p_im + w.imag * p_re
    outer_re, outer_im = _powers(log_dA, torch.arange(Q, device=A.device, dtype=real) * R)  # Ā^(qR): (H, N2, Q)
    # Re(sum_n a_n b_n) = [Re a, -Im a] · [Re b, Im b]: one real matmul with inner dimension 2 N2
    lhs = torch.cat([outer_re, -outer_im], dim=1).transpose(1, 2)  # (H, Q, 2 N2)
    rhs = torch.cat([inner_re, inner_im], dim=1)  # (H, 2 N2, R)
    K = 2 * torch.bmm(lhs, rhs)  # (H, Q, R)
    return K.reshape(K.shape[0], Q * R)[:, :L]  # (H, L)


# ---------------------------------------------------------------------------------------------------------
# convolution mode and recurrent mode


def fft_conv(
    u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Causal convolution per channel: ``y_t = sum_{s<=t} k_{t-s} u_s + D u_t``.

    ``u (B, L, H)``, ``k (H, Lk)`` (taps beyond Lk are zero; taps beyond L are unused), ``D (H,)``.
    Returns ``y (B, L, H)`` in the dtype of ``u``; computes in float32 (float64 for float64 inputs).
    ``torch``: FFTs of length 2L (zero padding, so no circular wrap-around); ``ref``: direct O(L^2) sum.
    """
    check_backend(backend)
    check_tensor("u", u, ("B", "L", "H"))
    _check_real("u", u)
    check_tensor("k", k, ("H", "Lk"), device=u.device)
    _check_real("k", k)
    H = u.shape[-1]
    check_dim("k", k, 0, H, "H, the channels of u")
    check_tensor("D", D, (H,), optional=True, device=u.device)
    _check_real("D", D)
    if u.shape[1] < 1 or k.shape[1] < 1:
        raise InputError("u, k", "at least one position and one tap", f"shapes {tuple(u.shape)}, {tuple(k.shape)}")
    if backend == "triton":
        raise BackendUnavailable("fft_conv: no Triton kernel; use backend='torch' (FFT convolution)")
    if backend == "ref":
        return fft_conv_ref(u, k, D)
    return fft_conv_torch(u, k, D)


def _conv_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def fft_conv_ref(u, k, D=None):
    """Direct sum over the past, one output position at a time."""
    dtype = _conv_dtype(u, k, D)
    L = u.shape[1]
    us, ks = u.to(dtype), k.to(dtype)
    ys = []
    for t in range(L):
        taps = min(t + 1, ks.shape[1])
        past = us[:, t - taps + 1 : t + 1]  # (B, taps, H): u_{t-taps+1} .. u_t
        kernel = ks[:, :taps].flip(-1).T  # (taps, H): k_{taps-1} .. k_0
        ys.append((past * kernel).sum(dim=1))  # (B, H)
    y = torch.stack(ys, dim=1)  # (B, L, H)
    if D is not None:
        y = y + D.to(dtype) * us
    return y.to(u.dtype)


def fft_conv_torch(u, k, D=None):
    """FFT convolution: zero-pad u and k to 2L so the circular convolution equals the linear one on [0, L)."""
    dtype = _conv_dtype(u, k, D)
    L = u.shape[1]
    n = 2 * L
    us = u.to(dtype)
    u_f = torch.fft.rfft(us, n=n, dim=1)  # (B, L+1, H)
    k_f = torch.fft.rfft(k[:, :L].to(dtype), n=n, dim=-1)  # (H, L+1)
    y = torch.fft.irfft(u_f * k_f.T, n=n, dim=1)[:, :L]  # (B, L, H)
    if D is not None:
        y = y + D.to(dtype) * us
    return y.to(u.dtype)


def s4d_step(
    state: torch.Tensor,
    u: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One recurrent step: ``x <- Ā x + B̄ u``, ``y = 2 Re(sum_n C_n x_n) + D u``.

    ``state (B, H, N2)`` complex, updated in place; ``u (B, H)`` real; ``dA, dB, C (H, N2)`` complex (from
    ``s4d_discretize``); ``D (H,)``. Returns ``y (B, H)`` in the dtype of ``u``.
    """
    check_tensor("state", state, ("B", "H", "N2"), complex_ok=True)
    _check_complex("state", state)
    Bsz, H, N2 = state.shape
    check_tensor("u", u, (Bsz, H), device=state.device)
    _check_real("u", u)
    for name, t in (("dA", dA), ("dB", dB), ("C", C)):
        check_tensor(name, t, (H, N2), device=state.device, complex_ok=True)
        _check_complex(name, t)
    check_tensor("D", D, (H,), optional=True, device=state.device)
    _check_real("D", D)

    real = _real_dtype(state.dtype)
    ur = u.to(real)
    state.mul_(dA.to(state.dtype)).add_(dB.to(state.dtype) * ur.unsqueeze(-1))
    y = 2 * (C.to(state.dtype) * state).sum(dim=-1).real  # (B, H)
    if D is not None:
        y = y + D.to(real) * ur
    return y.to(u.dtype)
