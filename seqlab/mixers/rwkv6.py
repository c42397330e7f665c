"""RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch", Sec. 4) and the RWKV channel mixing.

An RWKV layer is two pre-norm residual blocks, time mixing then channel mixing; both read the previous token
(token shift), so both are sequence mixers here: the preset pattern is "R6 RC" (one RWKV layer = two blocks).

Time mixing (token "R6"), per position t with x' = x_{t-1} (0 at a document start) and Δ = x' - x:
    ddlerp_□(x, x') = x + Δ ⊙ (μ_□ + tanh((x + Δ ⊙ μ_x) A_□) B_□)      □ ∈ {w, k, v, r, g}  (eq. 14-15, low rank)
    r, k, v = W_r ddlerp_r, W_k ddlerp_k, W_v ddlerp_v                  # (B, L, H, K) each
    g       = silu(W_g ddlerp_g)
    d_t     = w + tanh(ddlerp_w D_1) D_2;   log-decay = -exp(d_t)        # per key channel (eq. 16-17)
    S_t     = diag(exp(-exp(d_t))) S_{t-1} + k_t v_tᵀ
    wkv_t   = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ)                          # bonus u (eq. 19-20)
    out     = o_proj(GroupNorm_H(wkv) ⊙ g)
Channel mixing (token "RC", ``RWKVChannelMix``):
    k = relu(W_k lerp_k(x, x'))²,  out = sigmoid(W_r lerp_r(x, x')) ⊙ W_v k   (RWKV-7: no receptance gate)

Names: μ_□ = ``time_maa_□``, A/B = ``time_maa_w1/w2``, w = ``time_decay``, D_1/D_2 = ``time_decay_w1/w2``,
u = ``time_faaaa`` (H, K). The output projections are ``o_proj`` (time mix) and ``down_proj`` (W_v of the channel
mix) so the residual-branch init scaling applies. Differences from the published block: RMSNorm (the model's)
instead of LayerNorm before each block; biases of the group norm kept (as published).

State: ``shift (B, d_model)`` the previous token's input and ``S (B, H, K, K)`` float32 (time mix);
``shift`` only (channel mix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers.base import MixerState
from seqlab.ops._common import reset_mask
from seqlab.ops.linear_attention import linear_attention, linear_attention_step

GROUP_NORM_EPS = 64e-5  # RWKV-6: 1e-5 * head_size_divisor**2 with divisor 8


def token_shift(x: torch.Tensor, state: MixerState | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, d) -> the previous token's x (B, L, d): from ``state["shift"]`` at t = 0 (zeros without a state),
    zeros at document starts; updates ``state["shift"]`` to the last input."""
    first = torch.zeros_like(x[:, :1]) if state is None else state["shift"][:, None].to(x.dtype)
    prev = torch.cat([first, x[:, :-1]], dim=1)  # (B, L, d)
    if seq_idx is not None:
        prev = prev.masked_fill(reset_mask(seq_idx)[..., None], 0.0)
    if state is not None:
        state["shift"].copy_(x[:, -1].detach())
    return prev


def check_input(x: torch.Tensor, d_model: int) -> None:
    if x.dim() != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
        raise InputError("x", f"a (B, L >= 1, {d_model}) tensor", f"shape {tuple(x.shape)}")


def _layer_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
    """RWKV's depth-dependent init ratios: (0 -> 1 over the layers, 1 -> almost 0)."""
    ratio_0_to_1 = layer_idx / max(1, n_layers - 1)
    ratio_1_to_almost0 = 1.0 - layer_idx / n_layers
    return ratio_0_to_1, ratio_1_to_almost0


def default_cmix_d_ff(d_model: int) -> int:
    """RWKV-6 channel-mix width: 3.5 d_model rounded to a multiple of 32."""
    return 32 * round(3.5 * d_model / 32)


class ShiftAndMatrixState:
    """The state of an RWKV time mix (float32, constant in length): the previous token's input ``shift``
    (B, d_model) for the token shift, and the per-head matrix state ``S`` (B, H, K, K)."""

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        device = next(self.parameters()).device if device is None else device
        return MixerState(
            shift=torch.zeros(batch, self.d_model, device=device, dtype=torch.float32),
            S=torch.zeros(batch, self.nheads, self.headdim, self.headdim, device=device, dtype=torch.float32),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * (self.d_model + self.nheads * self.headdim * self.headdim)


class RWKV6TimeMix(ShiftAndMatrixState, nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: RWKV-6 time mixing."""

    def __init__(self, d_model: int, headdim: int = 64, lora_rank: int = 32, decay_rank: int = 64,
                 chunk_size: int = 64, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        if headdim < 1 or d_model % headdim:
            raise ConfigError(f"RWKV6: rwkv_headdim={headdim} must divide d_model={d_model}")
        self.d_model, self.headdim, self.nheads = d_model, headdim, d_model // headdim
        self.chunk_size = chunk_size
        r0, r1 = _layer_ratios(layer_idx, n_layers)
        ddd = torch.arange(d_model, dtype=torch.float32) / d_model
        self.time_maa_x = nn.Parameter(1.0 - ddd.pow(r1))
        self.time_maa_w = nn.Parameter(1.0 - ddd.pow(r1))
        self.time_maa_k = nn.Parameter(1.0 - ddd.pow(r1))
        self.time_maa_v = nn.Parameter(1.0 - (ddd.pow(r1) + 0.3 * r0))
        self.time_maa_r = nn.Parameter(1.0 - ddd.pow(0.5 * r1))
        self.time_maa_g = nn.Parameter(1.0 - ddd.pow(0.5 * r1))
        self.time_maa_w1 = nn.Parameter(torch.zeros(d_model, 5 * lora_rank))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, lora_rank, d_model).uniform_(-0.01, 0.01))
        n = torch.arange(d_model, dtype=torch.float32) / max(1, d_model - 1)
        self.time_decay = nn.Parameter(-6.0 + 5.0 * n.pow(0.7 + 1.3 * r0))
        self.time_decay_w1 = nn.Parameter(torch.zeros(d_model, decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_rank, d_model).uniform_(-0.01, 0.01))
        zigzag = (torch.arange(d_model) + 1) % 3 - 1
        self.time_faaaa = nn.Parameter((r0 * (1.0 - n) + 0.1 * zigzag).view(self.nheads, headdim))
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.gate = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.ln_x = nn.GroupNorm(self.nheads, d_model, eps=GROUP_NORM_EPS)
        for p in self.parameters():
            if p.dim() != 2 or p is self.time_maa_w1 or p is self.time_decay_w1 or p is self.time_faaaa:
                p._no_weight_decay = True

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> RWKV6TimeMix:
        return cls(config.d_model, headdim=config.rwkv_headdim, lora_rank=config.rwkv_lora_rank,
                   decay_rank=config.rwkv_decay_rank, chunk_size=config.la_chunk_size, layer_idx=layer_idx,
                   n_layers=config.n_layers)

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        check_input(x, self.d_model)
        Bsz, L, d = x.shape
        H, K = self.nheads, self.headdim
        dx = token_shift(x, state, seq_idx) - x  # (B, L, d)
        xxx = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1)  # (B, L, 5 r)
        m = torch.einsum("blir,ird->ibld", xxx.unflatten(-1, (5, -1)), self.time_maa_w2)  # (5, B, L, d)
        mu = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        xw, xk, xv, xr, xg = (x + dx * (mu_i + m_i) for mu_i, m_i in zip(mu, m.unbind(0)))
        heads = (Bsz, L, H, K)
        r, k, v = self.receptance(xr).view(heads), self.key(xk).view(heads), self.value(xv).view(heads)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # (B, L, d)
        log_decay = -torch.exp(w.float()).view(heads)  # (B, L, H, K), <= 0
        if state is not None and L == 1:  # decode: one recurrent step
            out = linear_attention_step(state["S"], r[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], self.time_faaaa,
                                        scale=1.0)[:, None]  # (B, 1, H, K)
            state.offset += 1
        else:
            out = linear_attention(
                r, k, v, g=log_decay, u=self.time_faaaa, scale=1.0,
                initial_state=None if state is None else state["S"], return_final_state=state is not None,
                seq_idx=seq_idx, chunk_size=self.chunk_size,
            )  # (B, L, H, K)
            if state is not None:
                out, S = out
                state["S"].copy_(S.detach())
                state.offset += L
        out = self.ln_x(out.reshape(Bsz * L, d)).view(Bsz, L, d)
        return self.o_proj(out * g)


class RWKVChannelMix(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: RWKV channel mixing (squared ReLU, token shift)."""

    def __init__(self, d_model: int, d_ff: int | None = None, receptance: bool = True, layer_idx: int = 0,
                 n_layers: int = 1):
        super().__init__()
        d_ff = default_cmix_d_ff(d_model) if d_ff is None else d_ff
        self.d_model, self.d_ff = d_model, d_ff
        _, r1 = _layer_ratios(layer_idx, n_layers)
        ddd = torch.arange(d_model, dtype=torch.float32) / d_model
        self.time_maa_k = nn.Parameter(1.0 - ddd.pow(r1))
        self.key = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        if receptance:
            self.time_maa_r = nn.Parameter(1.0 - ddd.pow(r1))
            self.receptance = nn.Linear(d_model, d_model, bias=False)
        else:
            self.time_maa_r, self.receptance = None, None

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> RWKVChannelMix:
        return cls(config.d_model, d_ff=config.d_ff, receptance=config.rwkv_cmix_receptance, layer_idx=layer_idx,
                   n_layers=config.n_layers)

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        device = self.time_maa_k.device if device is None else device
        return MixerState(shift=torch.zeros(batch, self.d_model, device=device, dtype=torch.float32))

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * self.d_model

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        check_input(x, self.d_model)
        dx = token_shift(x, state, seq_idx) - x  # (B, L, d)
        if state is not None:
            state.offset += x.shape[1]
        k = torch.relu(self.key(x + dx * self.time_maa_k)).square()  # (B, L, d_ff)
        out = self.down_proj(k)
        if self.receptance is not None:
            out = torch.sigmoid(self.receptance(x + dx * self.time_maa_r)) * out
        return out
