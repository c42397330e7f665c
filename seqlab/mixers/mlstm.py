"""mLSTM: the matrix-memory LSTM of xLSTM (Beck et al. 2024, Sec. 2.3 and App. B), as a pre-up-projection block.

Cell, per head (K = V = P, head dim), with exponential input gate and sigmoid forget gate:
    C_t = f_t C_{t-1} + i_t k_t v_tᵀ              # (K, V) matrix memory
    n_t = f_t n_{t-1} + i_t k_t                   # (K,) normaliser
    h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)           # k_t scaled by 1/sqrt(K)
    i_t = exp(ĩ_t),  f_t = sigmoid(f̃_t)
Stabiliser (eq. 15-17): with m_t = max(log f_t + m_{t-1}, log i_t) the state is kept as C_t e^{-m_t},
n_t e^{-m_t}, and the read-out becomes C'ᵀq / max(|n'ᵀq|, e^{-m_t}) -- the same value, without overflow.

Training and prefill use the chunkwise form of ``seqlab.ops.mlstm`` (App. B's parallel form inside chunks of
``chunk_size`` positions, the stabilised state (C, n, m) passed from chunk to chunk with the running max):
O(B·H·L·chunk_size) memory instead of the O(B·H·L²) of the quadratic form ``mlstm_parallel``, the same values.
Decode uses the recurrence.

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
from seqlab.ops._common import compute_dtype, reset_mask
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.mlstm import mlstm, parallel_form, recurrent_step
from seqlab.ops.mlstm import mlstm_step as mlstm_decode

# The cell-level forms in the head-major layout (B, H, L, P) with log-gates, under the names this module has always
# offered; the math lives in seqlab.ops.mlstm.
mlstm_step = recurrent_step


def mlstm_parallel(q, k, v, log_i, log_f, C0, n0, m0, seq_idx=None):
    """Parallel (quadratic) mLSTM. q, k, v (B, H, L, P); log_i, log_f (B, H, L); C0 (B, H, P, P), n0 (B, H, P),
    m0 (B, H) the stabilised carried state. Returns h (B, H, L, P) and the final (C, n, m)."""
    return parallel_form(q, k, v, log_i, log_f, C0, n0, m0, None if seq_idx is None else reset_mask(seq_idx))


class MLSTM(nn.Module):
    """Sequence mixer ``x (B, L, d_model) -> (B, L, d_model)``: the xLSTM mLSTM block."""

    def __init__(self, d_model: int, n_heads: int = 4, expand: int = 2, d_conv: int = 4, norm_eps: float = 1e-5,
                 chunk_size: int = 64):
        super().__init__()
        d_inner = expand * d_model
        if n_heads < 1 or d_inner % n_heads:
            raise ConfigError(f"MLSTM: n_heads={n_heads} must divide mlstm_expand * d_model = {d_inner}")
        if d_conv < 2:
            raise ConfigError(f"MLSTM: d_conv must be >= 2, got {d_conv}")
        if chunk_size < 1:
            raise ConfigError(f"MLSTM: chunk_size must be >= 1, got {chunk_size}")
        self.d_model, self.d_inner, self.nheads, self.headdim = d_model, d_inner, n_heads, d_inner // n_heads
        self.d_conv, self.norm_eps, self.chunk_size = d_conv, norm_eps, chunk_size
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
                   norm_eps=config.norm_eps, chunk_size=config.la_chunk_size)

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
        i_pre, f_pre = self.igate(gates_in), self.fgate(gates_in)  # (B, L, H) gate pre-activations
        heads = (Bsz, L, H, P)
        cdt = compute_dtype(x)  # float32, or float64 for a float64 model
        q, k, v = (t.to(cdt).view(heads) for t in (q, k, v))  # (B, L, H, P); the op scales k by P^-1/2
        with torch.autocast(device_type=x.device.type, enabled=False):
            if decode:
                cell = (state["C"], state["n"], state["m"])
                h = mlstm_decode(cell, q[:, 0], k[:, 0], v[:, 0], i_pre[:, 0], f_pre[:, 0])[:, None]  # (B, 1, H, P)
            elif state is None:
                h = mlstm(q, k, v, i_pre, f_pre, seq_idx=seq_idx, chunk_size=self.chunk_size)  # (B, L, H, P)
            else:
                h, (C, n, m) = mlstm(q, k, v, i_pre, f_pre, initial_state=(state["C"], state["n"], state["m"]),
                                     return_final_state=True, seq_idx=seq_idx, chunk_size=self.chunk_size)
                state["C"].copy_(C.detach())
                state["n"].copy_(n.detach())
                state["m"].copy_(m.detach())
            h = F.layer_norm(h, (P,), eps=self.norm_eps)  # per head: the group norm of the block
            h = h.reshape(Bsz, L, self.d_inner)  # (B, L, D)
        if state is not None:
            state.offset += L
        h = (h * self.norm_weight).to(x.dtype) + self.skip * x_c
        return self.out_proj(h * F.silu(z))
