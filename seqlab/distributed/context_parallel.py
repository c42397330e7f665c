"""Context (sequence) parallelism for the SSM scans: one long sequence is split along L across the ranks of a
process group; rank r holds positions [r L/R, (r+1) L/R). The result equals the single-device op, forward and
backward (autograd runs through the collectives).

Why it works (SSD paper, Dao & Gu 2024, Sec. 6 "state passing"): the scan is a linear recurrence, so over
rank r's chunk

    h_end[r] = Decay[r] * h_start[r] + h_local[r]

where ``h_local[r]`` is the chunk's final state from a zero start and ``Decay[r]`` the product of the chunk's
per-step decays: exp(A_h * sum_t Δ_t) per head for SSD, exp(A[d, n] * sum_t Δ_t[d]) per (D, N) channel for
Mamba-1's selective scan. Every rank computes its own (Decay, h_local), the ranks all-gather these summaries
(differentiably), and rank r finds its true start by the prefix combination

    h_start[0] = 0,    h_start[r] = Decay[r-1] * h_start[r-1] + h_local[r-1]

then reruns its chunk from ``h_start[r]``. The rerun costs a second scan on ranks > 0; it reuses the op
unchanged (so D, z gating and every backend behave exactly as on one device). Packed documents (``seq_idx``)
are exact too: a document start inside a chunk zeroes its Decay, one at a chunk's first position zeroes its
h_start.

The depthwise causal conv before the scan needs the previous rank's last ``W-1`` inputs (its halo); they are
gathered the same way and prepended to the local chunk.

Gradients: the summaries are gathered with ``gather_from_ranks``, whose backward sums every rank's gradient
for a rank's summary (an all-reduce), so gradients reach the rank whose chunk produced them. Gradients of
replicated parameters (A, dt_bias, D, ...) are per-rank partial sums: all-reduce them (DDP does) to get the
single-device gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqlab.errors import ConfigError, InputError
from seqlab.ops.conv import causal_conv1d
from seqlab.ops.selective_scan import selective_scan
from seqlab.ops.ssd import ssd


def _rank_and_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("context parallel: needs an initialised process group (launch with torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


class _GatherFromRanks(torch.autograd.Function):
    """forward: ``t (*S)`` on every rank -> ``(R, *S)`` stacked in rank order. backward: the gradient for rank r's
    slice is the sum over all ranks of their gradient for it (all-reduce, then take own slice)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        rank, size = _rank_and_size(group)
        ctx.rank = rank
        parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def gather_from_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather: ``t (*S)`` -> ``(R, *S)``, R the group size."""
    return _GatherFromRanks.apply(t, group)


def _gather_plain(t: torch.Tensor, group) -> torch.Tensor:
    """Non-differentiable all-gather (integer tensors): ``t (*S)`` -> ``(R, *S)``."""
    _, size = _rank_and_size(group)
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _boundary_keep(seq_idx: torch.Tensor | None, group) -> torch.Tensor | None:
    """(R, B) float: 1.0 where rank r's first position continues rank r-1's last document, else 0.0 (row 0: 0)."""
    if seq_idx is None:
        return None
    firsts = _gather_plain(seq_idx[:, 0], group)  # (R, B)
    lasts = _gather_plain(seq_idx[:, -1], group)
    keep = torch.zeros(firsts.shape, device=seq_idx.device)
    keep[1:] = (firsts[1:] == lasts[:-1]).float()
    return keep


def _inside_keep(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) 0.0 where a document starts inside the chunk (the state does not pass through it), else 1.0."""
    if seq_idx is None:
        return None
    return (seq_idx[:, 1:] == seq_idx[:, :-1]).all(dim=1).float()


def _true_start(decay: torch.Tensor, h_local: torch.Tensor, seq_idx, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix combination of the gathered (Decay, h_local) summaries -> (this rank's true start state, touch).

    decay broadcastable to h_local (B, ...) float32. ``touch`` is a zero scalar that depends on the gathered
    summaries: adding it to a rank's output keeps the gather in every rank's autograd graph, so all ranks take
    part in its backward all-reduce (rank 0 uses no summary itself).
    """
    rank, _ = _rank_and_size(group)
    batch = h_local.shape[0]
    decay = decay.to(h_local.dtype).expand_as(h_local)
    packed = gather_from_ranks(torch.cat([decay.reshape(batch, -1), h_local.reshape(batch, -1)], dim=1), group)
    decays, states = (t.reshape(-1, *h_local.shape) for t in packed.chunk(2, dim=2))  # (R, B, ...) each
    h = combine_states(decays, states, _boundary_keep(seq_idx, group), rank)
    return h, packed.sum() * 0.0


def combine_states(decays: torch.Tensor, states: torch.Tensor, keeps: torch.Tensor | None, upto: int) -> torch.Tensor:
    """The true start state of chunk ``upto`` from the chunks' summaries: ``decays``, ``states`` (R, B, ...)
    stacked per chunk, ``keeps`` (R, B) 0.0 where chunk r starts a new document (or None).

        h_start[0] = 0,   h_start[r] = keep[r] * (Decay[r-1] * h_start[r-1] + h_local[r-1])
    """
    h = torch.zeros_like(states[0])
    for r in range(upto):
        h = decays[r] * h + states[r]
        if keeps is not None:  # chunk r+1 starts a new document: nothing carries over
            h = h * keeps[r + 1].view(-1, *([1] * (h.dim() - 1)))
    return h


def ssd_chunk_decay(dt, A, dt_bias=None, dt_softplus=True, seq_idx=None) -> torch.Tensor:
    """Decay of a whole chunk per head: exp(A_h * sum_t Δ_t,h), 0 when a document starts inside it.
    dt (B, L, H), A (H,) -> (B, H) float32 (float64 for float64 dt)."""
    dtype = torch.float64 if dt.dtype == torch.float64 else torch.float32
    delta = dt.to(dtype) + (0 if dt_bias is None else dt_bias.to(dtype))
    delta = F.softplus(delta) if dt_softplus else delta  # (B, L, H)
    decay = torch.exp(A.to(dtype) * delta.sum(dim=1))  # (B, H)
    inside = _inside_keep(seq_idx)
    return decay if inside is None else decay * inside[:, None]


def scan_chunk_decay(delta, A, delta_bias=None, delta_softplus=True, seq_idx=None) -> torch.Tensor:
    """Decay of a whole chunk per (D, N) channel: exp(A[d, n] * sum_t Δ_t,d), 0 when a document starts inside it.
    delta (B, L, D), A (D, N) -> (B, D, N) float32 (float64 for float64 delta)."""
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    step = delta.to(dtype) + (0 if delta_bias is None else delta_bias.to(dtype))
    step = F.softplus(step) if delta_softplus else step  # (B, L, D)
    decay = torch.exp(step.sum(dim=1)[:, :, None] * A.to(dtype))  # (B, D, N)
    inside = _inside_keep(seq_idx)
    return decay if inside is None else decay * inside[:, None, None]


def ssd_context_parallel(
    x, dt, A, B, C, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=True, seq_idx=None,
    return_final_state=False, group=None, backend="auto",
):
    """``ssd`` on this rank's chunk of a sequence split along L across ``group``.

    x (B, L_r, H, P), dt (B, L_r, H), B, C (B, L_r, G, N), z (B, L_r, H, P), seq_idx (B, L_r): this rank's
    positions; A, D, dt_bias replicated. Returns y (B, L_r, H, P) [, final_state (B, H, P, N) float32 after this
    rank's last position].
    """
    rank, _ = _rank_and_size(group)
    first = ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                return_final_state=True, seq_idx=seq_idx, backend=backend)
    y, h_local = first  # h_local (B, H, P, N) from a zero start
    decay = ssd_chunk_decay(dt, A, dt_bias, dt_softplus, seq_idx)  # (B, H)
    h_start, touch = _true_start(decay[:, :, None, None], h_local, seq_idx, group)
    if rank == 0:
        y = y + touch.to(y.dtype)
        return (y, h_local) if return_final_state else y
    return ssd(x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              initial_state=h_start, return_final_state=return_final_state, seq_idx=seq_idx, backend=backend)


def selective_scan_context_parallel(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, seq_idx=None,
    return_final_state=False, group=None, backend="auto",
):
    """``selective_scan`` on this rank's chunk of a sequence split along L across ``group``.

    u, delta, z (B, L_r, D); B, C (B, L_r, N) or (B, L_r, G, N); seq_idx (B, L_r); A (D, N), D, delta_bias (D,)
    replicated. Returns y (B, L_r, D) [, final_state (B, D, N) float32].
    """
    rank, _ = _rank_and_size(group)
    y, h_local = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                return_final_state=True, seq_idx=seq_idx, backend=backend)  # h_local (B, D, N)
    decay = scan_chunk_decay(delta, A, delta_bias, delta_softplus, seq_idx)  # (B, D, N)
    h_start, touch = _true_start(decay, h_local, seq_idx, group)
    if rank == 0:
        y = y + touch.to(y.dtype)
        return (y, h_local) if return_final_state else y
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          initial_state=h_start, return_final_state=return_final_state, seq_idx=seq_idx,
                          backend=backend)


def causal_conv1d_context_parallel(x, weight, bias=None, activation=None, seq_idx=None, group=None):
    """``causal_conv1d`` on this rank's chunk: the previous rank's last ``W-1`` inputs (the halo) are gathered
    and prepended, so the chunk's first outputs see the same window as on one device.

    x (B, L_r, D) with L_r >= W-1, weight (D, W). Returns y (B, L_r, D).
    """
    rank, _ = _rank_and_size(group)
    halo_len = weight.shape[1] - 1
    if x.shape[1] < halo_len:
        raise InputError("x", f"at least d_conv - 1 = {halo_len} positions per rank", f"{x.shape[1]}")
    if halo_len == 0:
        return causal_conv1d(x, weight, bias, activation=activation, seq_idx=seq_idx)
    tails = gather_from_ranks(x[:, x.shape[1] - halo_len:], group)  # (R, B, W-1, D)
    halo = tails[rank - 1] if rank > 0 else tails[0] * 0.0  # zeros still tied to the gather (see _true_start)
    x_ext = torch.cat([halo, x], dim=1)  # (B, W-1 + L_r, D)
    seq_ext = None
    if seq_idx is not None:
        idx_tails = _gather_plain(seq_idx[:, seq_idx.shape[1] - halo_len:].contiguous(), group)  # (R, B, W-1)
        # rank 0's halo is zero padding, as on one device: label it with the first document
        halo_idx = idx_tails[rank - 1] if rank > 0 else seq_idx[:, :1].expand(-1, halo_len)
        seq_ext = torch.cat([halo_idx, seq_idx], dim=1)
    y = causal_conv1d(x_ext, weight, bias, activation=activation, seq_idx=seq_ext)
    return y[:, halo_len:]


def split_sequence(t: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of ``t`` along ``dim`` (L must divide by the group size)."""
    rank, size = _rank_and_size(group)
    if t.shape[dim] % size:
        raise InputError("seqlen", f"a multiple of the context-parallel degree {size}", t.shape[dim])
    return t.chunk(size, dim=dim)[rank]


# ------------------------------------------------------------------------------------------ whole mixers
def mamba2_context_parallel(mixer, x: torch.Tensor, seq_idx=None, group=None) -> torch.Tensor:
    """``seqlab.mixers.mamba2.Mamba2`` forward on this rank's chunk ``x (B, L_r, d_model)`` -> (B, L_r, d_model),
    equal to the matching slice of ``mixer(x_full)`` (same parameters on every rank)."""
    Bsz, L, _ = x.shape
    H, P, G, N = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
    A = -torch.exp(mixer.A_log.float())  # (H,)
    z, xBC, dt = mixer.in_proj(x).split([mixer.d_inner, mixer.conv_dim, H], dim=-1)
    xBC = causal_conv1d_context_parallel(xBC, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation="silu",
                                         seq_idx=seq_idx, group=group)
    xs, B, C = xBC.split([mixer.d_inner, G * N, G * N], dim=-1)
    y = ssd_context_parallel(
        xs.reshape(Bsz, L, H, P), dt, A, B.reshape(Bsz, L, G, N), C.reshape(Bsz, L, G, N),
        chunk_size=mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True, seq_idx=seq_idx, group=group,
    )  # (B, L_r, H, P)
    return mixer.out_proj(mixer.norm(y.reshape(Bsz, L, mixer.d_inner), z))


def mamba_context_parallel(mixer, x: torch.Tensor, seq_idx=None, group=None) -> torch.Tensor:
    """``seqlab.mixers.mamba.Mamba`` (Mamba-1) forward on this rank's chunk ``x (B, L_r, d_model)``."""
    A = -torch.exp(mixer.A_log.float())  # (D, N)
    xs, z = mixer.in_proj(x).chunk(2, dim=-1)  # (B, L_r, D) each
    xs = causal_conv1d_context_parallel(xs, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation="silu",
                                        seq_idx=seq_idx, group=group)
    dt, B, C = mixer._split_x_proj(xs)
    delta = F.linear(dt, mixer.dt_proj.weight)  # (B, L_r, D)
    y = selective_scan_context_parallel(xs, delta, A, B, C, mixer.D, z=z, delta_bias=mixer.dt_proj.bias,
                                        delta_softplus=True, seq_idx=seq_idx, group=group)
    return mixer.out_proj(y)
