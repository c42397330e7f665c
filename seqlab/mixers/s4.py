"""S4D layer: a diagonal structured state space over every channel (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"; S4, Gu et al. 2022).

Each of the H = d_model channels is an independent single-input SSM with N/2 complex modes (one of each
conjugate pair; B = 1 folded into C)::

    x_t = Ā x_{t-1} + B̄ u_t,   y_t = 2 Re(C x_t) + D u_t        Ā, B̄ = discretize(Δ, A)   (ZOH or bilinear)
    out = out_proj(GELU(y)) -> GLU                                (the S4D block's position-wise output layer)

Training and prefill use the convolution form y = K * u + D u with K_l = 2 Re(C B̄ Ā^l) (``ops.s4d_kernel`` +
``ops.fft_conv``, O(L log L)); one-token decode uses the recurrence (``ops.s4d_step``). Prefill from a state
adds the state's contribution ``2 Re(C Ā^(t+1) x_0)`` to the outputs and returns the final state
``x_L = Ā^L x_0 + sum_s Ā^(L-1-s) B̄ u_s`` (a Vandermonde reduction), so chunked prefill is exact.

Parameters: ``log_dt (H,)`` uniform in [log dt_min, log dt_max]; ``A = -exp(log_A_real) + i A_imag`` (H, N/2)
initialised by ``s4d_init(kind)`` (legs | lin | inv); ``C`` complex ~ N(0, 1) stored as a real view
``(H, N/2, 2)``; ``D (H,)``. No residual: the model adds it.

Packed documents (``seq_idx``): each document runs its own FFT convolution (a Python loop over the documents
of each row, exact; packing is rare for S4 so this simple path is enough). The state feeds the first document of
a row and is left holding the last one's.

State: ``x (B, H, N/2)`` complex64 (float32 real and imaginary parts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers._init import no_weight_decay
from seqlab.mixers.base import MixerState, check_mixer_input
from seqlab.ops.s4 import fft_conv, s4d_discretize, s4d_init, s4d_kernel, s4d_step


class S4(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        init: str = "legs",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        discretization: str = "zoh",
    ):
        super().__init__()
        if d_state < 2 or d_state % 2:
            raise ConfigError(f"S4: s4_d_state must be even and >= 2, got {d_state}")
        if discretization not in ("zoh", "bilinear"):
            raise ConfigError(f"S4: s4_discretization must be 'zoh' or 'bilinear', got {discretization!r}")
        if not 0 < dt_min <= dt_max:
            raise ConfigError(f"S4: need 0 < s4_dt_min <= s4_dt_max, got {dt_min}, {dt_max}")
        H, N2 = d_model, d_state // 2
        self.d_model, self.d_state, self.discretization = d_model, d_state, discretization

        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt)
        A = s4d_init(d_state, kind=init, H=H)  # (H, N2) complex64
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        self.A_imag = nn.Parameter(A.imag.float().clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, N2, dtype=torch.complex64)).clone())  # (H, N2, 2)
        self.D = nn.Parameter(torch.randn(H))
        no_weight_decay(self.log_dt, self.log_A_real, self.A_imag)
        self.out_proj = nn.Linear(H, 2 * H)  # followed by GLU

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> S4:
        return cls(
            config.d_model,
            d_state=config.s4_d_state,
            init=config.s4_init,
            dt_min=config.s4_dt_min,
            dt_max=config.s4_dt_max,
            discretization=config.s4_discretization,
        )

    # ----------------------------------------------------------------------------------------------- state

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """Constant-size complex64 state; ``max_seqlen`` and ``dtype`` are ignored."""
        device = self.D.device if device is None else device
        return MixerState(x=torch.zeros(batch, self.d_model, self.d_state // 2, device=device, dtype=torch.complex64))

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 8 * batch * self.d_model * (self.d_state // 2)

    # --------------------------------------------------------------------------------------------- forward

    def _A(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())  # (H, N2)

    def _C(self) -> torch.Tensor:
        return torch.view_as_complex(self.C.float())  # (H, N2)

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_mixer_input(x, self.d_model)
        Bsz, L, _ = x.shape
        u = x.float()  # the SSM runs in float32 (complex64)
        log_dt, A, C, D = self.log_dt.float(), self._A(), self._C(), self.D.float()

        if state is not None and L == 1:  # decode: one recurrent step
            dA, dB = s4d_discretize(log_dt, A, self.discretization)
            y = s4d_step(state["x"], u[:, 0], dA, dB, C, D).unsqueeze(1)  # (B, 1, H)
        elif seq_idx is None:
            x0 = None if state is None else state["x"]
            y, xL = self._convolve(u, log_dt, A, C, D, x0, want_final=state is not None)
            if state is not None:
                state["x"].copy_(xL.detach())
        else:
            y = self._convolve_documents(u, log_dt, A, C, D, state, seq_idx)
        if state is not None:
            state.offset += L
        y = F.gelu(y).to(x.dtype)
        return F.glu(self.out_proj(y), dim=-1)

    def _convolve(self, u, log_dt, A, C, D, x0, want_final: bool):
        """u (B, L, H) float32 -> (y (B, L, H), final state (B, H, N2) or None), starting from x0 (or zero)."""
        L = u.shape[1]
        K = s4d_kernel(log_dt, A, C, L, self.discretization)  # (H, L)
        y = fft_conv(u, K, D)  # (B, L, H)
        if x0 is None and not want_final:
            return y, None
        dA, dB = s4d_discretize(log_dt, A, self.discretization)
        log_dA = torch.exp(log_dt).unsqueeze(-1) * A if self.discretization == "zoh" else torch.log(dA)  # (H, N2)
        powers = torch.exp(log_dA.unsqueeze(-1) * torch.arange(L + 1, device=u.device))  # (H, N2, L+1): Ā^j
        if x0 is not None:  # y_t += 2 Re(C Ā^(t+1) x_0)
            y = y + 2 * torch.einsum("bhn,hnl->blh", x0 * C, powers[..., 1:]).real
        xL = None
        if want_final:  # x_L = Ā^L x_0 + B̄ sum_s Ā^(L-1-s) u_s
            xL = dB * torch.einsum("blh,hnl->bhn", u.to(powers.dtype), powers[..., :L].flip(-1))
            if x0 is not None:
                xL = xL + powers[..., L] * x0
        return y, xL

    def _convolve_documents(self, u, log_dt, A, C, D, state, seq_idx):
        """Packed rows: one convolution per document; the state feeds each row's first document only."""
        Bsz, L, H = u.shape
        if tuple(seq_idx.shape) != (Bsz, L):
            raise InputError("seq_idx", f"shape ({Bsz}, {L})", f"shape {tuple(seq_idx.shape)}")
        starts = (seq_idx[:, 1:] != seq_idx[:, :-1]).cpu()
        rows = []
        for b in range(Bsz):
            bounds = [0, *(starts[b].nonzero().flatten() + 1).tolist(), L]
            pieces = []
            for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                first, last = i == 0, i == len(bounds) - 2
                x0 = state["x"][b : b + 1] if state is not None and first else None
                y, xL = self._convolve(u[b : b + 1, s:e], log_dt, A, C, D, x0, want_final=state is not None and last)
                pieces.append(y)
                if xL is not None:
                    state["x"][b : b + 1].copy_(xL.detach())
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0)
