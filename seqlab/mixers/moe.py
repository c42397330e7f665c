"""Mixture of SwiGLU experts with top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral).

    p = softmax(router(x))                      # (T, E) router probabilities, float32
    (w, e) = top-k of p, w renormalised to sum 1 (``renormalize=False`` keeps the softmax values, as Jamba does)
    y = sum_j w_j * expert_{e_j}(x)

Dropless: every token reaches all k of its experts (no capacity limit). Tokens are sorted by expert so each
expert runs once on exactly its tokens.

Load balancing (Switch eq. 4, extended to top-k): with f_i the fraction of the T*k routing assignments that
go to expert i and P_i the mean router probability of expert i,

    aux_loss = E * sum_i f_i * P_i              # = 1 when routing is uniform

``forward`` stores it unweighted in ``self.aux_loss``; the model multiplies by its weight.
"""

from __future__ import annotations

import torch
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers.mlp import SwiGLU


def load_balancing_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``probs (T, E)`` router probabilities, ``expert_idx (T, k)`` chosen experts -> scalar aux loss."""
    counts = torch.bincount(expert_idx.flatten(), minlength=n_experts).to(probs.dtype)  # (E,)
    f = counts / expert_idx.numel()  # fraction of assignments per expert (no gradient)
    P = probs.mean(dim=0)  # (E,)
    return n_experts * (f * P).sum()


class MoE(nn.Module):
    """Channel mixer ``x (B, L, d_model) -> (B, L, d_model)``; sets ``self.aux_loss`` after each forward."""

    def __init__(
        self, d_model: int, n_experts: int = 8, top_k: int = 2, d_ff: int | None = None, renormalize: bool = True
    ):
        super().__init__()
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ConfigError(f"MoE: need n_experts >= 1 and 1 <= top_k <= n_experts, got {n_experts=} {top_k=}")
        self.d_model, self.n_experts, self.top_k, self.renormalize = d_model, n_experts, top_k, renormalize
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff) for _ in range(n_experts))
        self.aux_loss: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, layer_idx: int = 0) -> MoE:
        return cls(
            config.d_model,
            n_experts=getattr(config, "n_experts", 8),
            top_k=getattr(config, "moe_top_k", 2),
            d_ff=getattr(config, "d_ff", None),
            renormalize=getattr(config, "moe_renormalize", True),
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (T, d)`` -> ``probs (T, E)``, ``weights (T, k)`` (renormalised if asked), ``expert_idx (T, k)``."""
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (T, E)
        weights, expert_idx = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, expert_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (T, d)
        probs, weights, expert_idx = self.route(tokens)
        self.aux_loss = load_balancing_loss(probs, expert_idx, self.n_experts)

        # sort the T*k (token, expert) assignments by expert; each expert sees a contiguous slice
        flat_expert = expert_idx.flatten()  # (T*k,)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k  # (T*k,) token index of each sorted assignment
        weight_of = weights.flatten()[order]  # (T*k,)
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()

        out = torch.zeros_like(tokens)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start : start + n]
            y = self.experts[e](tokens[idx])  # (n, d)
            out.index_add_(0, idx, (y.float() * weight_of[start : start + n, None]).to(out.dtype))
            start += n
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"
