"""Mamba-2 state-space duality (SSD): the multi-head selective SSM with a scalar decay per head.

Glossary (Mamba-2 paper, Dao & Gu 2024, sec. 3-7):
    b: batch, l: sequence length, H: heads (nheads), P: headdim, G: groups of B/C, N: d_state
    x  (b, l, H, P)  input of each head
    dt (b, l, H)     step size Δ; dt = softplus(dt + dt_bias) when dt_softplus
    A  (H,)          scalar decay rate per head (negative): a_t = exp(dt_t * A)
    B, C (b, l, G, N) input and output projections; head h uses group h // (H // G)
    D  (H,) or (H, P) skip connection;  z (b, l, H, P) gate, y *= silu(z)
    h  (b, H, P, N)  state, float32

Recurrence (the "linear" form, sec. 3):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t        y_t = h_t C_t + D x_t
Dual ("quadratic", structured masked attention) form (sec. 4-5):
    Y = (L ∘ C Bᵀ) (dt X),  L[t, s] = exp(sum_{s<k<=t} dt_k A) for s <= t, 0 above the diagonal.
The chunked algorithm (sec. 6) applies the dual form inside chunks of ``chunk_size`` positions and the
linear form across chunk boundaries.

Documents packed into one row (``seq_idx``) never see each other: at a position t that starts a new
document the decay exp(dt_t A) is replaced by 0 (log-decay -inf), which resets the state in the
recurrence and zeroes every L[t, s] whose path crosses the boundary, in all three forms alike.

Paths: ``ref`` (per-timestep loop), ``torch`` (chunked, autograd), ``triton`` (fused kernels in
``seqlab.ops.triton``), ``auto`` (see ``select_backend``). ``ssd_quadratic`` runs the dual form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqlab.errors import BackendUnavailable, InputError
from seqlab.ops._common import (
    check_backend,
    check_dim,
    check_seq_idx,
    check_tensor,
    compute_dtype,
    require_triton,
    reset_mask,
    step_size,
    triton_entry,
    triton_misfit,
    triton_usable,
)

# On CPU the per-timestep loop beats the chunked path only for the shortest inputs: the loop costs a few
# small tensor ops per position, the chunked path a fixed few dozen (a sequence shorter than chunk_size is
# one unpadded chunk). Measured on a 2-core CPU (OMP_NUM_THREADS=2, B=1..8, H=4..24, P=16..64, N=16..128):
# the loop is faster for L <= 2, even at L = 4, and 1.4-3x slower from L = 8 on.
CPU_LOOP_MAX_LEN = 2


# ----------------------------------------------------------------------------------------------- validation


def _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size=None):
    """Check shapes, dtypes and devices; raise InputError naming the offending argument."""
    check_tensor("x", x, ("B", "L", "H", "P"))
    dev = x.device
    batch, seqlen, nheads, headdim = x.shape
    check_tensor("dt", dt, ("B", "L", "H"), device=dev)
    for i, (size, meaning) in enumerate(((batch, "batch of x"), (seqlen, "seqlen of x"), (nheads, "nheads of x"))):
        check_dim("dt", dt, i, size, meaning)
    check_tensor("A", A, (nheads,), device=dev)
    check_tensor("B", B, ("B", "L", "G", "N"), device=dev)
    check_tensor("C", C, ("B", "L", "G", "N"), device=dev)
    d_state = _check_groups(x, B, C, ((batch, "batch of x"), (seqlen, "seqlen of x")))
    _check_skip_gate_bias(x, D, z, dt_bias)
    check_tensor("initial_state", initial_state, (batch, nheads, headdim, d_state), optional=True, device=dev)
    check_seq_idx(seq_idx, batch, seqlen, device=dev)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError("chunk_size", "a positive int", repr(chunk_size))


def _check_groups(x, B, C, lead: tuple) -> int:
    """B and C (*lead, G, N) with x (*lead, ..., H, P): the ``lead`` sizes ((size, meaning) pairs), x's dtype,
    G dividing H, C shaped like B. Returns N."""
    nheads = x.shape[-2]
    for name, t in (("B", B), ("C", C)):
        for i, (size, meaning) in enumerate(lead):
            check_dim(name, t, i, size, meaning)
        if t.dtype != x.dtype:
            raise InputError(name, f"dtype {x.dtype} like x", f"dtype {t.dtype}")
    g = len(lead)
    ngroups, d_state = B.shape[g], B.shape[g + 1]
    if ngroups == 0 or nheads % ngroups != 0:
        raise InputError("B", f"a number of groups G dividing nheads={nheads} (dim {g})", f"G={ngroups}")
    if C.shape != B.shape:
        raise InputError("C", f"shape {tuple(B.shape)} like B", f"shape {tuple(C.shape)}")
    return d_state


def _check_skip_gate_bias(x, D, z, dt_bias) -> None:
    """D (H,) or (H, P); z shaped like x (..., H, P) in x's dtype; dt_bias (H,)."""
    nheads, headdim = x.shape[-2:]
    if D is not None:
        check_tensor("D", D, None, device=x.device)
        if tuple(D.shape) not in ((nheads,), (nheads, headdim)):
            raise InputError("D", f"shape ({nheads},) or ({nheads}, {headdim})", f"shape {tuple(D.shape)}")
    check_tensor("z", z, tuple(x.shape), optional=True, device=x.device)
    if z is not None and z.dtype != x.dtype:
        raise InputError("z", f"dtype {x.dtype} like x", f"dtype {z.dtype}")
    check_tensor("dt_bias", dt_bias, (nheads,), optional=True, device=x.device)


# ------------------------------------------------------------------------------------------- shared pieces


def _skip_and_gate(y, x, D, z):
    """y + D x, then y * silu(z); y and x (..., H, P) in the compute dtype."""
    if D is not None:
        D = D.to(y.dtype)
        y = y + x * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[t, s] = sum_{s<k<=t} a_k for s <= t, -inf above the diagonal.

    Summing the masked terms directly (instead of differencing a cumulative sum) keeps small segment sums
    exact next to large ones and lets -inf (a document start) propagate without producing -inf - -inf.
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~ones.tril(-1), 0.0)  # [k, s] = a_k if k > s
    return terms.cumsum(-2).masked_fill_(~ones.tril(), float("-inf"))  # in place: cumsum's backward keeps nothing


def _log_decay(dt, A, seq_idx):
    """(b, l, H) log-decay dt * A, with -inf at positions that start a new document."""
    a = dt * A.to(dt.dtype)
    if seq_idx is not None:
        a = a.masked_fill(reset_mask(seq_idx)[..., None], float("-inf"))
    return a


def _heads_of_groups(t, nheads):
    """(..., G, N) -> (..., H, N): head h reads group h // (H // G)."""
    return t.repeat_interleave(nheads // t.shape[-2], dim=-2)


# ------------------------------------------------------------------------------------------------ ref path


def _ssd_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    """Per-timestep recurrence, float32 (float64 for float64 inputs). Returns (y, final_state).

    Peak extra memory: one state (b, H, P, N) plus the outputs; under autograd every step's state is kept,
    O(b·L·H·P·N).
    """
    cdt = compute_dtype(x)
    batch, seqlen, nheads, headdim = x.shape
    dt = step_size(dt, dt_bias, dt_softplus, cdt)  # (b, l, H)
    decay = torch.exp(_log_decay(dt, A, seq_idx))  # (b, l, H), 0 at document starts
    xc = x.to(cdt)
    Bh = _heads_of_groups(B.to(cdt), nheads)  # (b, l, H, N)
    Ch = _heads_of_groups(C.to(cdt), nheads)
    if initial_state is None:
        h = x.new_zeros(batch, nheads, headdim, B.shape[-1], dtype=cdt)
    else:
        h = initial_state.to(cdt)
    ys = []
    # unbind once: indexing [:, t] inside the loop would cost a full-size gradient buffer per step in backward
    steps = zip(dt.unbind(1), decay.unbind(1), xc.unbind(1), Bh.unbind(1), Ch.unbind(1))
    for dt_t, decay_t, x_t, B_t, C_t in steps:
        h = decay_t[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]  # (b, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t))  # (b, H, P)
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(xc.shape)  # (b, l, H, P)
    return _skip_and_gate(y, xc, D, z).to(x.dtype), h


# ---------------------------------------------------------------------------------------- chunked torch path


def _ssd_chunked(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx):
    """Chunked SSD (Mamba-2 sec. 6) in float32 (float64 for float64 inputs). Returns (y, final_state).

    Peak extra memory: the decay and score matrices of every chunk, O(b·H·L·T) for T = chunk_size, plus the
    chunk states O(b·H·P·N·L/T) and a few copies of the inputs in float32.
    """
    cdt = compute_dtype(x)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    heads_per_group = nheads // ngroups
    T = min(chunk_size, seqlen)  # a sequence shorter than one chunk is one chunk, unpadded
    nchunks = -(-seqlen // T)
    pad = nchunks * T - seqlen

    dt = step_size(dt, dt_bias, dt_softplus, cdt)  # (b, l, H)
    a = _log_decay(dt, A, seq_idx)  # (b, l, H)
    xdt = x.to(cdt) * dt[..., None]  # (b, l, H, P)
    Bc, Cc = B.to(cdt), C.to(cdt)
    if pad:
        # padded steps have dt = 0: no input and no decay, so the final state is the state at l - 1
        a, xdt = F.pad(a, (0, 0, 0, pad)), F.pad(xdt, (0, 0, 0, 0, 0, pad))
        Bc, Cc = F.pad(Bc, (0, 0, 0, 0, 0, pad)), F.pad(Cc, (0, 0, 0, 0, 0, pad))

    # position l = c*T + t and head h = g*r + i (r heads per group): B and C are shared by the r heads of a
    # group, so every product with B or C folds those heads into its matrix dimension (r*P) instead of copying
    # B, C per head.
    G, r, P, N = ngroups, heads_per_group, headdim, d_state
    a = a.reshape(batch, nchunks, T, G, r).permute(0, 3, 4, 1, 2)  # (b, G, r, c, T)
    xdt = xdt.reshape(batch, nchunks, T, G, r, P)  # (b, c, T, G, r, P)
    Bc = Bc.reshape(batch, nchunks, T, G, N).permute(0, 3, 1, 2, 4)  # (b, G, c, T, N)
    Cc = Cc.reshape(batch, nchunks, T, G, N).permute(0, 3, 1, 2, 4)  # (b, G, c, T, N)

    # (a) decay inside each chunk, (b) diagonal blocks: the dual form on each chunk
    decay = _segsum(a).exp_()  # (b, G, r, c, T, T)
    scores = Cc @ Bc.transpose(-1, -2)  # (b, G, c, T, T)
    y_diag = (scores[:, :, None] * decay) @ xdt.permute(0, 3, 4, 1, 2, 5)  # (b, G, r, c, T, P)

    # (c) the state each chunk leaves behind, starting from zero: sum_s L[T-1, s] dt_s x_s ⊗ B_s, kept
    # transposed as (N, r*P)
    to_end = xdt * decay[..., -1, :].permute(0, 3, 4, 1, 2)[..., None]  # (b, c, T, G, r, P)
    to_end = to_end.permute(0, 3, 1, 2, 4, 5).reshape(batch, G, nchunks, T, r * P)  # (b, G, c, T, r*P)
    states = Bc.transpose(-1, -2) @ to_end  # (b, G, c, N, r*P)

    # (d) pass states across chunk boundaries: h_c = exp(sum of chunk c's a) h_{c-1} + states_c
    cum = a.cumsum(-1)  # (b, G, r, c, T) log-decay from the chunk start through t
    chunk_decay = torch.exp(cum[..., -1]).permute(0, 1, 3, 2)[:, :, :, None, :, None]  # (b, G, c, 1, r, 1)
    states = states.view(batch, G, nchunks, N, r, P)
    if initial_state is None:
        h = xdt.new_zeros(batch, G, N, r, P)
    else:
        h = initial_state.to(cdt).reshape(batch, G, r, P, N).permute(0, 1, 4, 2, 3)  # (b, G, N, r, P)
    entering = []
    for c in range(nchunks):
        entering.append(h)
        h = chunk_decay[:, :, c] * h + states[:, :, c]
    entering = torch.stack(entering, dim=2).view(batch, G, nchunks, N, r * P)  # (b, G, c, N, r*P)

    # (e) off-diagonal blocks: what the carried state contributes, decayed to each position
    y_off = (Cc @ entering).view(batch, G, nchunks, T, r, P)  # (b, G, c, T, r, P)
    y_off = y_off * torch.exp(cum).permute(0, 1, 3, 4, 2)[..., None]

    y = y_off.add_(y_diag.permute(0, 1, 3, 4, 2, 5))  # (b, G, c, T, r, P)
    y = y.permute(0, 2, 3, 1, 4, 5).reshape(batch, nchunks * T, nheads, headdim)[:, :seqlen]  # (b, l, H, P)
    y = _skip_and_gate(y, x.to(cdt), D, z)
    h = h.permute(0, 1, 3, 4, 2).reshape(batch, nheads, headdim, d_state)  # (b, H, P, N)
    return y.to(x.dtype), h


# ---------------------------------------------------------------------------------------------- dispatch


def _float32_compute(x: torch.Tensor):
    """Switch autocast off: the paths cast to float32 themselves, and bf16 matmuls would lose the scan's precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def select_backend(
    backend: str, x: torch.Tensor, *tensors, seqlen=None, kernel=("seqlab.ops.triton.ssd", "ssd_triton")
) -> str:
    """Resolve ``auto``: CUDA -> triton when usable and importable, else torch; CPU -> ref for L <= 2, else torch.

    Triton under the CPU interpreter is only used when asked for explicitly.
    """
    if backend != "auto":
        return backend
    if x.is_cuda:
        if triton_usable(x, *tensors) and triton_entry(*kernel) is not None:
            return "triton"
        return "torch"
    return "ref" if seqlen is not None and seqlen <= CPU_LOOP_MAX_LEN else "torch"


def ssd(
    x,
    dt,
    A,
    B,
    C,
    chunk_size=64,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=True,
    initial_state=None,
    return_final_state=False,
    seq_idx=None,
    backend="auto",
):
    """Mamba-2 SSD scan. x (b, l, H, P), dt (b, l, H), A (H,), B, C (b, l, G, N) -> y (b, l, H, P).

    Optional: D (H,) or (H, P); z (b, l, H, P) gate; dt_bias (H,); initial_state (b, H, P, N);
    seq_idx (b, l) int document index (the state resets where it changes; ``initial_state`` feeds only the
    row's first document). Returns y in the dtype of x, or (y, final_state) with final_state (b, H, P, N)
    float32 (float64 for float64 inputs) when ``return_final_state``.

    backend: "ref" per-timestep loop (extra memory O(b·H·P·N); O(b·L·H·P·N) under autograd), "torch" chunked
    (O(b·H·L·chunk_size) for the decay/score matrices + O(b·H·P·N·L/chunk_size) chunk states), "triton"
    fused kernels, "auto" picks (see ``select_backend``).
    """
    check_backend(backend)
    _validate(x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, chunk_size)
    path = select_backend(backend, x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx, seqlen=x.shape[1])
    misfit = triton_misfit("ssd", x=x, B=B)
    if path == "triton" and misfit is not None:
        if backend == "triton":
            raise misfit
        path = "torch"  # auto: sizes the kernels are not built for take the chunked torch path
    if path == "triton":
        require_triton("ssd", x, dt, A, B, C, D, z, dt_bias, initial_state, seq_idx)
    if path == "triton" and x.shape[1] > 0:
        ssd_triton = triton_entry("seqlab.ops.triton.ssd", "ssd_triton")
        if ssd_triton is None:
            raise BackendUnavailable("ssd: backend='triton' but seqlab.ops.triton.ssd.ssd_triton cannot be imported")
        y, final_state = ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
    elif path in ("ref", "triton") or x.shape[1] == 0:
        with _float32_compute(x):
            y, final_state = _ssd_ref(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx)
    else:
        with _float32_compute(x):
            y, final_state = _ssd_chunked(
                x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, initial_state, seq_idx
            )
    return (y, final_state) if return_final_state else y


def ssd_quadratic(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, seq_idx=None):
    """The dual form over the whole sequence: Y = (L ∘ C Bᵀ)(dt X) + D X, gated by silu(z).

    Same arguments and shapes as ``ssd`` (no initial state). Peak extra memory O(b·H·L²): it materialises
    the full (L, L) decay mask per head, like attention without softmax. Computes in float32 (float64 for
    float64 inputs); returns y in the dtype of x.
    """
    _validate(x, dt, A, B, C, D, z, dt_bias, None, seq_idx)
    with _float32_compute(x):
        return _ssd_quadratic(x, dt, A, B, C, D, z, dt_bias, dt_softplus, seq_idx)


def _ssd_quadratic(x, dt, A, B, C, D, z, dt_bias, dt_softplus, seq_idx):
    cdt = compute_dtype(x)
    nheads = x.shape[2]
    dt = step_size(dt, dt_bias, dt_softplus, cdt)  # (b, l, H)
    a = _log_decay(dt, A, seq_idx).transpose(1, 2)  # (b, H, l)
    decay = torch.exp(_segsum(a))  # (b, H, l, l)
    Bh = _heads_of_groups(B.to(cdt), nheads)  # (b, l, H, N)
    Ch = _heads_of_groups(C.to(cdt), nheads)
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh)  # (b, H, l, l)
    xc = x.to(cdt)
    y = torch.einsum("bhts,bshp->bthp", scores * decay, xc * dt[..., None])  # (b, l, H, P)
    return _skip_and_gate(y, xc, D, z).to(x.dtype)


# ------------------------------------------------------------------------------------------------ decode


def _validate_step(state, x, dt, A, B, C, D, z, dt_bias):
    check_tensor("x", x, ("B", "H", "P"))
    dev = x.device
    batch, nheads, headdim = x.shape
    check_tensor("dt", dt, (batch, nheads), device=dev)
    check_tensor("A", A, (nheads,), device=dev)
    check_tensor("B", B, (batch, "G", "N"), device=dev)
    check_tensor("C", C, (batch, "G", "N"), device=dev)
    d_state = _check_groups(x, B, C, ((batch, "batch of x"),))
    check_tensor("state", state, (batch, nheads, headdim, d_state), device=dev)
    _check_skip_gate_bias(x, D, z, dt_bias)


def _ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One step of the recurrence, updating ``state`` (b, H, P, N) in place; computes in the state's dtype."""
    cdt = state.dtype
    nheads = x.shape[1]
    dt = step_size(dt, dt_bias, dt_softplus, cdt)  # (b, H)
    decay = torch.exp(dt * A.to(cdt))  # (b, H)
    xc = x.to(cdt)
    Bh = _heads_of_groups(B.to(cdt), nheads)  # (b, H, N)
    Ch = _heads_of_groups(C.to(cdt), nheads)
    state.mul_(decay[..., None, None]).add_((dt[..., None] * xc)[..., None] * Bh[:, :, None, :])  # (b, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)  # (b, H, P)
    return _skip_and_gate(y, xc, D, z).to(x.dtype)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, backend="auto",
                     A_is_log=False):
    """One decode step of ``ssd``: updates ``state`` (b, H, P, N) in place and returns y (b, H, P).

    x, z (b, H, P); dt (b, H); A, dt_bias (H,); B, C (b, G, N); D (H,) or (H, P). Equals one position of
    ``ssd`` started from ``state``. Extra memory O(b·H·P·N) on the ref/torch paths. ``A_is_log=True``: ``A``
    holds A_log and the step uses A = -exp(A_log) (inside the Triton kernel). x, z, dt, B, C may be strided
    views; the Triton kernel reads them without copies.
    """
    check_backend(backend)
    _validate_step(state, x, dt, A, B, C, D, z, dt_bias)
    kernel = ("seqlab.ops.triton.decode", "ssd_state_update_triton")
    path = select_backend(backend, x, state, dt, A, B, C, D, z, dt_bias, kernel=kernel)
    if path == "triton":
        require_triton("ssd_state_update", state, x, dt, A, B, C, D, z, dt_bias)
        fn = triton_entry(*kernel)
        if fn is None:
            raise BackendUnavailable(
                "ssd_state_update: backend='triton' but seqlab.ops.triton.decode cannot be imported"
            )
        return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=A_is_log)
    if A_is_log:
        A = -torch.exp(A.to(state.dtype))
    with _float32_compute(x):
        return _ssd_step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
