"""Mamba-1 selective scan (Gu & Dao 2023, "Mamba", Algorithm 2 / eq. 2a-2b with ZOH-simplified B).

Glossary (paper symbol -> name here):
    x      -> u        (B, L, D)     input sequence, D channels ("d_inner")
    Δ      -> delta    (B, L, D)     step size; Δ = softplus(delta + delta_bias) when delta_softplus
    A      -> A        (D, N)        state matrix (diagonal per channel, A < 0), N = d_state
    B, C   -> B, C     (B, L, N) or (B, L, G, N)   input-dependent projections; channel d uses group d // (D // G)
    D      -> D        (D,)          skip connection
    z      -> z        (B, L, D)     gate: y *= silu(z)
    h      -> state    (B, D, N)     hidden state, always accumulated in float32 (float64 for float64 inputs)

Recurrence (discretised with Ā = exp(ΔA), B̄x ≈ ΔBx, Mamba section 3.2):
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t
    y_t = <h_t, C_t> + D u_t

Paths:
    ref     plain per-timestep loop, obviously right (autograd through the loop).
    torch   chunked parallel scan with a hand-written backward (``_ChunkedScan``), CPU and GPU.
    triton  fused kernels in ``seqlab.ops.triton.selective_scan`` (CUDA, or CPU under TRITON_INTERPRET=1).
On the CPU, ``auto`` also has a lean sequential scan (same autograd Function, one fused op per time step).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seqlab.errors import InputError
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
from seqlab.ops.decode_linear import decode_linear

__all__ = ["selective_scan", "selective_state_update"]

CHUNK_SIZE = 64
# Elements of one (B, T, D, N) work tensor of a time group; the torch paths materialise a handful of these at
# once (about 4 in forward, 7 in backward), so peak extra memory is ~7 * GROUP_ELEMENTS * 4 bytes per call.
GROUP_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}

# CPU choice of backend="auto" between the lean loop and the chunked scan. Both run the same Function; the loop
# issues ~1 op per time step on (B, D, N) tensors, the chunked scan ~2 * CHUNK_SIZE + L / CHUNK_SIZE ops on larger
# tensors plus ~3 extra passes over (B, L, D, N). So the chunked scan wins while per-op overhead dominates, i.e.
# while B * D * N is small. Measured on the 2-core box (OMP_NUM_THREADS=1, N=16, best of 5, ms fwd / fwd+bwd):
#   B*D*N   B  L     D     loop          chunked
#   1024    1  256   64    2.0 / 7.8     1.5 / 6.5
#   1024    1  4096  64    38 / 123      15 / 87
#   2048    2  1024  64    9.9 / 50      20 / 53
#   2048    1  1024  128   9.2 / 45      7.6 / 39
#   4096    4  256   64    7.1 / 18      3.8 / 19
#   4096    2  1024  128   14 / 97       30 / 89
#   4096    1  2048  256   28 / 179      73 / 195
#   16384   4  512   256   43 / 157      60 / 142
#   24576   1  1024  1536  92 / 344      90 / 382
# (the box is shared, so single numbers carry ~30% noise). Rule: the chunked scan while B*D*N <= 1024, where it
# wins every time; from 2048 up the two trade places within noise and the loop is the safe choice.
CPU_CHUNKED_MAX_STATE = 1024


# ----------------------------------------------------------------------------------------------------------------
# validation


def _as_grouped(name: str, t: torch.Tensor, shape_3d: tuple, shape_4d: tuple, device: torch.device) -> torch.Tensor:
    """Check B or C and return it in grouped form (B, L, G, N) (or (B, G, N) for decode)."""
    check_tensor(name, t, None, device=device)
    if t.dim() == len(shape_3d):
        return t.unsqueeze(-2)
    if t.dim() != len(shape_4d):
        want = ", ".join(str(s) for s in shape_3d)
        want4 = ", ".join(str(s) for s in shape_4d)
        raise InputError(name, f"a tensor of shape ({want}) or ({want4})", f"shape {tuple(t.shape)}")
    return t


def _check_groups(name: str, t: torch.Tensor, dim: int, lead: tuple, lead_desc: str, given: tuple) -> None:
    """B/C in grouped form: leading dims ``lead``, then G groups that divide the ``dim`` channels; messages show
    the shape as ``given`` (before an ungrouped B/C gained its G = 1 dim)."""
    if tuple(t.shape[: len(lead)]) != lead:
        raise InputError(name, f"leading dims {lead} ({lead_desc})", f"shape {given}")
    G = t.shape[len(lead)]
    if G < 1 or dim % G != 0:
        raise InputError(name, f"a group count G that divides D={dim} (channel d uses group d // (D // G))",
                         f"G={G} from shape {given}")


def _grouped_B_C(B, C, lead_names: tuple, lead: tuple, lead_desc: str, dim: int, d_state: int, device):
    """Check B and C, (*lead, N) or (*lead, G, N) alike, and return both in grouped form (*lead, G, N)."""
    shape_3d, shape_4d = (*lead_names, "N"), (*lead_names, "G", "N")
    Bg = _as_grouped("B", B, shape_3d, shape_4d, device)
    Cg = _as_grouped("C", C, shape_3d, shape_4d, device)
    _check_groups("B", Bg, dim, lead, lead_desc, tuple(B.shape))
    check_dim("B", B, B.dim() - 1, d_state, "N, the state size of A")
    if tuple(Cg.shape) != tuple(Bg.shape) or C.dim() != B.dim():
        raise InputError("C", f"the shape of B {tuple(B.shape)}", f"shape {tuple(C.shape)}")
    return Bg, Cg


def _check_like(name: str, t, labels: tuple, like_name: str, like: torch.Tensor, optional: bool = False) -> None:
    """A tensor (dims named ``labels``) that must have the shape of ``like``."""
    check_tensor(name, t, labels, optional=optional, device=like.device)
    if t is not None and tuple(t.shape) != tuple(like.shape):
        raise InputError(name, f"shape {tuple(like.shape)} like {like_name}", f"shape {tuple(t.shape)}")


def _check_same_device(dev: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != dev:
            raise InputError(name, f"a tensor on {dev} like the other inputs", f"one on {t.device}")


def _validate_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, backend):
    """Check every argument of selective_scan; return (B, C) in grouped form (B, L, G, N)."""
    check_backend(backend)
    check_tensor("u", u, ("B", "L", "D"))
    dev = u.device
    batch, seqlen, dim = u.shape
    if seqlen == 0:
        raise InputError("u", "at least one time step (L >= 1)", f"shape {tuple(u.shape)}")
    _check_like("delta", delta, ("B", "L", "D"), "u", u)
    check_tensor("A", A, ("D", "N"), device=dev)
    check_dim("A", A, 0, dim, "D, the channels of u")
    d_state = A.shape[1]
    B4, C4 = _grouped_B_C(B, C, ("B", "L"), (batch, seqlen), "batch and length of u", dim, d_state, dev)
    check_tensor("D", D, (dim,), optional=True, device=dev)
    _check_like("z", z, ("B", "L", "D"), "u", u, optional=True)
    check_tensor("delta_bias", delta_bias, (dim,), optional=True, device=dev)
    check_tensor("initial_state", initial_state, (batch, dim, d_state), optional=True, device=dev)
    check_seq_idx(seq_idx, batch, seqlen)
    _check_same_device(dev, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                       initial_state=initial_state, seq_idx=seq_idx)
    return B4, C4


# ----------------------------------------------------------------------------------------------------------------
# ref: the readable definition


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None):
    """y + D u, then y * silu(z) (Mamba's skip connection and output gate); y, u (..., D) in the compute dtype."""
    if D is not None:
        y = y + D.to(y.dtype) * u
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx):
    """Per-timestep loop in float32 (float64 for float64 u). B, C grouped (B, L, G, N).

    Peak extra memory O(B*D*N) per step plus autograd's saved per-step tensors, O(B*L*D*N) in all.
    """
    dtype = compute_dtype(u)
    batch, seqlen, dim = u.shape
    G = B.shape[2]
    u, A = u.to(dtype), A.to(dtype)
    B = B.to(dtype).repeat_interleave(dim // G, dim=2)  # (B, L, D, N)
    C = C.to(dtype).repeat_interleave(dim // G, dim=2)  # (B, L, D, N)
    delta = step_size(delta, delta_bias, delta_softplus, dtype)
    h = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    if initial_state is not None:
        h = initial_state.to(dtype)
    ys = []
    # unbind once: indexing [:, t] inside the loop would make backward materialise a full-size gradient per step
    steps = zip(u.unbind(1), delta.unbind(1), B.unbind(1), C.unbind(1))
    for t, (u_t, delta_t, B_t, C_t) in enumerate(steps):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).to(dtype)  # (B,)
            h = h * (1 - new_doc)[:, None, None]
        decay = torch.exp(delta_t[:, :, None] * A)  # (B, D, N)
        h = decay * h + delta_t[:, :, None] * B_t * u_t[:, :, None]
        ys.append((h * C_t).sum(-1))  # (B, D)
    y = torch.stack(ys, dim=1)  # (B, L, D)
    return _skip_and_gate(y, u, D, z), h


# ----------------------------------------------------------------------------------------------------------------
# torch: chunked parallel scan and lean loop sharing one autograd Function


def _scan_sequential(a: torch.Tensor, x: torch.Tensor, h_start: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + x_t over dim 1 from h_{-1} = h_start (or, with ``reverse``, h_t = a_t * h_{t+1} + x_t
    from h_T = h_start). a, x (B, T, D, N); x is overwritten with h and returned. Extra memory: none."""
    prev = h_start
    for t in reversed(range(x.shape[1])) if reverse else range(x.shape[1]):
        prev = x[:, t].addcmul_(a[:, t], prev)
    return x


def _scan_chunked(a: torch.Tensor, x: torch.Tensor, h_start: torch.Tensor, chunk: int,
                  reverse: bool = False) -> torch.Tensor:
    """Same recurrence as ``_scan_sequential``, as a two-level chunked scan; x is overwritten with h.

    1. Split time into nc chunks of ``chunk`` steps and scan all chunks at once from a zero state
       (``chunk`` ops on (B, nc, D, N) slices: step j of every chunk advances together).
    2. Alongside, the cumulative decay inside each chunk, P_j = prod_{i<=j} a_i: a product of values in
       [0, 1] for Mamba (exp of delta*A <= 0), so nothing overflows; a document start has a = 0 and cuts it.
    3. Carry the state across chunks, H_k = P_{k,last} H_{k-1} + h_{k,last} (nc ops on (B, D, N)).
    4. Correct every position: h_j += P_j * H_{k-1}.
    Steps left over when T is not a multiple of ``chunk`` run sequentially at the end (in scan order).
    Peak extra memory: one (B, T, D, N) buffer for P.
    """
    T = x.shape[1]
    main = (T // chunk) * chunk
    if main == 0:
        return _scan_sequential(a, x, h_start, reverse)
    nc = main // chunk
    span = slice(T - main, T) if reverse else slice(0, main)
    xs = x[:, span].unflatten(1, (nc, chunk))  # (B, nc, c, D, N)
    as_ = a[:, span].unflatten(1, (nc, chunk))  # (B, nc, c, D, N)
    first, last, step = (chunk - 1, 0, -1) if reverse else (0, chunk - 1, 1)
    P = torch.empty_like(xs)  # running product: torch.cumprod over a middle dim is ~10x slower on the CPU
    P[:, :, first] = as_[:, :, first]
    for j in range(first + step, last + step, step):
        xs[:, :, j].addcmul_(as_[:, :, j], xs[:, :, j - step])
        torch.mul(as_[:, :, j], P[:, :, j - step], out=P[:, :, j])
    carry = torch.empty_like(xs[:, :, 0])  # (B, nc, D, N): the state entering each chunk
    order = list(reversed(range(nc))) if reverse else list(range(nc))
    carry[:, order[0]] = h_start
    for k, k_next in zip(order, order[1:]):
        torch.addcmul(xs[:, k, last], P[:, k, last], carry[:, k], out=carry[:, k_next])
    xs.addcmul_(P, carry.unsqueeze(2))
    if main < T:
        rest = slice(0, T - main) if reverse else slice(main, T)
        H = x[:, T - main] if reverse else x[:, main - 1]
        _scan_sequential(a[:, rest], x[:, rest], H, reverse)
    return x


def _decays_and_inputs(delta, u, A, B, reset):
    """a = exp(delta * A) (0 at document starts) and x = delta * u * B, both (B, T, D, N)."""
    batch, T, dim = u.shape
    G = B.shape[2]
    a = torch.exp(delta.unsqueeze(-1) * A)  # (B, T, D, N)
    if reset is not None:
        a.masked_fill_(reset[:, :, None, None], 0.0)
    du = (delta * u).view(batch, T, G, dim // G, 1)
    x = (du * B.unsqueeze(3)).flatten(2, 3)  # (B, T, D, N)
    return a, x


def _grouped(t: torch.Tensor, G: int) -> torch.Tensor:
    """(B, T, D, ...) -> (B, T, G, D // G, ...)."""
    return t.unflatten(2, (G, t.shape[2] // G))


class _ScanFn(torch.autograd.Function):
    """y_t = <h_t, C_t> and the last state, for h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t.

    Saves only the inputs and one (B, D, N) state per time group; backward recomputes each group's states and
    runs the adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} with the same scan, in reverse.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, reset, chunk, group):
        batch, L, dim = u.shape
        G = B.shape[2]
        scan = functools.partial(_scan_chunked, chunk=chunk) if chunk else _scan_sequential
        h = h0 if h0 is not None else u.new_zeros(batch, dim, A.shape[1])
        y = u.new_empty(batch, L, dim)
        starts = []
        for s in range(0, L, group):
            e = min(s + group, L)
            starts.append(h)
            a, x = _decays_and_inputs(delta[:, s:e], u[:, s:e], A, B[:, s:e], None if reset is None else reset[:, s:e])
            hs = scan(a, x, h)
            y[:, s:e] = torch.einsum("btgdn,btgn->btgd", _grouped(hs, G), C[:, s:e]).flatten(2)
            h = hs[:, -1].clone()
        ctx.save_for_backward(u, delta, A, B, C, h0, reset, *starts)
        ctx.chunk, ctx.group = chunk, group
        return y, h

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, A, B, C, h0, reset, *starts = ctx.saved_tensors
        chunk, group = ctx.chunk, ctx.group
        batch, L, dim = u.shape
        G = B.shape[2]
        scan = functools.partial(_scan_chunked, chunk=chunk) if chunk else _scan_sequential
        gu, gdelta, gB, gC = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        carry = gh_last  # dLoss/dh at the last position of the current group, from later positions
        for i in reversed(range(len(starts))):
            s = i * group
            e = min(s + group, L)
            h_start = starts[i]
            rs = None if reset is None else reset[:, s:e]
            a, x = _decays_and_inputs(delta[:, s:e], u[:, s:e], A, B[:, s:e], rs)
            hs = scan(a, x, h_start)
            gy_g = _grouped(gy[:, s:e], G)  # (B, T, G, Dg)
            gh = (gy_g.unsqueeze(-1) * C[:, s:e].unsqueeze(3)).flatten(2, 3)  # (B, T, D, N)
            # adjoint recurrence backwards in time: g_t = C_t dy_t + a_{t+1} g_{t+1}
            gh[:, -1] += carry
            scan(a[:, 1:], gh[:, :-1], gh[:, -1], reverse=True)  # gh: dLoss/dh_t
            gC[:, s:e] = torch.einsum("btgd,btgdn->btgn", gy_g, _grouped(hs, G))
            ghg = _grouped(gh, G)  # (B, T, G, Dg, N)
            gx_B = torch.einsum("btgdn,btgn->btgd", ghg, B[:, s:e]).flatten(2)  # (B, T, D)
            du = (delta[:, s:e] * u[:, s:e])
            gB[:, s:e] = torch.einsum("btgdn,btgd->btgn", ghg, _grouped(du, G))
            # w = dLoss/d(delta*A) = g_t * h_{t-1} * a_t
            w = gh * a
            w[:, 1:] *= hs[:, :-1]
            w[:, 0] *= h_start
            gdelta[:, s:e] = gx_B * u[:, s:e] + torch.einsum("btdn,dn->btd", w, A)
            gu[:, s:e] = gx_B * delta[:, s:e]
            gA += torch.einsum("btdn,btd->dn", w, delta[:, s:e])
            carry = a[:, 0] * gh[:, 0]
        gh0 = carry if h0 is not None else None
        return gu, gdelta, gA, gB, gC, gh0, None, None, None


def _group_len(batch: int, dim: int, d_state: int, device: torch.device, chunk: int) -> int:
    per_step = max(1, batch * dim * d_state)
    budget = GROUP_ELEMENTS.get(device.type, GROUP_ELEMENTS["cuda"])
    steps = max(1, budget // per_step)
    return max(chunk, (steps // chunk) * chunk) if chunk else steps


def _selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                         chunked=True, chunk_size=None, group_len=None):
    """Shared wrapper of the torch paths: chunked parallel scan (``chunked``) or lean sequential loop.

    B, C grouped (B, L, G, N). Gating, skip and softplus are elementwise (B, L, D) ops under autograd; the
    scan itself is ``_ScanFn``. Peak extra memory O(B*T*D*N) for a time group of T = group_len steps
    (about 7 tensors of GROUP_ELEMENTS elements in backward), plus O(B*L*D) for activations.
    """
    dtype = compute_dtype(u)
    batch, seqlen, dim = u.shape
    chunk = (chunk_size or CHUNK_SIZE) if chunked else 0
    group = group_len or _group_len(batch, dim, A.shape[1], u.device, chunk)
    uc, Ac = u.to(dtype), A.to(dtype)
    dc = step_size(delta, delta_bias, delta_softplus, dtype)
    h0 = None if initial_state is None else initial_state.to(dtype)
    reset = None if seq_idx is None else reset_mask(seq_idx)
    with torch.autocast(u.device.type, enabled=False):  # the scan accumulates in float32 even under autocast
        y, h = _ScanFn.apply(uc, dc, Ac, B.to(dtype), C.to(dtype), h0, reset, chunk, group)
    return _skip_and_gate(y, uc, D, z), h


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def _kernel_importable(module: str, name: str) -> bool:
    return triton_entry(f"seqlab.ops.triton.{module}", name) is not None


def _cpu_prefers_chunked(batch: int, dim: int, d_state: int) -> bool:
    return batch * dim * d_state <= CPU_CHUNKED_MAX_STATE


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Mamba-1 selective scan. u, delta, z (B, L, D); A (D, N); B, C (B, L, N) or (B, L, G, N); D, delta_bias (D,);
    initial_state (B, D, N); seq_idx (B, L) int document ids (the state resets where the id changes;
    initial_state applies to each row's first document only).

    Returns y (B, L, D) in u's dtype, or (y, final_state) with final_state (B, D, N) float32 (float64 for float64
    inputs) when return_final_state. backend: "auto" | "ref" | "torch" | "triton".
    """
    B4, C4 = _validate_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, backend)
    tensors = (u, delta, A, B4, C4, D, z, delta_bias, initial_state)
    if backend == "auto":
        if u.is_cuda:
            use_triton = triton_usable(*tensors) and _kernel_importable("selective_scan", "selective_scan_triton")
            backend = "triton" if use_triton and triton_misfit("selective_scan", A=A) is None else "torch"
        else:
            backend = "torch" if _cpu_prefers_chunked(u.shape[0], u.shape[2], A.shape[1]) else "loop"
    if backend == "triton":
        require_triton("selective_scan", *tensors)
        misfit = triton_misfit("selective_scan", A=A)
        if misfit is not None:
            raise misfit
        from seqlab.ops.triton.selective_scan import selective_scan_triton

        y, h = selective_scan_triton(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
    elif backend == "ref":
        y, h = _selective_scan_ref(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, seq_idx)
    else:
        y, h = _selective_scan_fast(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, seq_idx,
                                    chunked=backend == "torch")
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y


def _validate_step(state, x, dt, A, B, C, D, z, dt_bias, backend, dt_proj_weight=None):
    check_backend(backend)
    check_tensor("x", x, ("B", "D"))
    dev = x.device
    batch, dim = x.shape
    check_tensor("state", state, ("B", "D", "N"), device=dev)
    check_tensor("A", A, ("D", "N"), device=dev)
    check_dim("A", A, 0, dim, "D, the channels of x")
    d_state = A.shape[1]
    if tuple(state.shape) != (batch, dim, d_state):
        want = f"shape {(batch, dim, d_state)} (B of x, D of x, N of A)"
        raise InputError("state", want, f"shape {tuple(state.shape)}")
    if dt_proj_weight is None:
        _check_like("dt", dt, ("B", "D"), "x", x)
    else:
        check_tensor("dt_proj_weight", dt_proj_weight, ("D", "R"), device=dev)
        check_dim("dt_proj_weight", dt_proj_weight, 0, dim, "D, the channels of x")
        check_tensor("dt", dt, (batch, dt_proj_weight.shape[1]), device=dev)
    B3, C3 = _grouped_B_C(B, C, ("B",), (batch,), "batch of x", dim, d_state, dev)
    check_tensor("D", D, (dim,), optional=True, device=dev)
    _check_like("z", z, ("B", "D"), "x", x, optional=True)
    check_tensor("dt_bias", dt_bias, (dim,), optional=True, device=dev)
    _check_same_device(dev, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    return B3, C3


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    backend: str = "auto",
    A_is_log: bool = False,
    dt_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of the selective scan; updates ``state`` (B, D, N) in place and returns y (B, D).

    x, dt, z (B, D); A (D, N); B, C (B, N) or (B, G, N); D, dt_bias (D,). Same math, in the same float order, as
    one position of ``selective_scan``. ``A_is_log=True``: ``A`` holds A_log and the step uses A = -exp(A_log)
    (the Triton kernel computes it in registers, so a decode step launches no separate exp/neg). x, dt, z, B, C
    may be strided views (slices of a projection's output); the Triton kernel reads them without copies.
    ``dt_proj_weight`` (D, R): ``dt`` is the low-rank (B, R) input of Mamba's dt projection and the step uses
    dt = dt @ dt_proj_weightᵀ (on CUDA a decode GEMM, ``seqlab.ops.decode_linear``, or inside the step kernel
    when ``seqlab.ops.triton.decode.TUNING["dt_rows"]`` asks for it).
    The state may be float32 or a 16-bit float (read, updated in float32, rounded once when stored).
    """
    B3, C3 = _validate_step(state, x, dt, A, B, C, D, z, dt_bias, backend, dt_proj_weight)
    if backend == "triton" or (backend == "auto" and x.is_cuda and triton_usable(state, x, dt, A, B3, C3)
                               and _kernel_importable("decode", "selective_state_update_triton")):
        require_triton("selective_state_update", state, x, dt, A, B3, C3, D, z, dt_bias)
        from seqlab.ops.triton import decode as triton_decode

        if dt_proj_weight is not None and not triton_decode.TUNING.get("dt_rows"):  # the projection as its own GEMM
            dt, dt_proj_weight = decode_linear(dt, dt_proj_weight), None
        return triton_decode.selective_state_update_triton(state, x, dt, A, B3, C3, D, z, dt_bias, dt_softplus,
                                                           A_is_log=A_is_log, dt_proj_weight=dt_proj_weight)
    if dt_proj_weight is not None:
        with torch.autocast(x.device.type, enabled=False):
            dt = F.linear(dt.to(compute_dtype(dt)), dt_proj_weight.to(compute_dtype(dt)))
    dtype = compute_dtype(state)
    if A_is_log:
        A = -torch.exp(A.to(dtype))
    batch, dim = x.shape
    G = B3.shape[1]
    xc, delta = x.to(dtype), step_size(dt, dt_bias, dt_softplus, dtype)
    a = torch.exp(delta.unsqueeze(-1) * A.to(dtype))  # (B, D, N)
    du = (delta * xc).view(batch, G, dim // G, 1)
    inp = (du * B3.to(dtype).unsqueeze(2)).flatten(1, 2)  # (B, D, N)
    h = inp.addcmul_(a, state.to(dtype))
    state.copy_(h)
    with torch.autocast(x.device.type, enabled=False):
        y = torch.einsum("bgdn,bgn->bgd", h.unflatten(1, (G, dim // G)), C3.to(dtype)).flatten(1)  # (B, D)
    return _skip_and_gate(y, xc, D, z).to(x.dtype)
