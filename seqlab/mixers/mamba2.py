"""Mamba-2 block: the state-space-duality (SSD) layer of Dao & Gu 2024 ("Transformers are SSMs", Sec. 7, Fig. 6).

    z, xBC, dt = in_proj(u)                          # (B, L, D), (B, L, D + 2 G N), (B, L, H)
    x, B, C    = silu(conv1d(xBC))                   # depthwise causal over x, B and C together
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t         # Δ = softplus(dt + dt_bias), A = -exp(A_log) scalar per head
    y_t = h_t C_t + D x_t                            # per head: x (P,), h (P, N)
    out = out_proj(RMSNorm(y * silu(z)))             # gated RMSNorm, normalised per group

Glossary: B batch, L length, D d_inner = expand * d_model, H nheads = D / P, P headdim, G ngroups (heads share
B and C within a group), N d_state. Parameter names follow the reference implementation (``in_proj``,
``conv1d.weight (D + 2 G N, 1, W)``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``).

State: ``conv (B, D + 2 G N, W-1)`` and ``ssm (B, H, P, N)``, both float32.
"""

from __future__ import annotations

import torch
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers._init import dt_bias_init, no_weight_decay
from seqlab.mixers.base import MixerState, check_mixer_input, project, recurrent_state_dtype
from seqlab.mixers.norm import GatedRMSNorm

# functions imported from their modules: ``seqlab.ops.ssd`` names both a module and a function
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.ssd import ssd, ssd_state_update


class Mamba2(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        d_inner = expand * d_model
        if headdim < 1 or d_inner % headdim:
            raise ConfigError(
                f"Mamba2: d_inner = expand * d_model = {d_inner} must be divisible by ssd_headdim={headdim}"
            )
        nheads = d_inner // headdim
        if ngroups < 1 or nheads % ngroups:
            raise ConfigError(f"Mamba2: ssd_ngroups={ngroups} must divide nheads = d_inner / headdim = {nheads}")
        if d_conv < 2:
            raise ConfigError(f"Mamba2: d_conv must be >= 2, got {d_conv}")
        self.d_model, self.d_inner, self.d_state, self.d_conv = d_model, d_inner, d_state, d_conv
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias)
        self.dt_bias = nn.Parameter(dt_bias_init(nheads, dt_min, dt_max, dt_init_floor))
        lo, hi = A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(nheads))
        no_weight_decay(self.dt_bias, self.A_log, self.D)
        self.norm = GatedRMSNorm(d_inner, eps=norm_eps, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=proj_bias)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> Mamba2:
        return cls(
            config.d_model,
            d_state=config.ssd_d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            headdim=config.ssd_headdim,
            ngroups=config.ssd_ngroups,
            chunk_size=config.ssd_chunk_size,
            dt_min=config.dt_min,
            dt_max=config.dt_max,
            dt_init_floor=config.dt_init_floor,
            conv_bias=config.conv_bias,
            proj_bias=config.proj_bias,
            norm_eps=getattr(config, "norm_eps", 1e-5),
        )

    # ----------------------------------------------------------------------------------------------- state

    takes_state_dtype = True

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None,
                       state_dtype: torch.dtype | None = None) -> MixerState:
        """Constant-size state; ``max_seqlen`` and ``dtype`` are ignored. ``state_dtype``: float32 (default) or a
        16-bit float for the conv and SSM states (the steps compute in float32 and round once per token)."""
        sd = recurrent_state_dtype(state_dtype)
        device = self.A_log.device if device is None else device
        return MixerState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=sd),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=sd),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32,
                    state_dtype: torch.dtype | None = None) -> int:
        itemsize = recurrent_state_dtype(state_dtype).itemsize
        return itemsize * batch * (self.conv_dim * (self.d_conv - 1) + self.nheads * self.headdim * self.d_state)

    # --------------------------------------------------------------------------------------------- forward

    adds_residual = True  # Block passes its residual stream in (added inside the decode step's out_proj GEMM)
    fuses_norm = True  # Block passes its pre-norm in with a decode step

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None,
        residual: torch.Tensor | None = None, norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model); ``residual`` (B, L, d_model), if given, is added to the output;
        ``norm`` (an RMSNorm), if given, is applied to x first (a decode step folds it into in_proj)."""
        check_mixer_input(x, self.d_model)
        Bsz, L, _ = x.shape
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        decode = state is not None and L == 1
        conv_weight = self.conv1d.weight.squeeze(1)  # (conv_dim, W)
        zxbcdt = project(self.in_proj, x, few_rows=decode, norm=norm)
        z, xBC, dt = zxbcdt.split([self.d_inner, self.conv_dim, H], dim=-1)

        if decode:  # O(1) step
            # strided views into the kernels, A = -exp(A_log) and the gate y * silu(z) inside the step kernel
            # (GatedRMSNorm(y, z) = RMSNorm(y * silu(z))), so the step launches no copies or elementwise ops
            xBC = conv_step(state["conv"], xBC[:, 0], conv_weight, self.conv1d.bias, activation="silu")
            xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
            y = ssd_state_update(
                state["ssm"], xs.view(Bsz, H, P), dt[:, 0], self.A_log, B.view(Bsz, G, N), C.view(Bsz, G, N),
                D=self.D, z=z[:, 0].view(Bsz, H, P), dt_bias=self.dt_bias, dt_softplus=True, A_is_log=True,
            )  # (B, H, P), gated
            state.offset += 1
            return project(self.out_proj, self.norm(y.view(Bsz, 1, self.d_inner)), residual, few_rows=True)
        A = -torch.exp(self.A_log.float())  # (H,)
        if state is None:
            xBC = causal_conv1d(xBC, conv_weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)
        else:
            xBC, conv_final = causal_conv1d(
                xBC, conv_weight, self.conv1d.bias, activation="silu", initial_state=state["conv"],
                return_final_state=True, seq_idx=seq_idx,
            )
        xs, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        out = ssd(
            xs.reshape(Bsz, L, H, P), dt, A, B.reshape(Bsz, L, G, N), C.reshape(Bsz, L, G, N),
            chunk_size=self.chunk_size, D=self.D, z=None, dt_bias=self.dt_bias, dt_softplus=True,
            initial_state=None if state is None else state["ssm"], return_final_state=state is not None,
            seq_idx=seq_idx,
        )  # (B, L, H, P)
        if state is not None:
            out, ssm_final = out
            state["conv"].copy_(conv_final.detach())
            state["ssm"].copy_(ssm_final.detach())
            state.offset += L
        y = out.reshape(Bsz, L, self.d_inner)
        return project(self.out_proj, self.norm(y, z), residual)
