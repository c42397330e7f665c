"""Mamba-1 block: the selective state-space layer of Gu & Dao 2023 ("Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", Sec. 3 and Fig. 3).

    x, z   = in_proj(u)                                  # (B, L, D) each, D = d_inner = expand * d_model
    x      = silu(conv1d(x))                              # depthwise causal, width d_conv
    dt, B, C = x_proj(x)                                  # (B, L, R), (B, L, N), (B, L, N), R = dt_rank
    delta  = softplus(dt_proj(dt))                        # (B, L, D), input-dependent step Δ
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t x_t     # A = -exp(A_log) (D, N), S4D-real init
    y      = (C_t h_t + D x_t) * silu(z)
    out    = out_proj(y)

Glossary: B batch, L length, D d_inner channels, N d_state, R dt_rank, W d_conv.
Parameter names and shapes follow the reference implementation (``in_proj``, ``conv1d.weight (D, 1, W)``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so checkpoints interoperate.

``bcdt_norm`` (Falcon Mamba): weightless RMSNorm over each of dt, B and C (their last dim) right after
``x_proj``, which keeps the scan stable at scale. ``bcdt_norm_weight`` (Jamba) gives those norms learnable
scales ``dt_norm.weight (R,)``, ``B_norm.weight (N,)``, ``C_norm.weight (N,)``; ``bcdt_norm_eps`` their eps.

State: ``conv (B, D, W-1)`` the last W-1 inputs of the convolution and ``ssm (B, D, N)``, both float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers import base as mixer_base
from seqlab.mixers._init import dt_bias_init, no_weight_decay
from seqlab.mixers.base import MixerState, check_mixer_input, project, recurrent_state_dtype
from seqlab.mixers.norm import RMSNorm, rms_norm
from seqlab.ops._common import triton_interpreting

# functions imported from their modules: ``seqlab.ops.selective_scan`` names both a module and a function
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.decode_linear import decode_linear, decode_linear_conv
from seqlab.ops.mamba_layer import layer_step_fits, mamba_layer_step
from seqlab.ops.mamba_step import dt_proj_step_choice, selective_step_dt_proj
from seqlab.ops.prefetch import prefetch_l2
from seqlab.ops.selective_scan import selective_scan, selective_state_update


def _nothing_to_join() -> None:
    """The join of a decode step whose in_proj ran on one stream."""


class Mamba(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        proj_bias: bool = False,
        bcdt_norm: bool = False,
        norm_eps: float = 1e-5,
        bcdt_norm_weight: bool = False,
        bcdt_norm_eps: float | None = None,
    ):
        super().__init__()
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank < 1:
            raise ConfigError(f"Mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        if d_conv < 2:
            raise ConfigError(f"Mamba: d_conv must be >= 2, got {d_conv}")
        self.d_model, self.d_state, self.d_conv, self.dt_rank = d_model, d_state, d_conv, dt_rank
        self.d_inner = expand * d_model
        self.bcdt_norm, self.norm_eps = bcdt_norm, norm_eps
        self.bcdt_norm_eps = norm_eps if bcdt_norm_eps is None else bcdt_norm_eps
        if bcdt_norm_weight and not bcdt_norm:
            raise ConfigError("Mamba: bcdt_norm_weight=True needs bcdt_norm=True")
        if bcdt_norm_weight:
            self.dt_norm, self.B_norm, self.C_norm = (
                RMSNorm(n, eps=self.bcdt_norm_eps) for n in (dt_rank, d_state, d_state)
            )
        else:
            self.dt_norm = self.B_norm = self.C_norm = None
        D = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * D, bias=proj_bias)
        self.conv1d = nn.Conv1d(D, D, d_conv, groups=D, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(D, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, D, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(D, dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True  # the model's generic init must keep this bias
        # S4D-real: A_n = -(n + 1) for every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(D, 1)  # (D, N)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(D))
        no_weight_decay(self.A_log, self.D)
        self.out_proj = nn.Linear(D, d_model, bias=proj_bias)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> Mamba:
        return cls(
            config.d_model,
            d_state=config.d_state,
            d_conv=config.d_conv,
            expand=config.expand,
            dt_rank=config.dt_rank,
            dt_min=config.dt_min,
            dt_max=config.dt_max,
            dt_init_floor=config.dt_init_floor,
            conv_bias=config.conv_bias,
            proj_bias=config.proj_bias,
            bcdt_norm=getattr(config, "bcdt_norm", False),
            norm_eps=getattr(config, "norm_eps", 1e-5),
            bcdt_norm_weight=getattr(config, "bcdt_norm_weight", False),
            bcdt_norm_eps=getattr(config, "bcdt_norm_eps", None),
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
            conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=sd),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=sd),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32,
                    state_dtype: torch.dtype | None = None) -> int:
        return recurrent_state_dtype(state_dtype).itemsize * batch * self.d_inner * (self.d_conv - 1 + self.d_state)

    # --------------------------------------------------------------------------------------------- forward

    def _split_x_proj(self, x: torch.Tensor, few_rows: bool = False):
        """x (..., D) -> dt (..., R), B (..., N), C (..., N), normalised when ``bcdt_norm``."""
        proj = project(self.x_proj, x, few_rows=few_rows)
        dt, B, C = proj.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_norm:
            scales = (None, None, None) if self.dt_norm is None else (self.dt_norm.weight, self.B_norm.weight,
                                                                      self.C_norm.weight)
            dt, B, C = (rms_norm(t, w, self.bcdt_norm_eps) for t, w in zip((dt, B, C), scales))
        return dt, B, C

    def _fused_step(self) -> bool:
        """The dt projection inside the step kernel (seqlab.ops.mamba_step): not with Falcon Mamba / Jamba's dt, B,
        C norms (they sit between x_proj and the step), nor with hooked or sharded projections."""
        plain = mixer_base.plain_linear
        wanted = mixer_base.FUSE_DECODE and mixer_base.FUSED_DECODE_KERNELS["dt_proj_step"]
        return wanted and not self.bcdt_norm and self.x_proj.bias is None and plain(self.x_proj) and \
            plain(self.dt_proj)

    def _step_kind(self, step_args: tuple) -> tuple[str, dict | None]:
        """("fused", tile) for selective_step_dt_proj or ("pair", None) for the dt GEMM + step kernel: as
        FUSED_DECODE_KERNELS["dt_proj_step"] says (True / False), or with "auto" whichever seqlab.ops.mamba_step
        timed faster for the shape."""
        if not self._fused_step():
            return "pair", None
        if mixer_base.FUSED_DECODE_KERNELS["dt_proj_step"] == "auto":
            return dt_proj_step_choice(*step_args)
        return "fused", None

    def _conv_in_proj(self) -> bool:
        """The decode step's conv inside the in_proj GEMM (seqlab.ops.decode_linear_conv, which times it against
        the two kernels): a plain in_proj without bias."""
        return mixer_base.FUSE_DECODE and self.in_proj.bias is None and mixer_base.plain_linear(self.in_proj)

    def decode_first_weights(self) -> tuple[torch.Tensor, ...]:
        """The weight a decode step reads first (in_proj's): what the layer before may prefetch."""
        return (self.in_proj.weight,)

    def _decode(self, state: MixerState, x: torch.Tensor, norm: nn.Module | None,
                prefetch: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """One token: x (B, d_model) -> y (B, D), states updated in place. On CUDA the step is in_proj (with the
        block's pre-norm and the conv step folded in where that is faster), x_proj, dt_proj and the step kernel,
        which forms A = -exp(A_log) itself; x, z, dt, B, C are strided views, never copied. ``prefetch``: weights
        the next layer reads first, prefetched into L2 as seqlab.mixers.base.DECODE_PREFETCH schedules."""
        schedule = mixer_base.decode_prefetch_schedule()
        u, z, join = self._decode_input(state, x, norm)
        self._prefetch_after_input(schedule, prefetch)
        dt, B, C = self._split_x_proj(u, few_rows=True)  # dt (B, R)
        join()  # z, where a second stream computed it
        step_args = (state["ssm"], u, dt, self.dt_proj.weight, self.dt_proj.bias, self.A_log, B, C, self.D, z)
        kind, tile = self._step_kind(step_args)
        if kind == "fused":
            y = selective_step_dt_proj(*step_args, config=tile)
        else:
            y = selective_state_update(state["ssm"], u, dt, self.A_log, B, C, self.D, z=z,
                                       dt_bias=self.dt_proj.bias, dt_softplus=True, A_is_log=True,
                                       dt_proj_weight=self.dt_proj.weight)
        if schedule == "split":
            prefetch_l2(*prefetch)
        return y

    def _decode_input(self, state: MixerState, x: torch.Tensor, norm: nn.Module | None):
        """(u (B, D) after the conv step, z (B, D), join): in_proj, the block's pre-norm and the conv step by the
        fastest route the settings allow; ``join()`` waits for z where a second stream computes it."""
        conv_weight = self.conv1d.weight.squeeze(1)  # (D, W)
        if self._z_branch(x):
            return self._input_with_z_branch(state, x, norm, conv_weight)
        if self._conv_in_proj():
            norm_args = None if norm is None else (norm.weight, norm.eps)
            u, z = decode_linear_conv(x, self.in_proj.weight, state["conv"], conv_weight, self.conv1d.bias,
                                      norm=norm_args)
        else:
            xs, z = project(self.in_proj, x, few_rows=True, norm=norm).chunk(2, dim=-1)
            u = conv_step(state["conv"], xs, conv_weight, self.conv1d.bias, activation="silu")
        return u, z, _nothing_to_join

    def _z_branch(self, x: torch.Tensor) -> bool:
        """in_proj as two GEMMs, z's on a second stream (seqlab.mixers.base.DECODE_BRANCHES): CUDA, a plain
        in_proj without bias, no autograd."""
        return (mixer_base.DECODE_BRANCHES["z"] and x.is_cuda and self.in_proj.bias is None
                and mixer_base.plain_linear(self.in_proj) and not torch.is_grad_enabled())

    def _input_with_z_branch(self, state: MixerState, x: torch.Tensor, norm: nn.Module | None,
                             conv_weight: torch.Tensor):
        """(u (B, D), z (B, D), join): the pre-norm, then the x half of in_proj with the conv step on this stream
        and the z half on the side stream; ``join()`` makes this stream wait for z. Memory is safe without
        record_stream: xn lives until after the join, and z is freed only after this stream's later work is queued,
        which the side stream's next fork waits for."""
        xn = x if norm is None else norm(x)
        w, d = self.in_proj.weight, self.d_inner
        main, side = torch.cuda.current_stream(x.device), mixer_base.side_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            z = decode_linear(xn, w[d:])
        u, _ = decode_linear_conv(xn, w[:d], state["conv"], conv_weight, self.conv1d.bias)
        return u, z, lambda: main.wait_stream(side)

    def _prefetch_after_input(self, schedule: str, prefetch: tuple[torch.Tensor, ...]) -> None:
        if schedule != "off":
            later = (self.x_proj.weight, self.dt_proj.weight, self.out_proj.weight)
            prefetch_l2(*later, *(prefetch if schedule == "early" else ()))

    def _layer_step(self, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module | None) -> bool:
        """Whether this decode step runs as one fused launch (seqlab.ops.mamba_layer): asked for
        (FUSED_DECODE_KERNELS["layer"]), CUDA (or the interpreter) without autograd, the residual being the input,
        plain bias-free projections, no dt/B/C norms, an RMSNorm pre-norm or none, and a layer the launch fits."""
        if not (mixer_base.FUSE_DECODE and mixer_base.FUSED_DECODE_KERNELS["layer"]) or torch.is_grad_enabled():
            return False
        if not (x.is_cuda or triton_interpreting()) or residual is not x or self.bcdt_norm:
            return False
        projections = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        if self.in_proj.bias is not None or self.out_proj.bias is not None or self.x_proj.bias is not None:
            return False
        if not all(mixer_base.plain_linear(p) and p.weight.dtype == x.dtype for p in projections):
            return False
        if norm is not None and not isinstance(norm, RMSNorm):
            return False
        return layer_step_fits(x.shape[0], self.d_model, self.d_inner, self.d_state, self.d_conv) is None

    def _decode_layer(self, state: MixerState, h: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """h (B, d_model) -> h + the layer's step (B, d_model), states updated in place, in one launch."""
        return mamba_layer_step(
            h, self.in_proj.weight, state["conv"], self.conv1d.weight.squeeze(1), self.conv1d.bias,
            self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, state["ssm"],
            self.out_proj.weight, norm_weight=None if norm is None else norm.weight,
            norm_eps=None if norm is None else norm.eps, backend="triton" if triton_interpreting() else "auto")

    # Block passes its residual stream in: the decode step then adds it inside the out_proj GEMM
    adds_residual = True
    fuses_norm = True  # Block passes its pre-norm in with a decode step
    takes_prefetch = True  # and the next layer's first weights (decode_first_weights), to prefetch

    def forward(
        self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None,
        residual: torch.Tensor | None = None, norm: nn.Module | None = None,
        prefetch: tuple[torch.Tensor, ...] = (),
    ) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model); ``residual`` (B, L, d_model), if given, is added to the output;
        ``norm`` (an RMSNorm), if given, is applied to x first (a decode step folds it into in_proj); ``prefetch``:
        weights the next layer's decode step reads first (see _decode)."""
        check_mixer_input(x, self.d_model)
        L = x.shape[1]
        if state is not None and L == 1 and self._layer_step(x, residual, norm):
            state.offset += 1
            return self._decode_layer(state, x[:, 0], norm).unsqueeze(1)
        if state is not None and L == 1:  # O(1) step
            y = self._decode(state, x[:, 0], norm, prefetch)  # (B, D)
            state.offset += 1
            return project(self.out_proj, y.unsqueeze(1), residual, few_rows=True)

        conv_weight = self.conv1d.weight.squeeze(1)  # (D, W)
        xs, z = project(self.in_proj, x, norm=norm).chunk(2, dim=-1)  # (B, L, D) each
        A = -torch.exp(self.A_log.float())  # (D, N)

        if state is None:
            xs = causal_conv1d(xs, conv_weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)
        else:
            xs, conv_final = causal_conv1d(
                xs, conv_weight, self.conv1d.bias, activation="silu", initial_state=state["conv"],
                return_final_state=True, seq_idx=seq_idx,
            )
        dt, B, C = self._split_x_proj(xs)  # (B, L, R), (B, L, N), (B, L, N)
        delta = F.linear(dt, self.dt_proj.weight)  # (B, L, D)
        out = selective_scan(
            xs, delta, A, B, C, self.D, z=z, delta_bias=self.dt_proj.bias, delta_softplus=True,
            initial_state=None if state is None else state["ssm"], return_final_state=state is not None,
            seq_idx=seq_idx,
        )
        if state is not None:
            y, ssm_final = out
            state["conv"].copy_(conv_final.detach())
            state["ssm"].copy_(ssm_final.detach())
            state.offset += L
        else:
            y = out
        return project(self.out_proj, y, residual)
