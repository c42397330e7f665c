"""mLSTM: the matrix-memory cell of xLSTM (Beck et al. 2024, Sec. 2.2-2.3 and the appendix's parallel form) as an op.

Glossary (b: batch, l: sequence length, H: heads, K: query/key dim, V: value dim per head):
    q, k   (b, l, H, K)   queries and keys; k is multiplied by ``scale`` (default K^-1/2: the paper's k_t / √d)
    v      (b, l, H, V)   values
    i_gate (b, l, H)      input-gate pre-activation ĩ_t: i_t = exp(ĩ_t)
    f_gate (b, l, H)      forget-gate pre-activation f̃_t: f_t = sigmoid(f̃_t) or exp(f̃_t) (``forget_gate``)
    state  (C (b, H, K, V), n (b, H, K), m (b, H)), float32, stabilised: C and n are the paper's C_t, n_t times
           e^{-m_t}; below, C_t and n_t name these stabilised values

Recurrence (Sec. 2.3) with the max-stabiliser m of Sec. 2.2, log f_t = logsigmoid(f̃_t) or f̃_t:
    m_t = max(log f_t + m_{t-1}, ĩ_t)
    C_t = e^{log f_t + m_{t-1} - m_t} C_{t-1} + e^{ĩ_t - m_t} k_t v_tᵀ
    n_t = e^{log f_t + m_{t-1} - m_t} n_{t-1} + e^{ĩ_t - m_t} k_t
    h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, e^{-m_t})
Every exponent is <= 0 (m_t is the larger of the two), and h_t does not depend on m: the numerator and both terms
of the denominator carry the same factor e^{-m_t}, so this is the unstabilised cell without its overflow.
A state with no history is (0, 0, m = 0). A document start (``seq_idx``) forgets everything: f_t = 0 there.

Parallel form (the paper's stabilised parallel formulation), over a span with entering state (C', n', m'):
    D[t, s] = sum_{s<r<=t} log f_r + ĩ_s  (s <= t, same document),   D_0[t] = sum_{r<=t} log f_r + m'
    m_t     = max(max_s D[t, s], D_0[t])                             (the recurrence's m_t: a max unrolls)
    h_t     = (sum_s e^{D[t,s]-m_t} (q_t·k_s) v_s + e^{D_0[t]-m_t} C'ᵀq_t)
              / max(|sum_s e^{D[t,s]-m_t} q_t·k_s + e^{D_0[t]-m_t} n'·q_t|, e^{-m_t})
Over the whole sequence (``mlstm_quadratic``) this is O(b·H·L²) memory.

Chunkwise form (``backend="torch"``): the parallel form inside chunks of T positions, entered with the state the
chunk before left behind. A chunk on its own (from the zero state) leaves
    μ = max_s D[T, s],   C_loc = sum_s e^{D[T,s]-μ} k_s v_sᵀ,   n_loc = sum_s e^{D[T,s]-μ} k_s
and with g = sum_{r in chunk} log f_r the state passed on is the recurrence applied to a whole chunk:
    m_out = max(g + m_in, μ),   C_out = e^{g + m_in - m_out} C_in + e^{μ - m_out} C_loc   (n alike)
(exact because m is a running max). Every exponent is again <= 0, so input-gate pre-activations of +30 or
forget gates near 0 do not overflow. Extra memory O(b·H·L·T) for the (T, T) blocks and O(b·H·K·V·L/T) for the
states entering each chunk -- never an (L, L) tensor.

Paths: ``ref`` (per-timestep loop), ``torch`` (chunkwise, autograd), ``auto`` (CPU: ref for L <= 2, else torch;
CUDA: torch). There is no Triton kernel; ``backend="triton"`` raises BackendUnavailable.
The functions ``parallel_form``, ``chunkwise_form``, ``recurrent_form`` and ``recurrent_step`` are the cell-level
math in the head-major layout (b, H, l, ·) with log-gates, without argument checks; the ops below validate, cast and
call them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops._common import check_backend, check_dim, check_seq_idx, check_tensor, compute_dtype, reset_mask

# the loop beats the chunkwise path only for the shortest inputs (as in linear_attention)
CPU_LOOP_MAX_LEN = 2
FORGET_GATES = ("sigmoid", "exp")


# ------------------------------------------------------------------------------------------------ cell math


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """a (..., T) -> (..., T, T): out[t, s] = sum_{s<r<=t} a_r (0 for t <= s).

    Summing the masked terms (not differencing cumulative sums) keeps a short segment exact next to long ones.
    """
    T = a.shape[-1]
    later = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # [r, s]: r > s
    return a[..., :, None].expand(*a.shape, T).masked_fill(~later, 0.0).cumsum(-2)


def _read_out(num: torch.Tensor, den: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """h = num / max(|den|, e^{-m}); num (..., V), den and m (...).

    e^{-m} is capped below the dtype's overflow (m < -88 in float32 after a document start with ĩ < -88): an
    infinite bound would give h = 0 but NaN gradients (0 · inf in the backward of exp); the capped one gives the
    same h to within that dtype's smallest numbers and finite gradients.
    """
    return num / torch.maximum(den.abs(), torch.exp((-m).clamp(max=math.log(torch.finfo(m.dtype).max) - 1)))[..., None]


def _cell_step(q, k, v, log_i, log_f, C, n, m):
    """One step of the stabilised recurrence, out of place (autograd). q, k (b, H, K); v (b, H, V); log_i, log_f
    (b, H). Returns h (b, H, V) and the new (C, n, m)."""
    m_new = torch.maximum(log_f + m, log_i)
    f = torch.exp(log_f + m - m_new)  # (b, H)
    i = torch.exp(log_i - m_new)
    C = f[..., None, None] * C + i[..., None, None] * k[..., :, None] * v[..., None, :]  # (b, H, K, V)
    n = f[..., None] * n + i[..., None] * k  # (b, H, K)
    num = torch.einsum("bhk,bhkv->bhv", q, C)
    den = (q * n).sum(-1)
    return _read_out(num, den, m_new), (C, n, m_new)


def recurrent_step(q, k, v, log_i, log_f, C, n, m):
    """One decode step updating C (b, H, K, V), n (b, H, K), m (b, H) in place; q, k (b, H, K), v (b, H, V),
    log_i, log_f (b, H). Returns h (b, H, V)."""
    h, (C_new, n_new, m_new) = _cell_step(q, k, v, log_i, log_f, C, n, m)
    C.copy_(C_new)
    n.copy_(n_new)
    m.copy_(m_new)
    return h


def recurrent_form(q, k, v, log_i, log_f, C0, n0, m0, reset=None):
    """The recurrence, one position at a time. q, k (b, H, l, K), v (b, H, l, V), log_i, log_f (b, H, l); reset
    (b, l) bool, True where a document starts (f_t = 0 there). Returns h (b, H, l, V) and the final (C, n, m)."""
    if reset is not None:
        log_f = log_f.masked_fill(reset[:, None], float("-inf"))
    C, n, m = C0, n0, m0
    hs = []
    for t in range(q.shape[2]):
        h, (C, n, m) = _cell_step(q[:, :, t], k[:, :, t], v[:, :, t], log_i[..., t], log_f[..., t], C, n, m)
        hs.append(h)
    return torch.stack(hs, dim=2), (C, n, m)


def parallel_form(q, k, v, log_i, log_f, C0, n0, m0, reset=None):
    """The quadratic form over the whole sequence (App. B; O(b·H·L²) memory). Arguments as ``recurrent_form``.
    Returns h (b, H, l, V) and the final (C, n, m)."""
    L = q.shape[2]
    if reset is not None:
        doc = reset.long().cumsum(-1)  # (b, l) document number
        log_f = log_f.masked_fill(reset[:, None], 0.0)  # the cut is made by the masks below
        same = (doc[:, :, None] == doc[:, None, :])[:, None]  # (b, 1, l, l)
        fresh = (doc == 0)[:, None]  # (b, 1, l): no document start up to t, the carried state still counts
    else:
        same, fresh = None, None
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    pair = causal if same is None else causal & same
    D = (_segment_sums(log_f) + log_i[..., None, :]).masked_fill(~pair, float("-inf"))  # (b, H, l, l)
    D0 = log_f.cumsum(-1) + m0[..., None]  # (b, H, l)
    if fresh is not None:
        D0 = D0.masked_fill(~fresh, float("-inf"))
    m = torch.maximum(D.amax(-1), D0)  # (b, H, l)
    W = torch.exp(D - m[..., None])  # (b, H, l, l)
    w0 = torch.exp(D0 - m)  # (b, H, l)
    scores = W * (q @ k.transpose(-1, -2))  # (b, H, l, l)
    num = scores @ v + w0[..., None] * (q @ C0)  # (b, H, l, V)
    den = scores.sum(-1) + w0 * (q @ n0[..., None])[..., 0]  # (b, H, l)
    last = W[:, :, -1]  # (b, H, l) weight of every s in the final state
    C = w0[..., -1, None, None] * C0 + (k * last[..., None]).transpose(-1, -2) @ v  # (b, H, K, V)
    n = w0[..., -1, None] * n0 + (k * last[..., None]).sum(-2)  # (b, H, K)
    return _read_out(num, den, m), (C, n, m[..., -1])


def chunkwise_form(q, k, v, log_i, log_f, C0, n0, m0, reset=None, chunk_size=64):
    """The chunkwise form (module docstring). Arguments as ``recurrent_form``. Returns h (b, H, l, V) and the
    final (C, n, m). Extra memory O(b·H·l·T + b·H·K·V·l/T) with T = chunk_size."""
    batch, nheads, seqlen, _ = q.shape
    T = min(chunk_size, seqlen)
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen
    if pad:  # padded steps: no input (ĩ = -inf), no decay, the same document as the last real position
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_i = F.pad(log_i, (0, pad), value=float("-inf"))
        log_f = F.pad(log_f, (0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    q, k, v = (t.reshape(batch, nheads, nchunks, T, t.shape[-1]) for t in (q, k, v))  # (b, H, c, T, ·)
    log_i, log_f = (t.reshape(batch, nheads, nchunks, T) for t in (log_i, log_f))  # (b, H, c, T)

    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
    if reset is not None:
        reset = reset.view(batch, 1, nchunks, T)
        doc = reset.long().cumsum(-1)  # (b, 1, c, T) document number inside the chunk
        pair = causal & (doc[..., :, None] == doc[..., None, :])  # (b, 1, c, T, T)
        fresh = doc == 0  # (b, 1, c, T): no document start in the chunk up to t, the entering state counts
        carries = fresh[..., -1]  # (b, 1, c): the entering state survives the whole chunk
        log_f = log_f.masked_fill(reset, 0.0)  # the cut is made by the masks
    else:
        pair, fresh, carries = causal, None, None
    D = (_segment_sums(log_f) + log_i[..., None, :]).masked_fill(~pair, float("-inf"))  # (b, H, c, T, T)
    b_in = log_f.cumsum(-1)  # (b, H, c, T) log-decay from the chunk start through t

    # what each chunk leaves behind on its own (stabilised by its own max mu), then the states entering each chunk
    D_end = D[..., -1, :]  # (b, H, c, T): -inf for positions of an earlier document than the chunk's last
    mu = D_end.amax(-1)  # (b, H, c)
    k_end = k * torch.exp(D_end - mu[..., None])[..., None]  # (b, H, c, T, K)
    C_loc = k_end.transpose(-1, -2) @ v  # (b, H, c, K, V)
    n_loc = k_end.sum(-2)  # (b, H, c, K)
    g = b_in[..., -1]  # (b, H, c) log-decay over the whole chunk
    if carries is not None:
        g = g.masked_fill(~carries, float("-inf"))  # a document starts inside: the entering state is dropped
    C, n, m = C0, n0, m0
    entering_C, entering_n, entering_m = [], [], []
    for c in range(nchunks):
        entering_C.append(C)
        entering_n.append(n)
        entering_m.append(m)
        m_dec = g[:, :, c] + m
        m_new = torch.maximum(m_dec, mu[:, :, c])
        decay, weight = torch.exp(m_dec - m_new), torch.exp(mu[:, :, c] - m_new)  # (b, H), both <= 1
        C = decay[..., None, None] * C + weight[..., None, None] * C_loc[:, :, c]
        n = decay[..., None] * n + weight[..., None] * n_loc[:, :, c]
        m = m_new
    C_in = torch.stack(entering_C, dim=2)  # (b, H, c, K, V)
    n_in = torch.stack(entering_n, dim=2)  # (b, H, c, K)
    m_in = torch.stack(entering_m, dim=2)  # (b, H, c)

    # inside each chunk: the parallel form entered with (C_in, n_in, m_in)
    D0 = b_in + m_in[..., None]  # (b, H, c, T)
    if fresh is not None:
        D0 = D0.masked_fill(~fresh, float("-inf"))
    m_t = torch.maximum(D.amax(-1), D0)  # (b, H, c, T) the recurrence's m_t
    W = torch.exp(D - m_t[..., None])  # (b, H, c, T, T)
    w0 = torch.exp(D0 - m_t)  # (b, H, c, T)
    scores = W * (q @ k.transpose(-1, -2))  # (b, H, c, T, T)
    num = scores @ v + w0[..., None] * (q @ C_in)  # (b, H, c, T, V)
    den = scores.sum(-1) + w0 * (q @ n_in[..., None])[..., 0]  # (b, H, c, T)
    h = _read_out(num, den, m_t).reshape(batch, nheads, nchunks * T, -1)[:, :, :seqlen]  # (b, H, l, V)
    return h, (C, n, m)


# ----------------------------------------------------------------------------------------------- validation


def _check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError("chunk_size", "a positive int", repr(chunk_size))


def _check_options(forget_gate, scale):
    if forget_gate not in FORGET_GATES:
        raise InputError("forget_gate", f"one of {FORGET_GATES}", repr(forget_gate))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise InputError("scale", "None or a number", repr(scale))


def _check_common(q, k, v, i_gate, f_gate, lead):
    """q, k (*lead, H, K), v (*lead, H, V), i_gate, f_gate (*lead, H). Returns (H, K, V)."""
    nd = len(lead)
    nheads, dk = q.shape[nd], q.shape[nd + 1]
    check_tensor("k", k, (*lead, nheads, dk), device=q.device)
    check_tensor("v", v, (*lead, nheads, "V"), device=q.device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InputError(name, f"dtype {q.dtype} like q", f"dtype {t.dtype}")
    check_tensor("i_gate", i_gate, (*lead, nheads), device=q.device)
    check_tensor("f_gate", f_gate, (*lead, nheads), device=q.device)
    return nheads, dk, v.shape[-1]


def _check_state(name, state, batch, nheads, dk, dv, device):
    """state = (C (b, H, K, V), n (b, H, K), m (b, H))."""
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise InputError(name, "a tuple (C, n, m)", type(state).__name__)
    C, n, m = state
    check_tensor(f"{name}[0] (C)", C, (batch, nheads, dk, dv), device=device)
    check_tensor(f"{name}[1] (n)", n, (batch, nheads, dk), device=device)
    check_tensor(f"{name}[2] (m)", m, (batch, nheads), device=device)


def _validate(q, k, v, i_gate, f_gate, initial_state, seq_idx, chunk_size, forget_gate, scale):
    check_tensor("q", q, ("B", "L", "H", "K"))
    batch, seqlen = q.shape[:2]
    if seqlen == 0:
        raise InputError("q", "at least one position (L >= 1)", f"shape {tuple(q.shape)}")
    nheads, dk, dv = _check_common(q, k, v, i_gate, f_gate, (batch, seqlen))
    check_dim("v", v, 1, seqlen, "seqlen of q")
    if initial_state is not None:
        _check_state("initial_state", initial_state, batch, nheads, dk, dv, q.device)
    check_seq_idx(seq_idx, batch, seqlen, q.device, like="q")
    _check_chunk_size(chunk_size)
    _check_options(forget_gate, scale)


def _select(backend, q, decode=False):
    check_backend(backend)
    if backend == "triton":
        op = "mlstm_step" if decode else "mlstm"
        raise BackendUnavailable(f"{op}: no Triton kernel; use backend='torch' (chunkwise) or 'ref' (loop)")
    if backend == "auto":
        return "ref" if decode or (not q.is_cuda and q.shape[1] <= CPU_LOOP_MAX_LEN) else "torch"
    return backend


# --------------------------------------------------------------------------------------------------- ops


def _log_gates(i_gate, f_gate, forget_gate, cdt):
    """log i = ĩ; log f = logsigmoid(f̃) (sigmoid gate) or f̃ (exponential gate), in ``cdt``."""
    f_gate = f_gate.to(cdt)
    return i_gate.to(cdt), F.logsigmoid(f_gate) if forget_gate == "sigmoid" else f_gate


def _run(form, q, k, v, i_gate, f_gate, initial_state, seq_idx, forget_gate, scale, **kwargs):
    """Cast, move to the head-major layout and run one of the cell-level forms. Returns (h (b, l, H, V), state)."""
    cdt = compute_dtype(q)
    batch, _, nheads, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    qc, kc, vc = (t.to(cdt).transpose(1, 2) for t in (q, k, v))  # (b, H, l, ·)
    log_i, log_f = (t.transpose(1, 2) for t in _log_gates(i_gate, f_gate, forget_gate, cdt))  # (b, H, l)
    if initial_state is None:  # no history: (0, 0, m = 0), as a freshly allocated decode state
        C0 = qc.new_zeros(batch, nheads, dk, vc.shape[-1])
        n0, m0 = qc.new_zeros(batch, nheads, dk), qc.new_zeros(batch, nheads)
    else:
        C0, n0, m0 = (t.to(cdt) for t in initial_state)
    reset = None if seq_idx is None else reset_mask(seq_idx)
    h, state = form(qc, kc * scale, vc, log_i, log_f, C0, n0, m0, reset, **kwargs)
    return h.transpose(1, 2).to(q.dtype), state  # (b, l, H, V)


def mlstm(q, k, v, i_gate, f_gate, initial_state=None, return_final_state=False, seq_idx=None, chunk_size=64,
          forget_gate="sigmoid", scale=None, backend="auto"):
    """The mLSTM cell over a sequence. q, k (b, l, H, K), v (b, l, H, V), i_gate, f_gate (b, l, H) gate
    pre-activations -> h (b, l, H, V) in the dtype of q.

    initial_state: (C (b, H, K, V), n (b, H, K), m (b, H)) stabilised state, default zeros; seq_idx (b, l) int
    document index; forget_gate "sigmoid" | "exp"; scale multiplies k (default K^-1/2). Returns h or (h, (C, n, m))
    with the final state in float32 (float64 for float64 inputs). Computes in float32 with autocast off.
    backend: "auto" | "ref" (loop) | "torch" (chunkwise, chunks of ``chunk_size``) ("triton" raises
    BackendUnavailable).
    """
    check_backend(backend)
    _validate(q, k, v, i_gate, f_gate, initial_state, seq_idx, chunk_size, forget_gate, scale)
    path = _select(backend, q)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if path == "ref":
            h, state = _run(recurrent_form, q, k, v, i_gate, f_gate, initial_state, seq_idx, forget_gate, scale)
        else:
            h, state = _run(chunkwise_form, q, k, v, i_gate, f_gate, initial_state, seq_idx, forget_gate, scale,
                            chunk_size=chunk_size)
    return (h, state) if return_final_state else h


def mlstm_quadratic(q, k, v, i_gate, f_gate, initial_state=None, return_final_state=False, seq_idx=None,
                    forget_gate="sigmoid", scale=None):
    """The parallel form of xLSTM App. B over the whole sequence: same arguments and results as ``mlstm``, with
    O(b·H·L²) extra memory (the full (L, L) gate matrix per head). For comparisons and short inputs."""
    _validate(q, k, v, i_gate, f_gate, initial_state, seq_idx, 1, forget_gate, scale)
    with torch.autocast(device_type=q.device.type, enabled=False):
        h, state = _run(parallel_form, q, k, v, i_gate, f_gate, initial_state, seq_idx, forget_gate, scale)
    return (h, state) if return_final_state else h


def mlstm_step(state, q, k, v, i_gate, f_gate, forget_gate="sigmoid", scale=None, backend="auto"):
    """One decode step: updates ``state`` = (C (b, H, K, V), n (b, H, K), m (b, H)) in place and returns h (b, H, V)
    in the dtype of q. q, k (b, H, K); v (b, H, V); i_gate, f_gate (b, H). Equals one position of ``mlstm`` started
    from ``state``."""
    check_backend(backend)
    check_tensor("q", q, ("B", "H", "K"))
    batch = q.shape[0]
    nheads, dk, dv = _check_common(q, k, v, i_gate, f_gate, (batch,))
    _check_state("state", state, batch, nheads, dk, dv, q.device)
    _check_options(forget_gate, scale)
    _select(backend, q, decode=True)
    C, n, m = state
    with torch.autocast(device_type=q.device.type, enabled=False):
        cdt = C.dtype
        scale = dk**-0.5 if scale is None else scale
        log_i, log_f = _log_gates(i_gate, f_gate, forget_gate, cdt)
        h = recurrent_step(q.to(cdt), k.to(cdt) * scale, v.to(cdt), log_i, log_f, C, n, m)
    return h.to(q.dtype)
