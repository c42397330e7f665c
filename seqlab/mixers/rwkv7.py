"""RWKV-7 "Goose" time mixing (Peng et al. 2025), simplified onto the gated delta rule (``seqlab.ops.delta_rule``).

Per position, with x' the previous token (token shift) and lerp_□(x) = x + (x' - x) ⊙ μ_□:
    r, k, v  = W_r lerp_r(x), W_k lerp_k(x), W_v lerp_v(x)             # (B, L, H, K) each
    w        = -softplus(-(w_0 + tanh(lerp_w(x) W_1) W_2)) - 0.5      # log log-decay, per channel
    a        = sigmoid(a_0 + lerp_a(x) A_1 A_2)                        # in-context learning rate, per channel
    g        = sigmoid(lerp_g(x) G_1) G_2                               # output gate (low rank)
    κ̂        = normalize_head(k ⊙ k_k)                                  # removal / write key, unit norm per head
    S_t      = α_t (I - β_t κ̂_t κ̂_tᵀ) S_{t-1} + β_t κ̂_t v_tᵀ              # delta rule, S (K, V) per head
    o_t      = S_tᵀ r_t                                                 # read-out
    out      = o_proj((GroupNorm_H(o) + (Σ_head r ⊙ κ̂ ⊙ r_k) v) ⊙ g)     # per-head bonus after the norm
with α_t = exp(mean_head(-exp(w_t))) and β_t = mean_head(a_t).

Exactly what differs from the published block (which updates S_t = S_{t-1}(diag(w_t) - κ̂ᵀ(a ⊙ κ̂)) + vᵀ k̃ in the
(V, K) orientation):
1. decay and learning rate are scalars per head (the head means of the published per-channel w and a), so the
   transition is α (I - β κ̂ κ̂ᵀ) instead of diag(w) - κ̂ (a ⊙ κ̂)ᵀ; the removal acts on the decayed state;
2. the written key is β κ̂ (the removal key) instead of k̃ = k ⊙ (1 + (a - 1) k_a), so the state update is a
   true delta rule (the new value replaces the old one at κ̂);
3. the bonus uses κ̂ instead of k̃; the value residual to the first layer's v ("v_first") is left out;
4. RMSNorm (the model's) instead of LayerNorm before the block.
Channel mixing is ``RWKVChannelMix`` without the receptance gate (preset pattern "R7 RC").

State: ``shift (B, d_model)`` and ``S (B, H, K, K)``, float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers.base import MixerState
from seqlab.mixers.rwkv6 import GROUP_NORM_EPS, ShiftAndMatrixState, _layer_ratios, check_input, token_shift
from seqlab.ops.delta_rule import delta_rule, delta_rule_step


class RWKV7TimeMix(ShiftAndMatrixState, nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: simplified RWKV-7 time mixing (module docstring)."""

    def __init__(self, d_model: int, headdim: int = 64, lora_rank: int = 32, decay_rank: int = 64,
                 gate_rank: int = 128, chunk_size: int = 64, layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        if headdim < 1 or d_model % headdim:
            raise ConfigError(f"RWKV7: rwkv_headdim={headdim} must divide d_model={d_model}")
        self.d_model, self.headdim, self.nheads, self.chunk_size = d_model, headdim, d_model // headdim, chunk_size
        r0, r1 = _layer_ratios(layer_idx, n_layers)
        ddd = torch.arange(d_model, dtype=torch.float32) / d_model
        self.time_maa_r = nn.Parameter(1.0 - ddd.pow(0.2 * r1))
        self.time_maa_w = nn.Parameter(1.0 - ddd.pow(0.9 * r1))
        self.time_maa_k = nn.Parameter(1.0 - (ddd.pow(0.9 * r1) + 0.4 * r0))
        self.time_maa_v = nn.Parameter(1.0 - (ddd.pow(0.4 * r1) + 0.6 * r0))
        self.time_maa_a = nn.Parameter(1.0 - ddd.pow(0.9 * r1))
        self.time_maa_g = nn.Parameter(1.0 - ddd.pow(0.2 * r1))
        n = torch.arange(d_model, dtype=torch.float32) / max(1, d_model - 1)
        self.w0 = nn.Parameter(-7.0 + 5.0 * n.pow(0.85 + r0**0.5) + 0.5)
        self.w1 = nn.Parameter(torch.zeros(d_model, decay_rank))
        self.w2 = nn.Parameter(torch.empty(decay_rank, d_model).uniform_(-0.1, 0.1))
        self.a0 = nn.Parameter(torch.zeros(d_model))
        self.a1 = nn.Parameter(torch.zeros(d_model, lora_rank))
        self.a2 = nn.Parameter(torch.empty(lora_rank, d_model).uniform_(-0.1, 0.1))
        self.g1 = nn.Parameter(torch.zeros(d_model, gate_rank))
        self.g2 = nn.Parameter(torch.empty(gate_rank, d_model).uniform_(-0.1, 0.1))
        self.k_k = nn.Parameter(torch.full((d_model,), 0.85))
        self.r_k = nn.Parameter(torch.zeros(self.nheads, headdim))
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.ln_x = nn.GroupNorm(self.nheads, d_model, eps=GROUP_NORM_EPS)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> RWKV7TimeMix:
        return cls(config.d_model, headdim=config.rwkv_headdim, lora_rank=config.rwkv_lora_rank,
                   decay_rank=config.rwkv_decay_rank, gate_rank=config.rwkv_gate_rank,
                   chunk_size=config.la_chunk_size, layer_idx=layer_idx, n_layers=config.n_layers)

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        check_input(x, self.d_model)
        Bsz, L, d = x.shape
        H, K = self.nheads, self.headdim
        dx = token_shift(x, state, seq_idx) - x  # (B, L, d)
        xr, xw, xk, xv, xa, xg = (x + dx * mu for mu in (self.time_maa_r, self.time_maa_w, self.time_maa_k,
                                                         self.time_maa_v, self.time_maa_a, self.time_maa_g))
        heads = (Bsz, L, H, K)
        r, k, v = self.receptance(xr).view(heads), self.key(xk).view(heads), self.value(xv).view(heads)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # (B, L, d)
        log_decay = -torch.exp(w.float()).view(heads).mean(-1)  # (B, L, H), in [-exp(-0.5), 0)
        beta = torch.sigmoid(self.a0 + xa @ self.a1 @ self.a2).float().view(heads).mean(-1)  # (B, L, H)
        g = torch.sigmoid(xg @ self.g1) @ self.g2  # (B, L, d)
        kk = F.normalize((k * self.k_k.view(H, K)).float(), dim=-1)  # (B, L, H, K)
        kk = kk.to(r.dtype)
        if state is not None and L == 1:  # decode: one recurrent step
            out = delta_rule_step(state["S"], r[:, 0], kk[:, 0], v[:, 0], beta[:, 0], log_decay[:, 0],
                                  scale=1.0)[:, None]  # (B, 1, H, K)
            state.offset += 1
        else:
            out = delta_rule(
                r, kk, v, beta, g=log_decay, scale=1.0, initial_state=None if state is None else state["S"],
                return_final_state=state is not None, seq_idx=seq_idx, chunk_size=self.chunk_size,
            )  # (B, L, H, K)
            if state is not None:
                out, S = out
                state["S"].copy_(S.detach())
                state.offset += L
        out = self.ln_x(out.reshape(Bsz * L, d)).view(Bsz, L, d)
        bonus = (r * kk * self.r_k).sum(-1, keepdim=True) * v  # (B, L, H, K), added after the norm
        return self.o_proj((out + bonus.reshape(Bsz, L, d)) * g)
