"""Tensor parallelism for the Mamba-2 mixer: shard by head, as the SSD layout allows (Dao & Gu 2024, Sec. 8).

With degree T dividing nheads H, rank r owns heads [r H/T, (r+1) H/T) and everything per head or per channel of
those heads:

    in_proj    rows of z and x (channels r D/T ...), rows of dt (its heads)       column-parallel
    conv1d     the channels of its x part                                          (depthwise: local)
    A_log, dt_bias, D, norm.weight                                                 its entries
    out_proj   columns of its channels; the partial outputs are all-reduced        row-parallel
    B, C       ngroups G divisible by T: the rows/conv channels of its G/T groups (a group's heads stay together);
               otherwise replicated on every rank (their gradients are all-reduced in backward)
    norm       per group when groups are sharded; when a group spans ranks (G=1: the norm over all of d_inner),
               the per-group sums of squares are all-reduced before normalising

Collectives (Megatron, Shoeybi et al. 2019, Sec. 3): ``copy_to_tp`` is the identity forward and all-reduces the
gradient (the replicated input and replicated B/C weights); ``reduce_from_tp`` all-reduces forward and passes the
gradient through (the loss is replicated, so every rank already holds the full output gradient);
``all_reduce_sum`` all-reduces both ways (the norm's sums of squares: a total every rank's channels use).

Sharded parameters are DTensors ``Shard(dim)`` over the mesh whose local tensors are the rank's slices; their
global tensor is the concatenation of the ranks' slices (a permutation of the original rows), so gradient-norm
clipping and optimizers see the right sizes. ``state_dict()`` gathers them back into the original layout under
the original names (``in_proj.weight`` ...), and ``load_state_dict`` slices an original-layout state again, so
checkpoints are those of the unsharded model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seqlab.errors import ConfigError
from seqlab.mixers.base import MixerState, check_mixer_input
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.ssd import ssd, ssd_state_update


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient over ``group`` backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) over ``group`` forward; the gradient passes through unchanged."""
    return _ReduceFromTP.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) forward and backward: every rank uses the total, so each part's gradient is the sum of all
    ranks' gradients of the total."""
    return _AllReduceSum.apply(x, group)


def _span(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop)


def shard_layout(mixer, rank: int, tp: int) -> dict[str, torch.Tensor | None]:
    """Indices into the unsharded Mamba-2 parameters that rank ``rank`` of ``tp`` owns.

    Keys: ``in_rows`` (in_proj rows, sharded: z, x, [B, C,] dt), ``in_rows_bc`` (replicated B/C rows or None),
    ``conv`` / ``conv_bc`` (conv channels, likewise), ``heads`` (A_log, dt_bias, D), ``channels`` (norm.weight,
    out_proj columns).
    """
    D, H, G, N = mixer.d_inner, mixer.nheads, mixer.ngroups, mixer.d_state
    Dl, Hl = D // tp, H // tp
    ch = _span(rank * Dl, (rank + 1) * Dl)
    heads = _span(rank * Hl, (rank + 1) * Hl)
    if G % tp == 0:
        Gl = G // tp
        bc = _span(rank * Gl * N, (rank + 1) * Gl * N)
        in_rows = torch.cat([ch, D + ch, 2 * D + bc, 2 * D + G * N + bc, 2 * D + 2 * G * N + heads])
        conv = torch.cat([ch, D + bc, D + G * N + bc])
        in_rows_bc = conv_bc = None
    else:
        in_rows = torch.cat([ch, D + ch, 2 * D + 2 * G * N + heads])
        conv = ch
        in_rows_bc = _span(2 * D, 2 * D + 2 * G * N)
        conv_bc = _span(D, D + 2 * G * N)
    return {"in_rows": in_rows, "in_rows_bc": in_rows_bc, "conv": conv, "conv_bc": conv_bc, "heads": heads,
            "channels": ch}


# parameter name -> (index key, dim) for sharded parameters; replicated ones are listed in _REPLICATED
_SHARDED = {
    "in_proj.weight": ("in_rows", 0), "in_proj.bias": ("in_rows", 0),
    "conv1d.weight": ("conv", 0), "conv1d.bias": ("conv", 0),
    "dt_bias": ("heads", 0), "A_log": ("heads", 0), "D": ("heads", 0),
    "norm.weight": ("channels", 0), "out_proj.weight": ("channels", 1),
}
# replicated B/C parts (only when ngroups is not divisible by the degree): local name -> (full name, index key)
_REPLICATED_BC = {
    "in_proj_BC.weight": ("in_proj.weight", "in_rows_bc"), "in_proj_BC.bias": ("in_proj.bias", "in_rows_bc"),
    "conv1d_BC.weight": ("conv1d.weight", "conv_bc"), "conv1d_BC.bias": ("conv1d.bias", "conv_bc"),
}


def _holder(**params: nn.Parameter | None) -> nn.Module:
    """A parameter-only module so that names stay ``in_proj.weight``, ``conv1d.bias`` ..."""
    m = nn.Module()
    for name, p in params.items():
        m.register_parameter(name, p)
    return m


class Mamba2TensorParallel(nn.Module):
    """The local shard of a ``Mamba2`` mixer on one tensor-parallel rank; same interface as the mixer.

    ``x (B, L, d_model) -> (B, L, d_model)``, identical on every rank (the input must be identical too).
    """

    def __init__(self, mixer, mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        tp, rank = mesh.size(), mesh.get_local_rank()
        H, G = mixer.nheads, mixer.ngroups
        if H % tp:
            raise ConfigError(f"--tp {tp}: Mamba2 nheads = d_inner / headdim = {H} must be divisible by the "
                              "tensor-parallel degree")
        self.mesh, self.group, self.tp, self.rank = mesh, mesh.get_group(), tp, rank
        self.d_model, self.d_state, self.d_conv = mixer.d_model, mixer.d_state, mixer.d_conv
        self.headdim = mixer.headdim
        self.chunk_size, self.full_d_inner, self.full_ngroups = mixer.chunk_size, mixer.d_inner, G
        self.nheads, self.d_inner = H // tp, mixer.d_inner // tp
        self.groups_sharded = G % tp == 0
        self.ngroups = G // tp if self.groups_sharded else G
        self.conv_dim = self.d_inner + 2 * self.ngroups * self.d_state
        self.norm_group_size, self.norm_eps = mixer.norm.group_size, mixer.norm.eps
        self.layout = shard_layout(mixer, rank, tp)

        full = dict(mixer.named_parameters())
        local: dict[str, nn.Parameter | None] = {}
        for name, (key, dim) in _SHARDED.items():
            p = full.get(name)
            if p is None:
                local[name] = None
                continue
            shard = p.detach().index_select(dim, self.layout[key].to(p.device)).clone()
            local[name] = nn.Parameter(DTensor.from_local(shard, mesh, [Shard(dim)], run_check=False))
        for name, (full_name, key) in _REPLICATED_BC.items():
            p = full.get(full_name)
            if self.groups_sharded or p is None:
                local[name] = None
            else:
                local[name] = nn.Parameter(p.detach().index_select(0, self.layout[key].to(p.device)).clone())
        # replicated tails: out_proj.bias
        out_bias = None if mixer.out_proj.bias is None else nn.Parameter(mixer.out_proj.bias.detach().clone())

        self.in_proj = _holder(weight=local["in_proj.weight"], bias=local["in_proj.bias"])
        self.conv1d = _holder(weight=local["conv1d.weight"], bias=local["conv1d.bias"])
        self.dt_bias, self.A_log, self.D = local["dt_bias"], local["A_log"], local["D"]
        self.norm = _holder(weight=local["norm.weight"])
        self.out_proj = _holder(weight=local["out_proj.weight"], bias=out_bias)
        if not self.groups_sharded:
            self.in_proj_BC = _holder(weight=local["in_proj_BC.weight"], bias=local["in_proj_BC.bias"])
            self.conv1d_BC = _holder(weight=local["conv1d_BC.weight"], bias=local["conv1d_BC.bias"])
        # global head -> its B/C group, for the local heads when B/C are replicated and G > 1
        Hl, heads_per_group = self.nheads, H // G
        self.register_buffer("head_group", (rank * Hl + torch.arange(Hl)) // heads_per_group, persistent=False)
        # global norm group of each local channel, for norms whose group spans ranks
        self.register_buffer("channel_group", (rank * self.d_inner + torch.arange(self.d_inner))
                             // self.norm_group_size, persistent=False)
        self._register_state_dict_hook(_gather_state_dict)
        self._register_load_state_dict_pre_hook(_slice_state_dict, with_module=True)

    # ----------------------------------------------------------------------------------------- weights

    def _local(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else (p.to_local() if hasattr(p, "to_local") else p)

    def _with_bc(self, sharded, replicated, at: int):
        """Insert the replicated B/C part (gradient all-reduced) at row ``at`` of the local sharded part."""
        sharded = self._local(sharded)
        if self.groups_sharded or sharded is None:
            return sharded
        bc = copy_to_tp(replicated, self.group)
        return torch.cat([sharded[:at], bc, sharded[at:]])

    # ----------------------------------------------------------------------------------------- state

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """The local shard's state: ``conv (B, conv_dim_local, W-1)``, ``ssm (B, H / tp, P, N)``, float32."""
        device = self._local(self.A_log).device if device is None else device
        return MixerState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=torch.float32),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * (self.conv_dim * (self.d_conv - 1) + self.nheads * self.headdim * self.d_state)

    # ----------------------------------------------------------------------------------------- forward

    def _norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm ``RMSNorm(y * silu(z))`` per group; a group spanning ranks sums its squares over them."""
        h = y.float() * F.silu(z.float())  # (B, L, D_local)
        if self.groups_sharded:  # every norm group lies on one rank
            h = h.unflatten(-1, (-1, self.norm_group_size))
            h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps)
            h = h.flatten(-2)
        else:
            groups = self.full_d_inner // self.norm_group_size
            sq = h.new_zeros(*h.shape[:-1], groups).index_add(-1, self.channel_group, h.pow(2))  # (B, L, G)
            sq = all_reduce_sum(sq, group=self.group)
            h = h * torch.rsqrt(sq / self.norm_group_size + self.norm_eps).index_select(-1, self.channel_group)
        return (h * self._local(self.norm.weight).float()).to(y.dtype)

    def forward(self, x: torch.Tensor, state: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_mixer_input(x, self.d_model, seq_idx)
        Bsz, L, _ = x.shape
        H, P, G, N, Dl = self.nheads, self.headdim, self.ngroups, self.d_state, self.d_inner
        rep = None if self.groups_sharded else self.in_proj_BC
        conv_rep = None if self.groups_sharded else self.conv1d_BC
        w_in = self._with_bc(self.in_proj.weight, None if rep is None else rep.weight, 2 * Dl)
        b_in = self._with_bc(self.in_proj.bias, None if rep is None else rep.bias, 2 * Dl)
        conv_weight = self._with_bc(self.conv1d.weight, None if conv_rep is None else conv_rep.weight, Dl).squeeze(1)
        conv_bias = self._with_bc(self.conv1d.bias, None if conv_rep is None else conv_rep.bias, Dl)
        A_log, dt_bias, D = self._local(self.A_log), self._local(self.dt_bias), self._local(self.D)
        A = -torch.exp(A_log.float())  # (H_local,)

        x = copy_to_tp(x, self.group)
        z, xBC, dt = F.linear(x, w_in, b_in).split([Dl, self.conv_dim, H], dim=-1)
        if state is not None and L == 1:  # decode: O(1) step
            xBC = conv_step(state["conv"], xBC[:, 0], conv_weight, conv_bias, activation="silu")
            xs, B, C = xBC.split([Dl, G * N, G * N], dim=-1)
            B, C = self._heads_groups(B.view(Bsz, G, N), 1), self._heads_groups(C.view(Bsz, G, N), 1)
            y = ssd_state_update(state["ssm"], xs.view(Bsz, H, P), dt[:, 0], A, B, C, D=D, dt_bias=dt_bias,
                                 dt_softplus=True)  # (B, H_local, P)
            state.offset += 1
            y = y.reshape(Bsz, 1, Dl)
        else:
            if state is None:
                xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx)
            else:
                xBC, conv_final = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu",
                                                initial_state=state["conv"], return_final_state=True, seq_idx=seq_idx)
            xs, B, C = xBC.split([Dl, G * N, G * N], dim=-1)
            B = self._heads_groups(B.reshape(Bsz, L, G, N), 2)
            C = self._heads_groups(C.reshape(Bsz, L, G, N), 2)
            out = ssd(xs.reshape(Bsz, L, H, P), dt, A, B, C, chunk_size=self.chunk_size, D=D, dt_bias=dt_bias,
                      dt_softplus=True, initial_state=None if state is None else state["ssm"],
                      return_final_state=state is not None, seq_idx=seq_idx)  # (B, L, H_local, P)
            if state is not None:
                out, ssm_final = out
                state["conv"].copy_(conv_final.detach())
                state["ssm"].copy_(ssm_final.detach())
                state.offset += L
            y = out.reshape(Bsz, L, Dl)
        out = F.linear(self._norm(y, z), self._local(self.out_proj.weight))  # (B, L, d_model), partial sum
        out = reduce_from_tp(out, self.group)
        return out if self.out_proj.bias is None else out + self.out_proj.bias

    def _heads_groups(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Replicated B/C with G > 1: one group per local head (its heads may straddle a group boundary)."""
        if self.groups_sharded or t.shape[dim] == 1:
            return t
        return t.index_select(dim, self.head_group)  # (..., H_local, N)

    # ----------------------------------------------------------------------------------------- layouts
    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors shaped like this rank's parameters (by local name, e.g. the optimizer's moments) -> the unsharded
        tensors under the original names and layout (a collective, like ``state_dict``)."""
        return _gather_state_dict(self, dict(tensors), "", None)

    def local_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unsharded tensors by original name -> this rank's shards by local name (like ``load_state_dict``)."""
        state = dict(tensors)
        _slice_state_dict(self, state, "")
        return state

    def full_name(self, name: str) -> str:
        """The unsharded parameter a local one belongs to (``in_proj_BC.weight`` -> ``in_proj.weight``)."""
        return _REPLICATED_BC.get(name, (name,))[0]

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, tp={self.tp}, rank={self.rank}, local nheads={self.nheads}, "
                f"ngroups={self.ngroups} ({'sharded' if self.groups_sharded else 'replicated'})")


# --------------------------------------------------------------------------------------- checkpoints
def _gather_state_dict(module: Mamba2TensorParallel, state: dict, prefix: str, local_metadata) -> dict:
    """Replace the local shards by the unsharded tensors in the original layout (a collective)."""
    layouts = [shard_layout(_Dims(module), r, module.tp) for r in range(module.tp)]
    for name, (key, dim) in _SHARDED.items():
        if prefix + name not in state:
            continue
        local = module._local(state[prefix + name]).detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(module.tp)]
        dist.all_gather(parts, local, group=module.group)
        size = list(local.shape)
        size[dim] = sum(len(lay[key]) for lay in layouts)
        if not module.groups_sharded and name in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias"):
            size[dim] += state[prefix + name.replace(".", "_BC.")].shape[0]
        full = local.new_empty(size)
        for lay, part in zip(layouts, parts):
            full.index_copy_(dim, lay[key].to(full.device), part)
        state[prefix + name] = full
    if not module.groups_sharded:
        for name, (full_name, key) in _REPLICATED_BC.items():
            if prefix + name in state:
                bc = state.pop(prefix + name).detach()
                state[prefix + full_name].index_copy_(0, layouts[0][key].to(bc.device), bc)
    return state


def _slice_state_dict(module: Mamba2TensorParallel, state: dict, prefix: str, *args) -> None:
    """Turn an original-layout state (``in_proj.weight`` of the whole mixer ...) into this rank's shards."""
    from torch.distributed.tensor import DTensor, Shard

    for name, (key, dim) in _SHARDED.items():
        t = state.get(prefix + name)
        if t is None or isinstance(t, DTensor):
            continue
        if not module.groups_sharded and name in ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias"):
            bc_key = "in_rows_bc" if name.startswith("in_proj") else "conv_bc"
            state[prefix + name.replace(".", "_BC.")] = t.index_select(0, module.layout[bc_key].to(t.device))
        shard = t.index_select(dim, module.layout[key].to(t.device))
        state[prefix + name] = DTensor.from_local(shard, module.mesh, [Shard(dim)], run_check=False)


class _Dims:
    """The unsharded sizes ``shard_layout`` needs, recovered from a sharded module."""

    def __init__(self, m: Mamba2TensorParallel):
        self.d_inner, self.nheads = m.full_d_inner, m.nheads * m.tp
        self.ngroups, self.d_state = m.full_ngroups, m.d_state


def shard_mamba2(mixer, mesh, where: str = "mixer") -> Mamba2TensorParallel:
    """The tensor-parallel replacement of ``mixer`` on this rank (raises ConfigError naming ``where``)."""
    tp = mesh.size()
    if mixer.nheads % tp:
        raise ConfigError(f"--tp {tp}: nheads = {mixer.nheads} in {where} (Mamba2, d_inner / headdim) must be "
                          "divisible by the tensor-parallel degree")
    return Mamba2TensorParallel(mixer, mesh)
