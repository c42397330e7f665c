"""mLSTM: the matrix-memory LSTM of xLSTM (Beck et al. 2024, Sec. 2.3 and App. B), as a pre-up-projection block.

Cell, per head (K = V = P, head dim), with exponential input gate and sigmoid forget gate:
    C_t = f_t C_{t-1} + i_t k_t v_tᵀ              # (K, V) matrix memory
    n_t = f_t n_{t-1} + i_t k_t                   # (K,) normaliser
    h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)           # k_t scaled by 1/sqrt(K)
    i_t = exp(ĩ_t),  f_t = sigmoid(f̃_t)
Stabiliser (eq. 15-17): with m_t = max(log f_t + m_{t-1}, log i_t) the state is kept as C_t e^{-m_t},
n_t e^{-m_t}, and the read-out becomes C'ᵀq / max(|n'ᵀq|, e^{-m_t}) -- the same value, without overflow.

Parallel form (App. B, used for training and prefill): with D[t, s] = sum_{s<r<=t} log f_r + log i_s (s <= t),
D_0[t] = sum_{r<=t} log f_r + m_0 for the carried state, and m_t = max(max_s D[t, s], D_0[t]),
    h_t = (sum_s e^{D[t,s]-m_t} (q_t·k_s) v_s + e^{D_0[t]-m_t} C_0'ᵀ q_t)
          / max(|sum_s e^{D[t,s]-m_t} q_t·k_s + e^{D_0[t]-m_t} n_0'·q_t|, e^{-m_t})
which equals the recurrence (m only rescales numerator and denominator alike). It is quadratic in L
(O(B·H·L²) memory); decode uses the recurrence.

Block (pre-up-projection, Fig. 10, simplified):
    x_m, z = up_proj(x)                            # (B, L, D) each, D = mlstm_expand * d_model
    x_c    = silu(conv1d(x_m))                     # causal, width d_conv
    q, k   = W_q x_c, W_k x_c;  v = W_v x_m        # dense (xLSTM: block-diagonal, block size 4)
    ĩ, f̃   = W_i [q, k, v] + b_i, W_f [q, k, v] + b_f   # per head
    h      = GroupNorm_head(mLSTM(q, k, v)) + skip ⊙ x_c
    out    = out_proj(h ⊙ silu(z))                 # the z branch plays the cell's output gate o_t

State: ``conv (B, D, d_conv - 1)``, ``C (B, H, P, P)``, ``n (B, H, P)``, ``m (B, H)``, float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError, InputError
from seqlab.mixers.base import MixerState
from seqlab.ops._common import reset_mask
from seqlab.ops.conv import causal_conv1d, conv_step


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a (..., L) -> (..., L, L): out[t, s] = sum_{s<r<=t} a_r (0 for t <= s), summing masked terms (exact)."""
    L = a.shape[-1]
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # [r, s]: r > s
    return a[..., :, None].expand(*a.shape, L).masked_fill(~later, 0.0).cumsum(-2)


def mlstm_parallel(q, k, v, log_i, log_f, C0, n0, m0, seq_idx=None, eps=0.0):
    """Parallel (quadratic) mLSTM. q, k, v (B, H, L, P); log_i, log_f (B, H, L); C0 (B, H, P, P), n0 (B, H, P),
    m0 (B, H) the stabilised carried state. Returns h (B, H, L, P) and the final (C, n, m). Float32 math."""
    Bsz, H, L, P = q.shape
    if seq_idx is not None:
        reset = reset_mask(seq_idx)  # (B, L)
        doc = reset.long().cumsum(-1)
        log_f = log_f.masked_fill(reset[:, None], 0.0)  # the cut is made by the masks below
        same = (doc[:, :, None] == doc[:, None, :])[:, None]  # (B, 1, L, L)
        fresh = (doc == 0)[:, None]  # (B, 1, L): no document start up to t, the carried state still counts
    else:
        same, fresh = None, None
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    pair = causal if same is None else causal & same
    D = (_segment_sums(log_f) + log_i[..., None, :]).masked_fill(~pair, float("-inf"))  # (B, H, L, L)
    D0 = log_f.cumsum(-1) + m0[..., None]  # (B, H, L)
    if fresh is not None:
        D0 = D0.masked_fill(~fresh, float("-inf"))
    m = torch.maximum(D.amax(-1), D0)  # (B, H, L); h does not depend on m, the stabilised final state does
    W = torch.exp(D - m[..., None])  # (B, H, L, L)
    w0 = torch.exp(D0 - m)  # (B, H, L)
    scores = W * (q @ k.transpose(-1, -2))  # (B, H, L, L)
    num = scores @ v + w0[..., None] * (q @ C0)  # (B, H, L, P)
    den = scores.sum(-1) + w0 * (q @ n0[..., None])[..., 0]  # (B, H, L)
    h = num / torch.maximum(den.abs(), torch.exp(-m))[..., None]
    last = W[:, :, -1]  # (B, H, L) weights of every s in the final state
    C = w0[..., -1, None, None] * C0 + (k * last[..., None]).transpose(-1, -2) @ v  # (B, H, P, P)
    n = w0[..., -1, None] * n0 + (k * last[..., None]).sum(-2)  # (B, H, P)
    return h, (C, n, m[..., -1])


def mlstm_step(q, k, v, log_i, log_f, C, n, m):
    """One recurrent step, updating C (B, H, P, P), n (B, H, P), m (B, H) in place; q, k, v (B, H, P);
    log_i, log_f (B, H). Returns h (B, H, P)."""
    m_new = torch.maximum(log_f + m, log_i)
    f = torch.exp(log_f + m - m_new)
    i = torch.exp(log_i - m_new)
    C.mul_(f[..., None, None]).add_(i[..., None, None] * k[..., :, None] * v[..., None, :])
    n.mul_(f[..., None]).add_(i[..., None] * k)
    m.copy_(m_new)
    num = torch.einsum("bhk,bhkv->bhv", q, C)
    den = (q * n).sum(-1)
    return num / torch.maximum(den.abs(), torch.exp(-m_new))[..., None]


class MLSTM(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: the xLSTM mLSTM block."""

    def __init__(self, d_model: int, n_heads: int = 4, expand: int = 2, d_conv: int = 4, norm_eps: float = 1e-5):
        super().__init__()
        d_inner = expand * d_model
        if n_heads < 1 or d_inner % n_heads:
            raise ConfigError(f"MLSTM: n_heads={n_heads} must divide mlstm_expand * d_model = {d_inner}")
        if d_conv < 2:
            raise ConfigError(f"MLSTM: d_conv must be >= 2, got {d_conv}")
        self.d_model, self.d_inner, self.nheads, self.headdim = d_model, d_inner, n_heads, d_inner // n_heads
        self.d_conv, self.norm_eps = d_conv, norm_eps
        self.up_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.q_proj = nn.Linear(d_inner, d_inner, bias=False)
        self.k_proj = nn.Linear(d_inner, d_inner, bias=False)
        self.v_proj = nn.Linear(d_inner, d_inner, bias=False)
        self.igate = nn.Linear(3 * d_inner, n_heads, bias=True)
        self.fgate = nn.Linear(3 * d_inner, n_heads, bias=True)
        # xLSTM init: gate weights zero, input-gate bias N(0, 0.1), forget-gate bias linspace(3, 6) (slow forgetting)
        with torch.no_grad():
            self.igate.weight.zero_()
            self.fgate.weight.zero_()
            self.igate.bias.normal_(0.0, 0.1)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, n_heads))
        for p in (self.igate.weight, self.igate.bias, self.fgate.weight, self.fgate.bias):
            p._no_reinit = True
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.skip = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> MLSTM:
        return cls(config.d_model, n_heads=config.n_heads, expand=config.mlstm_expand, d_conv=config.d_conv,
                   norm_eps=config.norm_eps)

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """Constant-size float32 state; ``max_seqlen`` and ``dtype`` are ignored."""
        device = self.skip.device if device is None else device
        H, P = self.nheads, self.headdim

        def zeros(*shape):
            return torch.zeros(batch, *shape, device=device, dtype=torch.float32)

        return MixerState(conv=zeros(self.d_inner, self.d_conv - 1), C=zeros(H, P, P), n=zeros(H, P), m=zeros(H))

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        H, P = self.nheads, self.headdim
        return 4 * batch * (self.d_inner * (self.d_conv - 1) + H * P * P + H * P + H)

    def forward(self, x: torch.Tensor, state: MixerState | None = None, seq_idx: torch.Tensor | None = None):
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise InputError("x", f"a (B, L >= 1, {self.d_model}) tensor", f"shape {tuple(x.shape)}")
        Bsz, L, _ = x.shape
        H, P = self.nheads, self.headdim
        x_m, z = self.up_proj(x).chunk(2, dim=-1)  # (B, L, D) each
        weight = self.conv1d.weight.squeeze(1)  # (D, W)
        decode = state is not None and L == 1
        if decode:
            x_c = conv_step(state["conv"], x_m[:, 0], weight, self.conv1d.bias, activation="silu")[:, None]
        elif state is None:
            x_c = causal_conv1d(x_m, weight, self.conv1d.bias, activation="silu", seq_idx=seq_idx)
        else:
            x_c, conv_final = causal_conv1d(x_m, weight, self.conv1d.bias, activation="silu",
                                            initial_state=state["conv"], return_final_state=True, seq_idx=seq_idx)
            state["conv"].copy_(conv_final.detach())
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # (B, L, D)
        gates_in = torch.cat([q, k, v], dim=-1)
        log_i = self.igate(gates_in).float().transpose(1, 2)  # (B, H, L)
        log_f = F.logsigmoid(self.fgate(gates_in).float()).transpose(1, 2)  # (B, H, L)
        heads = (Bsz, L, H, P)
        q, v = q.float().view(heads).transpose(1, 2), v.float().view(heads).transpose(1, 2)  # (B, H, L, P)
        k = k.float().view(heads).transpose(1, 2) * P**-0.5
        with torch.autocast(device_type=x.device.type, enabled=False):
            if decode:
                h = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], log_i[..., 0], log_f[..., 0], state["C"],
                               state["n"], state["m"])[:, :, None]  # (B, H, 1, P)
            else:
                if state is None:
                    C0, n0, m0 = q.new_zeros(Bsz, H, P, P), q.new_zeros(Bsz, H, P), q.new_zeros(Bsz, H)
                else:
                    C0, n0, m0 = state["C"], state["n"], state["m"]
                h, (C, n, m) = mlstm_parallel(q, k, v, log_i, log_f, C0, n0, m0, seq_idx=seq_idx)
                if state is not None:
                    state["C"].copy_(C.detach())
                    state["n"].copy_(n.detach())
                    state["m"].copy_(m.detach())
            h = F.layer_norm(h, (P,), eps=self.norm_eps)  # per head: the group norm of the block
            h = h.transpose(1, 2).reshape(Bsz, L, self.d_inner)  # (B, L, D)
        if state is not None:
            state.offset += L
        h = (h * self.norm_weight).to(x.dtype) + self.skip * x_c
        return self.out_proj(h * F.silu(z))
