r"""Floating-point operations per token of a LanguageModel, forward and training, from its modules.

One multiply-add is 2 FLOPs. Per token, at context (training sequence) length L:

Weight matmuls -- the 6N rule (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Sec. 2.1 and
Table 1; Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Appendix F): a weight matrix of N
entries costs 2N FLOPs per token forward (one multiply-add per entry) and 4N backward (gradients with respect to
the input and to the weight), so ``6 * N_matmul`` per training token. N_matmul counts every ``nn.Linear`` (the
output head included: it is a matmul even when tied to the embedding, whose lookup costs nothing), depthwise
convolutions (2 * weight entries per token: each tap is one multiply-add per output position), only the
``top_k / n_experts`` active share of MoE experts, and a shared block (Zamba) once per application.

Attention (Kaplan Table 1, "Attention: QK logits" and the matching "attention-weighted values"): per layer,
q·k over L keys is 2 * L * d_attn and the weighted sum of L values another 2 * L * d_attn, with
d_attn = n_heads * head_dim, so forward ``4 * L * d_attn`` (L -> min(L, window) with a sliding window); like
Kaplan and Chinchilla we count the full L rather than the causal L/2 (kernels compute whole tiles). Training: x3.

Selective scan (Mamba-1, Gu & Dao 2023, Alg. 2) per token, per channel d (D = expand * d_model) and state n
(N = d_state): Ā = exp(Δ A) (1 mul + 1 exp), B̄ x = (Δ x) B (1 mul), h = Ā h + B̄ x (2), y += C h (2):
forward ``7 * D * N`` -- linear in L. Training: x3 (backward ~ twice the forward, as for matmuls).

SSD (Mamba-2, Dao & Gu 2024, Sec. 6, chunk size Q -> min(Q, L); H heads of P channels, G groups, N states):
per chunk of Q tokens, C Bᵀ is Q x Q x N per group (2 Q N per token per group), the decay mask L multiplies
Q x Q entries per head (Q per token), (L ∘ C Bᵀ) X is Q x Q x P per head (2 Q P), the chunk states Bᵀ X are
N x Q x P per head (2 N P), the outputs from carried states C h another 2 N P, and passing states between chunks
N P per head per chunk (2 N P / Q). Forward ``G 2QN + H (Q + 2QP + 4NP + 2NP/Q)`` -- constant in L once L >= Q,
i.e. linear total cost. Training: x3.

S4 (FFT convolution, Gu et al. 2022): the kernel K (L x H) from N/2 complex modes (Vandermonde, ~8 real FLOPs per
mode per position: ``4 * N * H`` per token) and three real FFTs of length 2L per channel (~5 n log2 n FLOPs
for a length-n transform, halved for real input: ``3 * 2.5 * 2 * log2(2L) * H`` per token) -- O(L log L) total.

Mixers without a term here (linear attention, RWKV, RG-LRU, ...) are counted by their matmuls only and listed in
``uncounted``. Norms, activations, the softmax and the loss are left out, as in Kaplan's table.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

BACKWARD_FACTOR = 2  # backward ~ 2x forward for matmuls and scans alike


@dataclass
class FlopCount:
    """FLOPs per token at length ``seqlen``; ``forward`` and ``training`` (= forward + backward) totals."""

    seqlen: int
    matmul_params: int  # N in 6N (active weights per token)
    matmul: float  # 2N forward
    attention: float
    scan: float
    conv: float
    forward: float
    training: float
    uncounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def attention_flops(seqlen: int, n_heads: int, head_dim: int, window: int | None = None) -> float:
    """Forward FLOPs per token of one attention layer's score and value products: 4 * L * d_attn."""
    span = seqlen if window is None else min(window, seqlen)
    return 4.0 * span * n_heads * head_dim


def selective_scan_flops(d_inner: int, d_state: int) -> float:
    """Forward FLOPs per token of the Mamba-1 recurrence: 7 * D * N."""
    return 7.0 * d_inner * d_state


def ssd_flops(seqlen: int, nheads: int, headdim: int, d_state: int, ngroups: int, chunk_size: int) -> float:
    """Forward FLOPs per token of chunked SSD (see the module docstring)."""
    Q = min(chunk_size, seqlen)
    N, P, H = d_state, headdim, nheads
    return ngroups * 2.0 * Q * N + H * (Q + 2.0 * Q * P + 4.0 * N * P + 2.0 * N * P / Q)


def s4_flops(seqlen: int, d_model: int, d_state: int) -> float:
    """Forward FLOPs per token of S4's kernel generation and FFT convolution."""
    return 4.0 * d_state * d_model + 3 * 2.5 * 2 * math.log2(2 * seqlen) * d_model


def model_flops(model: nn.Module, seqlen: int) -> FlopCount:
    """FLOPs per token of ``model`` (a LanguageModel or any module built of the seqlab mixers) at ``seqlen``."""
    from seqlab.mixers.attention import Attention
    from seqlab.mixers.mamba import Mamba
    from seqlab.mixers.mamba2 import Mamba2
    from seqlab.mixers.moe import MoE
    from seqlab.mixers.s4 import S4

    if seqlen < 1:
        raise ValueError(f"seqlen: expected >= 1, got {seqlen}")
    weights = {}  # id(module) -> how many times a token passes through it
    shared = getattr(model, "shared_block", None)
    repeats = len(getattr(model, "shared_before", {}) or {}) if shared is not None else 1
    shared_ids = {id(m) for m in shared.modules()} if shared is not None else set()
    expert_share = {}
    for module in model.modules():
        if isinstance(module, MoE):
            share = module.top_k / module.n_experts
            for expert in module.experts:
                for sub in expert.modules():
                    expert_share[id(sub)] = share
    matmul_params = conv_params = 0.0
    attention = scan = 0.0
    uncounted: set[str] = set()
    for module in model.modules():
        uses = (repeats if id(module) in shared_ids else 1) * expert_share.get(id(module), 1.0)
        weights[id(module)] = uses
        if isinstance(module, nn.Linear):
            matmul_params += uses * module.in_features * module.out_features
        elif isinstance(module, nn.Conv1d):
            conv_params += uses * module.weight.numel()
        if isinstance(module, Attention):
            attention += uses * attention_flops(seqlen, module.n_heads, module.head_dim, module.window)
        elif isinstance(module, Mamba):
            scan += uses * selective_scan_flops(module.d_inner, module.d_state)
        elif isinstance(module, Mamba2):
            scan += uses * ssd_flops(seqlen, module.nheads, module.headdim, module.d_state, module.ngroups,
                                     module.chunk_size)  # fmt: skip
        elif isinstance(module, S4):
            scan += uses * s4_flops(seqlen, module.d_model, module.d_state)
        elif _is_sequence_mixer(module):
            uncounted.add(type(module).__name__)
    matmul = 2.0 * matmul_params
    conv = 2.0 * conv_params
    forward = matmul + conv + attention + scan
    return FlopCount(
        seqlen=seqlen, matmul_params=int(round(matmul_params)), matmul=matmul, attention=attention, scan=scan,
        conv=conv, forward=forward, training=(1 + BACKWARD_FACTOR) * forward, uncounted=sorted(uncounted),
    )  # fmt: skip


def training_flops(model: nn.Module, seqlen: int, tokens: int) -> float:
    """Total training FLOPs for ``tokens`` tokens at length ``seqlen``."""
    return model_flops(model, seqlen).training * tokens


def _is_sequence_mixer(module: nn.Module) -> bool:
    """A mixer of another family (it has the mixer interface) whose sequence term this module does not model."""
    from seqlab.mixers.mlp import SwiGLU
    from seqlab.mixers.moe import MoE

    if isinstance(module, (SwiGLU, MoE)) or type(module).__name__.endswith("ChannelMix"):
        return False  # per-token channel mixing (RWKV's token shift is O(d)): no sequence term
    return hasattr(module, "allocate_state") and hasattr(module, "state_bytes") and not hasattr(module, "layers")
