"""Linear attention with an optional data-dependent decay: the matrix-state recurrence behind the linear
Transformer (Katharopoulos et al. 2020), GLA (Yang et al. 2024) and RWKV-6's time mixing (Peng et al. 2024).

Glossary:
    b: batch, l: sequence length, H: heads, K: key/query dim per head, V: value dim per head
    q, k (b, l, H, K)   queries and keys (feature maps are the caller's business)
    v    (b, l, H, V)   values
    g    None            no decay (linear Transformer)
         (b, l, H)       scalar log-decay per head (RetNet/Mamba-2-like), g <= 0
         (b, l, H, K)    log-decay per key channel (GLA, RWKV-6's w), g <= 0
    u    (H, K)          RWKV "bonus": the current token enters the read-out through u instead of the state
    S    (b, H, K, V)    state, float32; (b, H, K, V + 1) with ``normalize`` (last column: the normaliser z)

Recurrence (decay_t = exp(g_t), broadcast over the K rows of S):
    S_t = diag(decay_t) S_{t-1} + k_t v_tᵀ
    o_t = scale · q_tᵀ S_t                              (u is None)
    o_t = scale · q_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ)     (u given; RWKV-6 eq. for wkv_t)
With ``normalize`` (Katharopoulos eq. 5-6) the state also carries z_t = diag(decay_t) z_{t-1} + k_t and
o_t = q_tᵀ S_t / (q_tᵀ z_t + eps): v is extended by a column of ones, so z is the last column of S.

Chunked form (``torch`` path): inside a chunk of T positions let b_t = sum_{c0<r<=t} g_r (the log-decay from the
chunk start through t). Then
    o_t = sum_{s<=t in chunk} (q_t ⊙ exp(b_t - b_s)) · k_s v_s  +  (q_t ⊙ exp(b_t)) S_in
    S_out = diag(exp(b_T)) S_in + sum_s (k_s ⊙ exp(b_T - b_s)) v_sᵀ
(with u, the read-out at t uses b_{t-1} for s < t and adds the diagonal term q_t·(u ⊙ k_t) v_t). Every
exponent is a sum of log-decays over a non-empty-or-empty forward segment, hence <= 0: strong decays never
produce exp of a large positive number (the usual q·exp(b), k·exp(-b) factorisation would overflow). For the
vector decay, chunks longer than SUB_CHUNK = 16 are split once more (``_subchunk_scores``): blocks between
sub-chunks factor through the sub-chunk boundary into plain matmuls of rescaled q and k (both factors <= 1), and
only the diagonal (16, 16, K) blocks hold dense per-channel decays.

Documents packed into one row (``seq_idx``): a position that starts a document sees a zero state. The ref path
multiplies the state by 0 there; the chunked path masks intra-chunk pairs from different documents and the
incoming/outgoing chunk state where a document starts inside the chunk.

Paths: ``ref`` (per-timestep loop), ``torch`` (chunked, autograd), ``triton`` (``seqlab.ops.triton.linear_attention``:
chunked forward and backward kernels for every decay kind, the bonus u, the normaliser and packed documents; the
decode step's kernel is ``seqlab.ops.triton.decode_families``, chosen only with ``backend="triton"``), ``auto``
(CPU: ref for L <= 2, else torch; CUDA: the Triton kernels for per-channel decay and the decode step, where the
H200 measurements put them ahead, the torch path otherwise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
from seqlab.ops._common import (
    check_backend,
    check_dim,
    check_seq_idx,
    check_tensor,
    require_triton,
    reset_mask,
    triton_entry,
    triton_usable,
)

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # auto's kernel dtypes (float64 stays on torch)
# the loop beats the chunked path only for the shortest inputs (same reasoning as ssd.CPU_LOOP_MAX_LEN)
CPU_LOOP_MAX_LEN = 2
# added to the normaliser q·z (Katharopoulos et al. 2020 use 1e-6)
NORMALIZE_EPS = 1e-6
# sub-chunk of the per-channel-decay chunked path (see _subchunk_scores)
SUB_CHUNK = 16


# ----------------------------------------------------------------------------------------------- validation


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError("chunk_size", "a positive int", repr(chunk_size))


def _check_common(q, k, v, g, u, lead, dev):
    """q, k (*lead, H, K), v (*lead, H, V), g (*lead, H) or (*lead, H, K), u (H, K)."""
    nd = len(lead)
    nheads, dk = q.shape[nd], q.shape[nd + 1]
    check_tensor("k", k, (*lead, nheads, dk), device=dev)
    check_tensor("v", v, (*lead, nheads, "V"), device=dev)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InputError(name, f"dtype {q.dtype} like q", f"dtype {t.dtype}")
    if g is not None:
        check_tensor("g", g, None, device=dev)
        if tuple(g.shape) not in ((*lead, nheads), (*lead, nheads, dk)):
            raise InputError(
                "g", f"a log-decay of shape {(*lead, nheads)} (per head) or {(*lead, nheads, dk)} (per key channel)",
                f"shape {tuple(g.shape)}",
            )
    check_tensor("u", u, (nheads, dk), optional=True, device=dev)
    return nheads, dk, v.shape[-1]


def _validate(q, k, v, g, u, initial_state, seq_idx, normalize, chunk_size):
    check_tensor("q", q, ("B", "L", "H", "K"))
    batch, seqlen = q.shape[:2]
    nheads, dk, dv = _check_common(q, k, v, g, u, (batch, seqlen), q.device)
    if seqlen == 0:
        raise InputError("q", "at least one position (L >= 1)", f"shape {tuple(q.shape)}")
    check_dim("v", v, 1, seqlen, "seqlen of q")
    width = dv + 1 if normalize else dv
    check_tensor("initial_state", initial_state, (batch, nheads, dk, width), optional=True, device=q.device)
    check_seq_idx(seq_idx, batch, seqlen)
    if seq_idx is not None and seq_idx.device.type != q.device.type:
        raise InputError("seq_idx", f"a tensor on {q.device.type} like q", f"one on {seq_idx.device}")
    _check_chunk_size(chunk_size)


# ------------------------------------------------------------------------------------------- shared pieces


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(q, k, v, g, scale, normalize, cdt):
    """Cast to the compute dtype, scale q, append the ones column of the normaliser, expand g to (..., K)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(cdt) * scale, k.to(cdt), v.to(cdt)
    if normalize:
        vc = torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1)  # (..., V + 1)
    gc = None if g is None else g.to(cdt)
    return qc, kc, vc, gc


def _finish(o, normalize):
    """Divide by the normaliser column when ``normalize``; o (..., V or V + 1)."""
    if not normalize:
        return o
    return o[..., :-1] / (o[..., -1:] + NORMALIZE_EPS)


# ------------------------------------------------------------------------------------------------ ref path


def _linear_attention_ref(q, k, v, g, u, scale, normalize, initial_state, seq_idx):
    """Per-timestep recurrence in float32 (float64 for float64 inputs). Returns (o, final_state)."""
    cdt = _compute_dtype(q)
    batch, seqlen, nheads, dk = q.shape
    qc, kc, vc, gc = _prepare(q, k, v, g, scale, normalize, cdt)
    S = qc.new_zeros(batch, nheads, dk, vc.shape[-1]) if initial_state is None else initial_state.to(cdt)
    keep = None if seq_idx is None else (~reset_mask(seq_idx)).to(cdt)  # (b, l): 0 where a document starts
    uc = None if u is None else u.to(cdt)
    outs = []
    for t in range(seqlen):
        if keep is not None:
            S = S * keep[:, t, None, None, None]
        kv = kc[:, t, :, :, None] * vc[:, t, :, None, :]  # (b, H, K, V)
        if uc is not None:  # read the previous state plus the bonus-weighted current token, then update
            outs.append(torch.einsum("bhk,bhkv->bhv", qc[:, t], S + uc[None, :, :, None] * kv))
        if gc is not None:
            decay = torch.exp(gc[:, t])  # (b, H) or (b, H, K)
            S = S * (decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        S = S + kv
        if uc is None:
            outs.append(torch.einsum("bhk,bhkv->bhv", qc[:, t], S))
    o = torch.stack(outs, dim=1)  # (b, l, H, V)
    return _finish(o, normalize).to(q.dtype), S


# ---------------------------------------------------------------------------------------- chunked torch path


def _segment_sums(g):
    """g (..., T, K') -> (..., T, T, K'): out[t, s] = sum_{s<r<=t} g_r (0 for t <= s).

    Summing the masked terms (instead of differencing cumulative sums) keeps a small segment sum exact next to
    large ones: with strong decays b_t - b_s would lose the small difference of two large numbers.
    """
    T = g.shape[-2]
    later = torch.ones(T, T, dtype=torch.bool, device=g.device).tril(-1)  # [r, s]: r > s
    terms = g[..., :, None, :].expand(*g.shape[:-2], T, T, g.shape[-1]).masked_fill(~later[..., None], 0.0)
    return terms.cumsum(-3)


def _subchunk_scores(q, k, g, strict, c):
    """Intra-chunk scores for a per-channel decay without the (T, T, K) tensor (secondary chunking).

    q, k, g (..., T, K) with T = n * c. A query in sub-chunk i reads a key in an earlier sub-chunk j through the
    boundary p_i just before sub-chunk i: exp(sum_{s<r<=t}) = exp(sum_{p_i<r<=t}) · exp(sum_{s<r<=p_i}), both
    factors <= 1, so those blocks are plain matmuls of rescaled q and k; only the n diagonal (c, c) blocks use the
    dense (c, c, K) decays. Every sum is taken over its own terms (no differences of large cumulative sums).
    ``strict`` (the bonus form) reads through t - 1 and leaves the diagonal to the caller.
    Returns the (..., T, T) scores (causal, not document-masked) and the (..., T, K) log-decay from s to the chunk
    end. Extra memory O(T·(n + c)·K) per chunk instead of O(T²·K).
    """
    *lead, T, K = q.shape
    n = T // c
    qs, ks, gs = (t.reshape(*lead, n, c, K) for t in (q, k, g))
    within = gs.cumsum(-2)  # (..., n, c, K) from the sub-chunk start through t
    q_exp = torch.cat([torch.zeros_like(within[..., :1, :]), within[..., :-1, :]], dim=-2) if strict else within
    seg_c = _segment_sums(gs)  # (..., n, c, c, K) inside each sub-chunk: [t, s] = sum over (s, t]
    suffix = seg_c[..., -1, :, :]  # (..., n, c, K) sum over (s, end of its sub-chunk]
    seg_n = _segment_sums(within[..., -1, :])  # (..., n, n, K) [a, j] = sum of whole sub-chunks j+1..a
    lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # [i, j]: j < i
    # row i holds the whole sub-chunks strictly between j and i: seg_n[i - 1, j]
    between = torch.cat([seg_n[..., :1, :, :], seg_n[..., :-1, :, :]], dim=-3)
    between = between.masked_fill(~lower[..., None], float("-inf"))  # (..., n_i, n_j, K)
    k_off = ks[..., None, :, :, :] * torch.exp(suffix[..., None, :, :, :] + between[..., None, :])  # (.., i, j, c, K)
    off = (qs * torch.exp(q_exp))[..., :, None, :, :] @ k_off.transpose(-1, -2)  # (..., n_i, n_j, c, c)

    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1 if strict else 0)
    if strict:
        seg_c = torch.cat([seg_c[..., :1, :, :], seg_c[..., :-1, :, :]], dim=-3)
    decay = torch.exp(seg_c.masked_fill(~tri[..., None], float("-inf")))  # (..., n, c, c, K)
    diag = torch.einsum("...ntk,...nsk,...ntsk->...nts", qs, ks, decay)  # (..., n, c, c)
    eye = torch.eye(n, dtype=torch.bool, device=q.device)
    blocks = torch.where(eye[:, :, None, None], diag[..., :, None, :, :], off)  # (..., n_i, n_j, c, c)
    scores = blocks.transpose(-3, -2).reshape(*lead, T, T)
    to_end = (suffix + seg_n[..., -1, :, None, :]).reshape(*lead, T, K)
    return scores, to_end


def _chunk(t, nchunks, T):
    """(b, l, H, ...) -> (b, H, c, T, ...)."""
    t = t.reshape(t.shape[0], nchunks, T, *t.shape[2:])
    return t.movedim(3, 1)


def _linear_attention_chunked(q, k, v, g, u, scale, normalize, initial_state, seq_idx, chunk_size):
    """Chunked form (module docstring) in float32 (float64 for float64 inputs). Returns (o, final_state).

    Extra memory: the (T, T) score matrices O(b·H·L·T) (times K for a per-channel decay) and the chunk states
    O(b·H·K·V·L/T).
    """
    cdt = _compute_dtype(q)
    batch, seqlen, nheads, dk = q.shape
    qc, kc, vc, gc = _prepare(q, k, v, g, scale, normalize, cdt)
    dv = vc.shape[-1]
    T = min(chunk_size, seqlen)
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen
    if gc is None:
        gc = qc.new_zeros(batch, seqlen, nheads)
    vector = gc.dim() == 4
    reset = None if seq_idx is None else reset_mask(seq_idx)
    if pad:  # padded steps: zero inputs, no decay, same document as the last real position
        qc, kc, vc = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (qc, kc, vc))
        gc = F.pad(gc, (0, 0) * (gc.dim() - 2) + (0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    qc, kc, vc, gc = (_chunk(t, nchunks, T) for t in (qc, kc, vc, gc))  # (b, H, c, T, ...)
    if not vector:
        gc = gc[..., None]  # (b, H, c, T, 1): one decay broadcast over the K channels
    b_in = gc.cumsum(3)  # (b, H, c, T, K') log-decay from the chunk start through t
    if u is None:  # read-out decays: through t, or through t - 1 with the bonus
        b_q = b_in
    else:
        b_q = torch.cat([torch.zeros_like(b_in[:, :, :, :1]), b_in[:, :, :, :-1]], dim=3)
    b_end = b_in[:, :, :, -1:]  # (b, H, c, 1, K')

    idx = torch.arange(T, device=q.device)
    causal = idx[:, None] > idx[None, :] if u is not None else idx[:, None] >= idx[None, :]  # (T, T) [t, s]
    if reset is not None:
        doc = reset.long().view(batch, nchunks, T).cumsum(-1)  # (b, c, T) document number inside the chunk
        pair = causal & (doc[..., :, None] == doc[..., None, :])  # (b, c, T, T)
        pair = pair[:, None]  # (b, 1, c, T, T)
        fresh = (doc == 0)[:, None, :, :, None]  # (b, 1, c, T, 1): no document start in the chunk up to t
        to_end = (doc == doc[..., -1:])[:, None, :, :, None]  # (b, 1, c, T, 1): same document as the chunk end
        carries = fresh[:, :, :, -1:]  # (b, 1, c, 1, 1): the incoming state survives the whole chunk
    else:
        pair, fresh, to_end, carries = causal, None, None, None

    # intra-chunk scores A[t, s] = sum_k q_tk k_sk exp(seg_q[t, s, k]), and the log-decay from s to the chunk end
    if vector and T > SUB_CHUNK and T % SUB_CHUNK == 0:
        scores, to_end_exp = _subchunk_scores(qc, kc, gc, u is not None, SUB_CHUNK)
        if reset is not None:
            scores = scores * pair.to(cdt)  # every exponent was <= 0: masking after the exp is safe
    else:
        seg = _segment_sums(gc)  # (b, H, c, T, T, K') [t, s] = sum_{s<r<=t} g_r
        to_end_exp = seg[..., -1, :, :]  # (b, H, c, T, K')
        seg_q = seg  # read-out at t decays through t, or through t - 1 with the bonus: row t - 1 (row 0 is masked)
        if u is not None:
            seg_q = torch.cat([seg[..., :1, :, :], seg[..., :-1, :, :]], dim=-3)
        decay = torch.exp(seg_q.masked_fill(~pair[..., None], float("-inf")))  # masked before the exp
        if vector:
            scores = torch.einsum("bhctk,bhcsk,bhctsk->bhcts", qc, kc, decay)
        else:
            scores = (qc @ kc.transpose(-1, -2)) * decay[..., 0]  # (b, H, c, T, T)
    o = scores @ vc  # (b, H, c, T, V)
    if u is not None:
        bonus = (qc * kc * u.to(cdt)[None, :, None, None, :]).sum(-1, keepdim=True)  # (b, H, c, T, 1)
        o = o + bonus * vc

    # the state each chunk leaves behind from zero, then the states entering each chunk
    k_end = kc * torch.exp(to_end_exp)  # (b, H, c, T, K): decay from s to the chunk end
    if to_end is not None:
        k_end = k_end * to_end
    chunk_states = k_end.transpose(-1, -2) @ vc  # (b, H, c, K, V)
    chunk_decay = torch.exp(b_end).transpose(-1, -2)  # (b, H, c, K', 1)
    if carries is not None:
        chunk_decay = chunk_decay * carries
    S = qc.new_zeros(batch, nheads, dk, dv) if initial_state is None else initial_state.to(cdt)
    entering = []
    for c in range(nchunks):
        entering.append(S)
        S = chunk_decay[:, :, c] * S + chunk_states[:, :, c]
    entering = torch.stack(entering, dim=2)  # (b, H, c, K, V)

    q_in = qc * torch.exp(b_q)  # (b, H, c, T, K)
    if fresh is not None:
        q_in = q_in * fresh
    o = o + q_in @ entering  # (b, H, c, T, V)
    o = o.movedim(1, 3).reshape(batch, nchunks * T, nheads, dv)[:, :seqlen]  # (b, l, H, V)
    return _finish(o, normalize).to(q.dtype), S


# ---------------------------------------------------------------------------------------------- dispatch


def _select(backend, q, g=None, u=None, decode=False, state=None):
    if backend == "auto":
        if q.is_cuda and q.dtype in _TRITON_DTYPES and triton_usable(q):
            # measured on an H200 (benchmarks/RESULTS.md, families-gpu): the decode kernel is ~2x the torch step for
            # every decay kind; the chunked kernels are ~4-5x the torch path with per-channel decay (GLA, RWKV-6)
            # but slower without decay or with a scalar one, where the torch path's batched matmuls win
            if decode:
                if state is not None and state.is_contiguous() and state.dtype == torch.float32:
                    return "triton"
                return "torch"
            if (g is not None and g.dim() == 4) or u is not None:
                return "triton"
            return "torch"
        if decode:
            return "torch"
        return "ref" if not q.is_cuda and q.shape[1] <= CPU_LOOP_MAX_LEN else "torch"
    if backend == "triton":
        require_triton("linear_attention_step" if decode else "linear_attention", q, g)
    return backend


def _linear_attention_triton(q, k, v, g, u, scale, normalize, initial_state, seq_idx, chunk_size):
    """The Triton kernel on float32 operands; the scale and the normaliser column are applied here (autograd)."""
    kernel = triton_entry("seqlab.ops.triton.linear_attention", "linear_attention_triton", required=True)
    qc, kc, vc, gc = _prepare(q, k, v, g, scale, normalize, torch.float32)
    init = None if initial_state is None else initial_state.to(torch.float32)
    uc = None if u is None else u.to(torch.float32)
    o, S = kernel(qc, kc, vc, gc, uc, init, seq_idx, chunk_size)
    return _finish(o, normalize).to(q.dtype), S


def linear_attention(
    q,
    k,
    v,
    g=None,
    u=None,
    scale=None,
    normalize=False,
    initial_state=None,
    return_final_state=False,
    seq_idx=None,
    chunk_size=64,
    backend="auto",
):
    """Linear attention with optional log-decay ``g`` and bonus ``u``. q, k (b, l, H, K), v (b, l, H, V) -> o (b, l,
    H, V) in the dtype of q.

    g: None, (b, l, H) or (b, l, H, K) log-decays (<= 0); u: (H, K) RWKV-6 bonus; scale: multiplies q (default
    K^-1/2); normalize: divide by q·z (linear Transformer); initial_state (b, H, K, V) (V + 1 with normalize);
    seq_idx (b, l) int document index. Returns o or (o, final_state) with final_state float32 (float64 for
    float64 inputs). backend: "auto" | "ref" | "torch" | "triton".
    """
    check_backend(backend)
    _validate(q, k, v, g, u, initial_state, seq_idx, normalize, chunk_size)
    path = _select(backend, q, g, u)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if path == "triton":
            o, S = _linear_attention_triton(q, k, v, g, u, scale, normalize, initial_state, seq_idx, chunk_size)
        elif path == "ref":
            o, S = _linear_attention_ref(q, k, v, g, u, scale, normalize, initial_state, seq_idx)
        else:
            o, S = _linear_attention_chunked(q, k, v, g, u, scale, normalize, initial_state, seq_idx, chunk_size)
    return (o, S) if return_final_state else o


# ------------------------------------------------------------------------------------------------ decode


def linear_attention_step(state, q, k, v, g=None, u=None, scale=None, normalize=False, backend="auto"):
    """One decode step: updates ``state`` (b, H, K, V) (V + 1 with normalize) in place and returns o (b, H, V).

    q, k (b, H, K); v (b, H, V); g None, (b, H) or (b, H, K); u (H, K). Equals one position of
    ``linear_attention`` started from ``state``. backend="triton" runs one fused kernel (no autograd, no host
    sync: capturable in a CUDA graph); "auto" takes it on CUDA for a contiguous float32 state, else the torch step.
    """
    check_backend(backend)
    check_tensor("q", q, ("B", "H", "K"))
    batch = q.shape[0]
    nheads, dk, dv = _check_common(q, k, v, g, u, (batch,), q.device)
    width = dv + 1 if normalize else dv
    check_tensor("state", state, (batch, nheads, dk, width), device=q.device)
    if _select(backend, q, g, u, decode=True, state=state) == "triton":  # one launch, no autograd (graph-safe)
        if not state.is_contiguous():
            raise InputError("state", "a contiguous tensor (it is updated in place)", f"strides {state.stride()}")
        kernel = triton_entry("seqlab.ops.triton.decode_families", "linear_attention_step_triton", required=True)
        o = kernel(state, q, k, v, g, u, dk ** -0.5 if scale is None else scale, normalize)
        return _finish(o, normalize).to(q.dtype)
    with torch.autocast(device_type=q.device.type, enabled=False):
        cdt = state.dtype
        qc, kc, vc, gc = _prepare(q, k, v, g, scale, normalize, cdt)
        kv = kc[..., :, None] * vc[..., None, :]  # (b, H, K, V)
        if u is not None:
            o = torch.einsum("bhk,bhkv->bhv", qc, state + u.to(cdt)[None, :, :, None] * kv)
        if gc is not None:
            decay = torch.exp(gc)
            state.mul_(decay[..., None, None] if decay.dim() == 2 else decay[..., None])
        state.add_(kv)
        if u is None:
            o = torch.einsum("bhk,bhkv->bhv", qc, state)
        return _finish(o, normalize).to(q.dtype)
