"""Griffin / RecurrentGemma recurrent block with the Real-Gated Linear Recurrent Unit (De et al. 2024, "Griffin",
Sec. 2.4, Fig. 2).

    y      = gelu(x W_y)                                   # gate branch (B, L, D)
    x      = conv1d(x W_x)                                 # depthwise causal, width d_conv (4)
    r_t    = σ(x_t W_a + b_a),  i_t = σ(x_t W_x' + b_x')   # recurrence and input gates
    log a_t = -c r_t softplus(-Λ)                          # a_t = σ(Λ)^(c r_t), c = 8, computed in log space
    h_t    = a_t ⊙ h_{t-1} + sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t)
    out    = out_proj(y ⊙ h)

Glossary: D = lru_width (default d_model), Λ = ``a_param`` (D,) initialised so that a^c is uniform in [0.9, 0.999]
(Sec. 2.4). The RG-LRU is a diagonal recurrence, run through ``seqlab.ops.selective_scan`` with N = 1: with
A = -1, delta_t = c r_t softplus(-Λ) = -log a_t, B = C = 1 and u_t = sqrt(1 - a_t²) i_t x_t / delta_t, the scan's
h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t is exactly the RG-LRU (delta_t > 0 always, since r_t, softplus > 0).

Defaults differ from RecurrentGemma; config options give its exact block: ``lru_heads`` > 1 makes the gates
W_a, W_x' block-diagonal (one block per head), ``lru_reset_input`` skips the sqrt(1 - a²) factor at a document's
first token, ``lru_bias`` adds biases to linear_x, linear_y, out_proj and ``lru_act="gelu_tanh"`` is its gelu.

State: ``conv (B, D, d_conv - 1)`` and ``rnn (B, D, 1)``, float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers.base import MixerState
from seqlab.mixers.mlp import activation_fn
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.selective_scan import selective_scan, selective_state_update

RG_LRU_C = 8.0


def a_param_init(width: int, lo: float = 0.9, hi: float = 0.999) -> torch.Tensor:
    """Λ (width,) with σ(Λ)^c uniform in [lo, hi] (Griffin, Sec. 2.4)."""
    a = torch.empty(width).uniform_(lo, hi).pow(1.0 / RG_LRU_C)  # σ(Λ)
    return torch.log(a) - torch.log1p(-a)  # logit


class BlockDiagonalLinear(nn.Module):
    """``x (..., H * b) -> (..., H * b)``: H independent (b, b) linears with bias; ``weight (H, b, b)`` acts as
    ``x_h @ weight[h]`` (RecurrentGemma's gate layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if heads < 1 or width % heads:
            raise ConfigError(f"GriffinRecurrent: lru_heads={heads} must divide lru_width={width}")
        self.heads, self.block = heads, width // heads
        self.weight = nn.Parameter(torch.randn(heads, self.block, self.block) / self.block**0.5)
        self.bias = nn.Parameter(torch.zeros(heads, self.block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xh = x.reshape(*x.shape[:-1], self.heads, self.block)  # (..., H, b)
        y = torch.einsum("...hi,hij->...hj", xh, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"width={self.heads * self.block}, heads={self.heads}"


class GriffinRecurrent(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: Griffin's recurrent block."""

    def __init__(self, d_model: int, lru_width: int | None = None, d_conv: int = 4, act: str = "gelu",
                 bias: bool = False, heads: int = 1, reset_input: bool = False):
        super().__init__()
        width = d_model if lru_width is None else lru_width
        if width < 1:
            raise ConfigError(f"GriffinRecurrent: lru_width must be >= 1, got {width}")
        if d_conv < 2:
            raise ConfigError(f"GriffinRecurrent: d_conv must be >= 2, got {d_conv}")
        self.d_model, self.width, self.d_conv = d_model, width, d_conv
        self.act = activation_fn(act, "lru_act")
        self.reset_input = reset_input
        self.linear_y = nn.Linear(d_model, width, bias=bias)
        self.linear_x = nn.Linear(d_model, width, bias=bias)
        self.conv1d = nn.Conv1d(width, width, d_conv, groups=width, padding=d_conv - 1, bias=True)
        if heads == 1:
            self.gate_a, self.gate_x = nn.Linear(width, width), nn.Linear(width, width)
        else:
            self.gate_a, self.gate_x = BlockDiagonalLinear(width, heads), BlockDiagonalLinear(width, heads)
        self.a_param = nn.Parameter(a_param_init(width))
        self.a_param._no_weight_decay = True
        self.out_proj = nn.Linear(width, d_model, bias=bias)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> GriffinRecurrent:
        return cls(config.d_model, lru_width=config.lru_width, d_conv=config.d_conv,
                   act=getattr(config, "lru_act", "gelu"), bias=getattr(config, "lru_bias", False),
                   heads=getattr(config, "lru_heads", 1), reset_input=getattr(config, "lru_reset_input", False))

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """Constant-size float32 state; ``max_seqlen`` and ``dtype`` are ignored."""
        device = self.a_param.device if device is None else device
        return MixerState(
            conv=torch.zeros(batch, self.width, self.d_conv - 1, device=device, dtype=torch.float32),
            rnn=torch.zeros(batch, self.width, 1, device=device, dtype=torch.float32),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * self.width * self.d_conv

    def _lru_inputs(self, xc: torch.Tensor, starts: torch.Tensor | None = None):
        """xc (..., D) -> (u, delta) of the N = 1 selective scan that computes the RG-LRU (module docstring);
        ``starts`` (...) bool marks documents' first tokens, where ``reset_input`` leaves the input unscaled."""
        r = torch.sigmoid(self.gate_a(xc)).float()
        i = torch.sigmoid(self.gate_x(xc)).float()
        delta = RG_LRU_C * r * F.softplus(-self.a_param.float())  # -log a_t > 0
        multiplier = torch.sqrt(-torch.expm1(-2.0 * delta))  # sqrt(1 - a_t²)
        if self.reset_input and starts is not None:
            multiplier = torch.where(starts[..., None], torch.ones_like(multiplier), multiplier)
        return multiplier * i * xc.float() / delta, delta

    def _starts(self, Bsz: int, L: int, offset: int, seq_idx: torch.Tensor | None, device) -> torch.Tensor | None:
        """(B, L) bool: first tokens of documents (position 0 of a fresh sequence, or a seq_idx change)."""
        if not self.reset_input:
            return None
        starts = torch.zeros(Bsz, L, dtype=torch.bool, device=device)
        if seq_idx is not None:
            starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        if offset == 0:
            starts[:, 0] = True
        return starts

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise InputError("x", f"a (B, L, {self.d_model}) tensor", f"shape {tuple(x.shape)}")
        Bsz, L, _ = x.shape
        y = self.act(self.linear_y(x))  # (B, L, D)
        xb = self.linear_x(x)  # (B, L, D)
        weight = self.conv1d.weight.squeeze(1)  # (D, W)
        A = -torch.ones(self.width, 1, device=x.device)  # (D, 1)
        if state is not None and L == 1:  # decode: one step of the conv and of the recurrence
            xc = conv_step(state["conv"], xb[:, 0], weight, self.conv1d.bias)  # (B, D)
            u, delta = self._lru_inputs(xc, self._starts(Bsz, 1, state.offset, None, x.device)[:, 0]
                                        if self.reset_input else None)
            ones = torch.ones(Bsz, 1, device=x.device)
            h = selective_state_update(state["rnn"], u, delta, A, ones, ones, dt_softplus=False)[:, None]
            state.offset += 1
        else:
            if state is None:
                xc = causal_conv1d(xb, weight, self.conv1d.bias, seq_idx=seq_idx)
            else:
                xc, conv_final = causal_conv1d(xb, weight, self.conv1d.bias, initial_state=state["conv"],
                                               return_final_state=True, seq_idx=seq_idx)
            offset = 0 if state is None else state.offset
            u, delta = self._lru_inputs(xc, self._starts(Bsz, L, offset, seq_idx, x.device))  # (B, L, D) each
            ones = torch.ones(Bsz, L, 1, device=x.device)
            h = selective_scan(u, delta, A, ones, ones, delta_softplus=False,
                               initial_state=None if state is None else state["rnn"],
                               return_final_state=state is not None, seq_idx=seq_idx)
            if state is not None:
                h, rnn_final = h
                state["conv"].copy_(conv_final.detach())
                state["rnn"].copy_(rnn_final.detach())
                state.offset += L
        return self.out_proj(y * h.to(y.dtype))

