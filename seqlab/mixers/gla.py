"""Linear attention mixers: the linear Transformer (Katharopoulos et al. 2020) and gated linear attention (GLA,
Yang et al. 2024), both on ``seqlab.ops.linear_attention``.

mode="linear" (Katharopoulos et al., eq. 4-6, feature map φ(x) = elu(x) + 1):
    q, k, v = φ(x W_q), φ(x W_k), x W_v                  # (B, L, H, K), (B, L, H, K), (B, L, H, V)
    S_t = S_{t-1} + k_t v_tᵀ,  z_t = z_{t-1} + k_t        # no decay
    o_t = q_tᵀ S_t / q_tᵀ z_t,  out = o_proj(o)
mode="gla" (Yang et al. 2024, Sec. 4.4):
    α_t = sigmoid(x W_α1 W_α2 + b_α)^(1/16)                # per key channel, low-rank W_α1 W_α2 (rank 16)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,  o_t = q_tᵀ S_t / sqrt(K)
    out = o_proj(RMSNorm_head(o) * silu(x W_r))            # per-head norm and output gate

Glossary: H = n_heads, K = V = d_model / H (head_dim). State ``S (B, H, K, V)`` float32 (``V + 1`` columns in
"linear" mode: the last holds the normaliser z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers.base import MixerState
from seqlab.ops.linear_attention import linear_attention, linear_attention_step

MODES = ("linear", "gla")
GLA_GATE_RANK = 16
GLA_GATE_TEMPERATURE = 16.0  # log α = logsigmoid(·) / 16 (GLA, Sec. 4.4)


class LinearAttention(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)`` with a constant-size matrix state per head."""

    def __init__(self, d_model: int, n_heads: int, mode: str = "linear", chunk_size: int = 64,
                 norm_eps: float = 1e-5):
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"LinearAttention: la_mode must be one of {list(MODES)}, got {mode!r}")
        if n_heads < 1 or d_model % n_heads:
            raise ConfigError(f"LinearAttention: n_heads must divide d_model, got {d_model=} {n_heads=}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.mode, self.chunk_size, self.norm_eps = mode, chunk_size, norm_eps
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        if mode == "gla":
            self.gk_proj = nn.Sequential(
                nn.Linear(d_model, GLA_GATE_RANK, bias=False), nn.Linear(GLA_GATE_RANK, d_model, bias=True)
            )
            self.g_proj = nn.Linear(d_model, d_model, bias=False)
            self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> LinearAttention:
        return cls(config.d_model, config.n_heads, mode=config.la_mode, chunk_size=config.la_chunk_size,
                   norm_eps=config.norm_eps)

    # ----------------------------------------------------------------------------------------------- state

    def _state_width(self) -> int:
        return self.head_dim + 1 if self.mode == "linear" else self.head_dim

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """Constant-size float32 state; ``max_seqlen`` and ``dtype`` are ignored."""
        device = self.q_proj.weight.device if device is None else device
        shape = (batch, self.n_heads, self.head_dim, self._state_width())
        return MixerState(S=torch.zeros(shape, device=device, dtype=torch.float32))

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * self.n_heads * self.head_dim * self._state_width()

    # --------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise InputError("x", f"a (B, L, {self.d_model}) tensor", f"shape {tuple(x.shape)}")
        Bsz, L, _ = x.shape
        heads = (Bsz, L, self.n_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(heads), self.k_proj(x).view(heads), self.v_proj(x).view(heads)
        if self.mode == "linear":
            q, k = F.elu(q) + 1, F.elu(k) + 1  # positive features, so q·z > 0
            g, normalize = None, True
        else:
            g = F.logsigmoid(self.gk_proj(x).float()).view(heads) / GLA_GATE_TEMPERATURE  # (B, L, H, K)
            normalize = False
        if state is not None and L == 1:  # decode: one recurrent step
            out = linear_attention_step(state["S"], q[:, 0], k[:, 0], v[:, 0], None if g is None else g[:, 0],
                                        normalize=normalize)[:, None]  # (B, 1, H, V)
            state.offset += 1
        else:
            out = self._parallel(q, k, v, g, normalize, state, seq_idx)
        if self.mode == "gla":
            of = out.float()
            of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.float()
            out = of.to(x.dtype).reshape(Bsz, L, self.d_model) * F.silu(self.g_proj(x))
        return self.o_proj(out.reshape(Bsz, L, self.d_model))

    def _parallel(self, q, k, v, g, normalize, state, seq_idx):
        """Chunked linear attention over the whole input, continuing from and updating ``state`` if given."""
        out = linear_attention(
            q, k, v, g=g, normalize=normalize, initial_state=None if state is None else state["S"],
            return_final_state=state is not None, seq_idx=seq_idx, chunk_size=self.chunk_size,
        )  # (B, L, H, V)
        if state is not None:
            out, S = out
            state["S"].copy_(S.detach())
            state.offset += q.shape[1]
        return out
