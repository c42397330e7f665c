"""The (gated) delta rule: DeltaNet (Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length") and Gated DeltaNet (Yang et al. 2024b); the state update at RWKV-7's core.

Glossary:
    b: batch, l: sequence length, H: heads, K: key dim, V: value dim
    q, k (b, l, H, K)   queries and keys (callers usually L2-normalise k, so I - β k kᵀ is a contraction)
    v    (b, l, H, V)   values
    beta (b, l, H)      writing strength β_t (in [0, 1] for a contraction; callers apply the sigmoid)
    g    (b, l, H)      optional log-decay α_t = exp(g_t) <= 1 (gated delta rule)
    S    (b, H, K, V)   state, float32; S maps keys to values (the same orientation as ``linear_attention``)

Recurrence (orientation: S is (K, V), so the delta rule multiplies from the left):
    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ     o_t = scale · S_tᵀ q_t
i.e. S_t = α_t S_{t-1} + k_t u_tᵀ with the "pseudo-value" u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t): the new value
replaces what the state currently returns for k_t. (In the papers' (V, K) orientation this reads
S_t = S_{t-1} α_t (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ.)

Chunked form (``torch`` path; the WY/UT representation, Yang et al. 2024, Sec. 3): inside a chunk, with
γ_t = exp(sum_{r<=t} g_r) and Γ[t, s] = γ_t / γ_s = exp(sum_{s<r<=t} g_r), the pseudo-values of all positions solve
one unit-lower-triangular system
    (I + diag(β) (Γ ∘ K Kᵀ)_strict) U = diag(β) (V - diag(γ) K S_0)
so U = W_v - W_k S_0 with W_v, W_k independent of the entering state S_0 (computed for all chunks in parallel by
``solve_triangular``). Then, chunk by chunk, U = W_v - W_k S_0, o = diag(γ) Q S_0 + (Γ ∘ Q Kᵀ) U and
S_T = γ_T S_0 + (Γ[T, :] ∘ K)ᵀ U. Exponents are sums of log-decays over forward segments (<= 0).

Documents packed into one row (``seq_idx``): a position that starts a document sees a zero state (ref: the
state is multiplied by 0; chunked: pairs across a document start and the carried state past one are masked).

Paths: ``ref`` (per-timestep loop), ``torch`` (chunked, autograd), ``triton`` (``seqlab.ops.triton.delta_rule``: the
chunked form above as a parallel per-chunk WY solve plus a tl.dot walk over the chunks, or a recurrent forward that
keeps each (K, V-tile) state slice in registers; a backward that walks the recurrence in reverse, replaying each
chunk from the states stored at chunk boundaries; gate, β, initial/final state and packed documents; key dim
K <= 256), ``auto`` (CPU: ref for L <= 2, else torch; CUDA: triton, measured ahead of the torch path on an H200
with ``benchmarks/families_gpu.py``). The decode step has a Triton kernel too (``seqlab.ops.triton.decode_families``),
which ``auto`` takes on CUDA for a contiguous float32 state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import (
    TRITON_LIMITS,
    check_backend,
    check_dim,
    check_seq_idx,
    check_tensor,
    require_triton,
    reset_mask,
    triton_entry,
    triton_misfit,
    triton_usable,
)

CPU_LOOP_MAX_LEN = 2
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # auto's kernel dtypes (float64 stays on torch)
# the Triton kernels hold (K, V-tile) slices of the state in registers
TRITON_LIMITS["delta_rule"] = {"k": ("key dim K", 3, 256)}
TRITON_LIMITS["delta_rule_step"] = {"k": ("key dim K", 2, 256)}


def _check_common(q, k, v, beta, g, lead, dev):
    nheads, dk = q.shape[len(lead)], q.shape[len(lead) + 1]
    check_tensor("k", k, (*lead, nheads, dk), device=dev)
    check_tensor("v", v, (*lead, nheads, "V"), device=dev)
    check_tensor("beta", beta, (*lead, nheads), device=dev)
    check_tensor("g", g, (*lead, nheads), optional=True, device=dev)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InputError(name, f"dtype {q.dtype} like q", f"dtype {t.dtype}")
    return nheads, dk, v.shape[-1]


def _validate(q, k, v, beta, g, initial_state, seq_idx, chunk_size):
    check_tensor("q", q, ("B", "L", "H", "K"))
    batch, seqlen = q.shape[:2]
    if seqlen == 0:
        raise InputError("q", "at least one position (L >= 1)", f"shape {tuple(q.shape)}")
    check_tensor("beta", beta, ("B", "L", "H"), device=q.device)
    check_dim("beta", beta, 0, batch, "batch of q")
    check_dim("beta", beta, 1, seqlen, "seqlen of q")
    nheads, dk, dv = _check_common(q, k, v, beta, g, (batch, seqlen), q.device)
    check_tensor("initial_state", initial_state, (batch, nheads, dk, dv), optional=True, device=q.device)
    check_seq_idx(seq_idx, batch, seqlen)
    if seq_idx is not None and seq_idx.device.type != q.device.type:
        raise InputError("seq_idx", f"a tensor on {q.device.type} like q", f"one on {seq_idx.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError("chunk_size", "a positive int", repr(chunk_size))


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(q, k, v, beta, g, scale, cdt):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return q.to(cdt) * scale, k.to(cdt), v.to(cdt), beta.to(cdt), None if g is None else g.to(cdt)


# ------------------------------------------------------------------------------------------------ ref path


def _delta_rule_ref(q, k, v, beta, g, scale, initial_state, seq_idx):
    cdt = _compute_dtype(q)
    batch, seqlen, nheads, dk = q.shape
    qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, scale, cdt)
    S = qc.new_zeros(batch, nheads, dk, vc.shape[-1]) if initial_state is None else initial_state.to(cdt)
    keep = None if seq_idx is None else (~reset_mask(seq_idx)).to(cdt)
    outs = []
    for t in range(seqlen):
        if keep is not None:
            S = S * keep[:, t, None, None, None]
        k_t, b_t = kc[:, t], bc[:, t, :, None]  # (b, H, K), (b, H, 1)
        if gc is not None:
            S = S * torch.exp(gc[:, t])[..., None, None]
        u = b_t * (vc[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t))  # pseudo-value (b, H, V)
        S = S + k_t[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qc[:, t]))
    return torch.stack(outs, dim=1).to(q.dtype), S


# ---------------------------------------------------------------------------------------- chunked torch path


def _segment_sums(g):
    """g (..., T) -> (..., T, T): out[t, s] = sum_{s<r<=t} g_r (0 for t <= s), by summing masked terms."""
    T = g.shape[-1]
    later = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)
    return g[..., :, None].expand(*g.shape, T).masked_fill(~later, 0.0).cumsum(-2)


def _delta_rule_chunked(q, k, v, beta, g, scale, initial_state, seq_idx, chunk_size):
    """WY/UT chunked form (module docstring). Extra memory O(b·H·L·T) + chunk states O(b·H·K·V·L/T)."""
    cdt = _compute_dtype(q)
    batch, seqlen, nheads, dk = q.shape
    qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, scale, cdt)
    dv = vc.shape[-1]
    T = min(chunk_size, seqlen)
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen
    if gc is None:
        gc = bc.new_zeros(bc.shape)
    reset = None if seq_idx is None else reset_mask(seq_idx)
    if pad:  # padded steps write nothing (β = 0, k = 0) and do not decay
        qc, kc, vc = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (qc, kc, vc))
        bc, gc = F.pad(bc, (0, 0, 0, pad)), F.pad(gc, (0, 0, 0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))

    def chunked(t):  # (b, l, H, ...) -> (b, H, c, T, ...)
        return t.reshape(batch, nchunks, T, *t.shape[2:]).movedim(3, 1)

    qc, kc, vc, bc, gc = (chunked(t) for t in (qc, kc, vc, bc, gc))
    idx = torch.arange(T, device=q.device)
    incl = idx[:, None] >= idx[None, :]  # (T, T) [t, s]
    if reset is not None:
        doc = reset.long().view(batch, nchunks, T).cumsum(-1)  # (b, c, T)
        incl = (incl & (doc[..., :, None] == doc[..., None, :]))[:, None]  # (b, 1, c, T, T)
        fresh = (doc == 0)[:, None]  # (b, 1, c, T)
    else:
        fresh = None
    strict = incl & ~torch.eye(T, dtype=torch.bool, device=q.device)
    Gamma = torch.exp(_segment_sums(gc).masked_fill(~incl, float("-inf")))  # (b, H, c, T, T)
    gamma = torch.exp(gc.cumsum(-1))  # (b, H, c, T)
    if fresh is not None:
        gamma = gamma * fresh

    M = (Gamma * strict) * (kc @ kc.transpose(-1, -2))  # (b, H, c, T, T) strictly lower
    A = torch.eye(T, dtype=cdt, device=q.device) + bc[..., None] * M
    rhs = torch.cat([bc[..., None] * vc, (bc * gamma)[..., None] * kc], dim=-1)  # (b, H, c, T, V + K)
    W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    W_v, W_k = W.split([dv, dk], dim=-1)

    scores = Gamma * (qc @ kc.transpose(-1, -2))  # (b, H, c, T, T), inclusive
    k_end = kc * Gamma[..., -1, :, None]  # (b, H, c, T, K)
    S = qc.new_zeros(batch, nheads, dk, dv) if initial_state is None else initial_state.to(cdt)
    outs = []
    for c in range(nchunks):
        U = W_v[:, :, c] - W_k[:, :, c] @ S  # (b, H, T, V) pseudo-values
        outs.append((gamma[:, :, c, :, None] * qc[:, :, c]) @ S + scores[:, :, c] @ U)
        S = gamma[:, :, c, -1, None, None] * S + k_end[:, :, c].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2)  # (b, H, c, T, V)
    o = o.movedim(1, 3).reshape(batch, nchunks * T, nheads, dv)[:, :seqlen]
    return o.to(q.dtype), S


# ---------------------------------------------------------------------------------------------- dispatch


def _select(backend, q, k, op="delta_rule", state=None):
    if backend == "auto":
        if q.is_cuda and q.dtype in _TRITON_DTYPES and triton_usable(q) and triton_misfit(op, k=k) is None:
            # measured on an H200 (benchmarks/families_gpu.py): 2.5x the torch path forward, 4.4x forward+backward,
            # 2.5x for the decode step
            if state is None or (state.is_contiguous() and state.dtype == torch.float32):
                return "triton"
            return "torch"
        return "ref" if not q.is_cuda and q.shape[1] <= CPU_LOOP_MAX_LEN else "torch"
    if backend == "triton":
        require_triton(op, q)
        misfit = triton_misfit(op, k=k)
        if misfit is not None:
            raise misfit
    return backend


def _delta_rule_triton(q, k, v, beta, g, scale, initial_state, seq_idx, chunk_size):
    """The Triton kernel on float32 operands; the scale is applied here (autograd)."""
    kernel = triton_entry("seqlab.ops.triton.delta_rule", "delta_rule_triton", required=True)
    qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, scale, torch.float32)
    init = None if initial_state is None else initial_state.to(torch.float32)
    o, S = kernel(qc, kc, vc, bc, gc, init, seq_idx, chunk_size)
    return o.to(q.dtype), S


def delta_rule(q, k, v, beta, g=None, scale=None, initial_state=None, return_final_state=False, seq_idx=None,
               chunk_size=64, backend="auto"):
    """Gated delta rule. q, k (b, l, H, K), v (b, l, H, V), beta (b, l, H), g None or (b, l, H) log-decay ->
    o (b, l, H, V) in the dtype of q.

    scale multiplies q (default K^-1/2); initial_state (b, H, K, V); seq_idx (b, l) int document index. Returns o
    or (o, final_state) with final_state float32 (float64 for float64 inputs on the ref/torch paths). chunk_size:
    the torch path's chunk, and the number of steps between the states the Triton forward keeps for its backward.
    backend: "auto" | "ref" | "torch" | "triton".
    """
    check_backend(backend)
    _validate(q, k, v, beta, g, initial_state, seq_idx, chunk_size)
    path = _select(backend, q, k)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if path == "triton":
            o, S = _delta_rule_triton(q, k, v, beta, g, scale, initial_state, seq_idx, chunk_size)
        elif path == "ref":
            o, S = _delta_rule_ref(q, k, v, beta, g, scale, initial_state, seq_idx)
        else:
            o, S = _delta_rule_chunked(q, k, v, beta, g, scale, initial_state, seq_idx, chunk_size)
    return (o, S) if return_final_state else o


def delta_rule_step(state, q, k, v, beta, g=None, scale=None, backend="auto"):
    """One decode step: updates ``state`` (b, H, K, V) in place and returns o (b, H, V). q, k (b, H, K);
    v (b, H, V); beta, g (b, H). Equals one position of ``delta_rule`` started from ``state``.

    backend="triton" runs one fused kernel (no autograd, no host sync: capturable in a CUDA graph); "auto" takes
    it on CUDA for a contiguous float32 state, else the torch step."""
    check_backend(backend)
    check_tensor("q", q, ("B", "H", "K"))
    batch = q.shape[0]
    nheads, dk, dv = _check_common(q, k, v, beta, g, (batch,), q.device)
    check_tensor("state", state, (batch, nheads, dk, dv), device=q.device)
    path = _select(backend, q, k, "delta_rule_step", state=state)
    if path == "triton":
        if not state.is_contiguous():
            raise InputError("state", "a contiguous tensor (it is updated in place)", f"strides {state.stride()}")
        kernel = triton_entry("seqlab.ops.triton.decode_families", "delta_rule_step_triton", required=True)
        return kernel(state, q, k, v, beta, g, dk ** -0.5 if scale is None else scale)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qc, kc, vc, bc, gc = _prepare(q, k, v, beta, g, scale, state.dtype)
        if gc is not None:
            state.mul_(torch.exp(gc)[..., None, None])
        u = bc[..., None] * (vc - torch.einsum("bhkv,bhk->bhv", state, kc))
        state.add_(kc[..., :, None] * u[..., None, :])
        return torch.einsum("bhkv,bhk->bhv", state, qc).to(q.dtype)
