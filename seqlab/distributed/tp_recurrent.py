"""Tensor parallelism for the channel-separable recurrent mixers: Mamba-1 (selective scan) and S4D.

Both run one independent recurrence per channel, so with degree T dividing the channel count, rank r owns the
channels ``[r C/T, (r+1) C/T)`` and every parameter per channel; only the projections into and out of the
channel space need communication (Megatron, Shoeybi et al. 2019, Sec. 3; collectives of ``tp_mamba``).

Mamba-1 (Gu & Dao 2023, Fig. 3), D = d_inner channels:

    in_proj    rows of x and of z for its channels (both halves sharded alike)     column-parallel
    conv1d     its channels (depthwise: local)
    x_proj     columns of its channels: partial dt-low-rank, B, C, all-reduced      row-parallel
               (forward and backward), so every rank holds the full (dt, B, C); Falcon Mamba's bcdt_norm
               applies after the all-reduce, its optional scales replicated
    dt_proj    rows (and bias) of its channels                                      column-parallel
    A_log, D   its channels
    out_proj   columns of its channels; the partial outputs are all-reduced         row-parallel

S4D (Gu et al. 2022), H = d_model channels: ``log_dt, log_A_real, A_imag, C, D`` of its channels (each rank
convolves only its slice of the replicated input), ``out_proj`` (H -> 2H, before the GLU) row-parallel with
the all-reduce before the GLU.

Decode states are per rank: Mamba-1 ``conv (B, D/T, W-1)``, ``ssm (B, D/T, N)``; S4 ``x (B, H/T, N/2)``.

Sharded parameters are DTensors ``Shard(dim)`` whose local tensors are the rank's slices (for ``in_proj`` the
global tensor is a row permutation of the original: [x_0, z_0, x_1, z_1, ...]); every other parameter keeps the
original name. ``state_dict()`` gathers the original layout and ``load_state_dict`` slices it again, so
checkpoints are those of the unsharded model; ``full_tensors`` / ``local_tensors`` do the same for any tensors
laid out like the parameters (the optimizer's moments, see ``seqlab.distributed.checkpoint``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seqlab.distributed.tp_mamba import all_reduce_sum, copy_to_tp, reduce_from_tp
from seqlab.errors import ConfigError
from seqlab.mixers.base import MixerState, check_mixer_input
from seqlab.mixers.norm import rms_norm
from seqlab.mixers.s4 import S4
from seqlab.ops.conv import causal_conv1d, conv_step
from seqlab.ops.s4 import s4d_discretize, s4d_step
from seqlab.ops.selective_scan import selective_scan, selective_state_update

_FLAGS = ("_no_weight_decay", "_no_reinit")


def _local(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else (p.to_local() if hasattr(p, "to_local") else p)


def _set_parameter(root: nn.Module, dotted: str, param: nn.Parameter | None) -> None:
    """Register ``param`` under ``dotted`` (``in_proj.weight``), creating plain holder modules on the way."""
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            module.add_module(part, child)
        module = child
    module.register_parameter(leaf, param)


class ChannelShardedMixer(nn.Module):
    """The local shard of a channel-separable mixer: parameters listed in ``shards`` ({name: dim}) are sliced
    along ``dim`` by ``indices(name, rank)``; the others are replicated (their gradients end up equal on every
    rank). Subclasses set the sizes, then call ``_adopt``."""

    def _adopt(self, mixer: nn.Module, mesh, shards: dict[str, int]) -> None:
        from torch.distributed.tensor import DTensor, Shard

        self.mesh, self.group, self.tp, self.rank = mesh, mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.shards = dict(shards)
        for name, p in mixer.named_parameters():
            if name in self.shards:
                dim = self.shards[name]
                local = p.detach().index_select(dim, self.indices(name, self.rank).to(p.device)).clone()
                new = nn.Parameter(DTensor.from_local(local, mesh, [Shard(dim)], run_check=False),
                                   requires_grad=p.requires_grad)
            else:
                new = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for flag in _FLAGS:
                if getattr(p, flag, False):
                    setattr(new, flag, True)
            _set_parameter(self, name, new)
        for path, module in mixer.named_modules():  # absent biases stay visible as None (``out_proj.bias``)
            for leaf, p in module._parameters.items():
                if p is None:
                    _set_parameter(self, f"{path}.{leaf}" if path else leaf, None)
        self._register_state_dict_hook(_gather_state_dict)
        self._register_load_state_dict_pre_hook(_slice_state_dict, with_module=True)

    def indices(self, name: str, rank: int) -> torch.Tensor:
        """Indices along the shard dim of the unsharded parameter ``name`` that ``rank`` owns."""
        raise NotImplementedError

    def _channels(self, rank: int) -> torch.Tensor:
        return torch.arange(rank * self.local_channels, (rank + 1) * self.local_channels)

    # ----------------------------------------------------------------------------------------- layouts
    def full_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Local tensors shaped like this rank's parameters (by parameter name) -> the unsharded tensors in the
        original layout (plain tensors); a collective: every rank calls it with the same names."""
        out = {}
        for name in sorted(tensors):
            t = tensors[name]
            if name not in self.shards:
                out[name] = _local(t)
                continue
            dim, local = self.shards[name], _local(t).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(self.tp)]
            dist.all_gather(parts, local, group=self.group)
            size = list(local.shape)
            size[dim] *= self.tp
            full = local.new_empty(size)
            for r, part in enumerate(parts):
                full.index_copy_(dim, self.indices(name, r).to(full.device), part)
            out[name] = full
        return out

    def local_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unsharded tensors (by parameter name) -> this rank's shards (DTensors for sharded parameters)."""
        from torch.distributed.tensor import DTensor, Shard

        out = {}
        for name, t in tensors.items():
            if name not in self.shards or isinstance(t, DTensor):
                out[name] = t
                continue
            dim = self.shards[name]
            shard = t.index_select(dim, self.indices(name, self.rank).to(t.device))
            out[name] = DTensor.from_local(shard, self.mesh, [Shard(dim)], run_check=False)
        return out

    def full_name(self, name: str) -> str:
        """The unsharded parameter name of a local one (the same for these mixers)."""
        return name


def _gather_state_dict(module: ChannelShardedMixer, state: dict, prefix: str, local_metadata) -> dict:
    names = [n for n in module.shards if prefix + n in state]
    full = module.full_tensors({n: state[prefix + n] for n in names})
    for n in names:
        state[prefix + n] = full[n]
    return state


def _slice_state_dict(module: ChannelShardedMixer, state: dict, prefix: str, *args) -> None:
    names = [n for n in module.shards if prefix + n in state]
    local = module.local_tensors({n: state[prefix + n] for n in names})
    for n in names:
        state[prefix + n] = local[n]


# --------------------------------------------------------------------------------------------- Mamba-1
_MAMBA_SHARDS = {
    "in_proj.weight": 0, "in_proj.bias": 0, "conv1d.weight": 0, "conv1d.bias": 0, "x_proj.weight": 1,
    "dt_proj.weight": 0, "dt_proj.bias": 0, "A_log": 0, "D": 0, "out_proj.weight": 1,
}


class MambaTensorParallel(ChannelShardedMixer):
    """The local shard of a ``Mamba`` mixer on one tensor-parallel rank; same interface as the mixer.

    ``x (B, L, d_model) -> (B, L, d_model)``, identical on every rank (the input must be identical too).
    """

    def __init__(self, mixer, mesh):
        super().__init__()
        tp = mesh.size()
        if mixer.d_inner % tp:
            raise ConfigError(f"--tp {tp}: Mamba d_inner = {mixer.d_inner} must be divisible by the tensor-parallel "
                              "degree")
        self.d_model, self.d_state, self.d_conv, self.dt_rank = mixer.d_model, mixer.d_state, mixer.d_conv, \
            mixer.dt_rank
        self.full_d_inner, self.d_inner = mixer.d_inner, mixer.d_inner // tp
        self.local_channels = self.d_inner
        self.bcdt_norm, self.bcdt_norm_eps = mixer.bcdt_norm, mixer.bcdt_norm_eps
        self.has_norm_weights = mixer.dt_norm is not None
        self._adopt(mixer, mesh, _MAMBA_SHARDS)

    def indices(self, name: str, rank: int) -> torch.Tensor:
        ch = self._channels(rank)
        return torch.cat([ch, self.full_d_inner + ch]) if name.startswith("in_proj.") else ch

    # ----------------------------------------------------------------------------------------- state
    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """The local shard's state: ``conv (B, D / tp, W-1)``, ``ssm (B, D / tp, N)``, float32."""
        device = _local(self.A_log).device if device is None else device
        return MixerState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=torch.float32),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32),
        )

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 4 * batch * self.d_inner * (self.d_conv - 1 + self.d_state)

    # ----------------------------------------------------------------------------------------- forward
    def _x_proj(self, xs: torch.Tensor):
        """Local channels (..., D / tp) -> the full dt (..., R), B (..., N), C (..., N): the row-parallel partial
        sums are all-reduced (the gradient too: every rank's channels use the same dt, B, C)."""
        dbc = all_reduce_sum(F.linear(xs, _local(self.x_proj.weight)), self.group)  # (..., R + 2N)
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bcdt_norm:
            scales = (None, None, None)
            if self.has_norm_weights:  # replicated: each rank's gradient is partial, summed by copy_to_tp
                scales = tuple(copy_to_tp(m.weight, self.group) for m in (self.dt_norm, self.B_norm, self.C_norm))
            dt, B, C = (rms_norm(t, w, self.bcdt_norm_eps) for t, w in zip((dt, B, C), scales))
        return dt, B, C

    def forward(self, x: torch.Tensor, state: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_mixer_input(x, self.d_model)
        L = x.shape[1]
        A = -torch.exp(_local(self.A_log).float())  # (D_local, N)
        D, dt_bias = _local(self.D), _local(self.dt_proj.bias)
        conv_weight, conv_bias = _local(self.conv1d.weight).squeeze(1), _local(self.conv1d.bias)  # (D_local, W)
        x = copy_to_tp(x, self.group)
        xs, z = F.linear(x, _local(self.in_proj.weight), _local(self.in_proj.bias)).chunk(2, dim=-1)  # (B, L, D_l)

        if state is not None and L == 1:  # decode: O(1) step
            xt = conv_step(state["conv"], xs[:, 0], conv_weight, conv_bias, activation="silu")  # (B, D_local)
            dt, B, C = self._x_proj(xt)
            delta = F.linear(dt, _local(self.dt_proj.weight))  # (B, D_local)
            y = selective_state_update(state["ssm"], xt, delta, A, B, C, D, z=z[:, 0], dt_bias=dt_bias,
                                       dt_softplus=True).unsqueeze(1)  # (B, 1, D_local)
            state.offset += 1
        else:
            if state is None:
                xs = causal_conv1d(xs, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx)
            else:
                xs, conv_final = causal_conv1d(xs, conv_weight, conv_bias, activation="silu",
                                               initial_state=state["conv"], return_final_state=True, seq_idx=seq_idx)
            dt, B, C = self._x_proj(xs)  # (B, L, R), (B, L, N), (B, L, N)
            delta = F.linear(dt, _local(self.dt_proj.weight))  # (B, L, D_local)
            out = selective_scan(xs, delta, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True,
                                 initial_state=None if state is None else state["ssm"],
                                 return_final_state=state is not None, seq_idx=seq_idx)
            if state is not None:
                y, ssm_final = out
                state["conv"].copy_(conv_final.detach())
                state["ssm"].copy_(ssm_final.detach())
                state.offset += L
            else:
                y = out
        out = reduce_from_tp(F.linear(y, _local(self.out_proj.weight)), self.group)  # (B, L, d_model)
        return out if self.out_proj.bias is None else out + self.out_proj.bias

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, tp={self.tp}, rank={self.rank}, local d_inner={self.d_inner}"


# ------------------------------------------------------------------------------------------------- S4
_S4_SHARDS = {"log_dt": 0, "log_A_real": 0, "A_imag": 0, "C": 0, "D": 0, "out_proj.weight": 1}


class S4TensorParallel(ChannelShardedMixer):
    """The local shard of an ``S4`` mixer: H / tp channels; ``x (B, L, d_model) -> (B, L, d_model)``."""

    # the per-channel convolution math of the unsharded mixer, applied to the local channels
    _convolve = S4._convolve
    _convolve_documents = S4._convolve_documents

    def __init__(self, mixer, mesh):
        super().__init__()
        tp = mesh.size()
        if mixer.d_model % tp:
            raise ConfigError(f"--tp {tp}: S4 channels = d_model = {mixer.d_model} must be divisible by the "
                              "tensor-parallel degree")
        self.d_model, self.d_state, self.discretization = mixer.d_model, mixer.d_state, mixer.discretization
        self.local_channels = mixer.d_model // tp
        self._adopt(mixer, mesh, _S4_SHARDS)
        self.register_buffer("channels", self._channels(self.rank), persistent=False)

    def indices(self, name: str, rank: int) -> torch.Tensor:
        return self._channels(rank)

    def allocate_state(self, batch: int, max_seqlen: int = 0, device=None, dtype=None) -> MixerState:
        """The local shard's state ``x (B, H / tp, N/2)`` complex64."""
        device = _local(self.D).device if device is None else device
        return MixerState(x=torch.zeros(batch, self.local_channels, self.d_state // 2, device=device,
                                        dtype=torch.complex64))

    def state_bytes(self, batch: int, seqlen: int = 0, dtype: torch.dtype = torch.float32) -> int:
        return 8 * batch * self.local_channels * (self.d_state // 2)

    def forward(self, x: torch.Tensor, state: MixerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_mixer_input(x, self.d_model)
        L = x.shape[1]
        x = copy_to_tp(x, self.group)
        u = x.float().index_select(-1, self.channels)  # (B, L, H_local), float32
        log_dt, D = _local(self.log_dt).float(), _local(self.D).float()
        A = torch.complex(-torch.exp(_local(self.log_A_real).float()), _local(self.A_imag).float())  # (H_l, N2)
        C = torch.view_as_complex(_local(self.C).float().contiguous())  # (H_local, N2)

        if state is not None and L == 1:  # decode: one recurrent step
            dA, dB = s4d_discretize(log_dt, A, self.discretization)
            y = s4d_step(state["x"], u[:, 0], dA, dB, C, D).unsqueeze(1)  # (B, 1, H_local)
        elif seq_idx is None:
            x0 = None if state is None else state["x"]
            y, xL = self._convolve(u, log_dt, A, C, D, x0, want_final=state is not None)
            if state is not None:
                state["x"].copy_(xL.detach())
        else:
            y = self._convolve_documents(u, log_dt, A, C, D, state, seq_idx)
        if state is not None:
            state.offset += L
        y = F.gelu(y).to(x.dtype)
        out = reduce_from_tp(F.linear(y, _local(self.out_proj.weight)), self.group)  # (B, L, 2H), partial -> full
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return F.glu(out, dim=-1)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, tp={self.tp}, rank={self.rank}, local channels={self.local_channels}"


def shard_mamba(mixer, mesh, where: str = "mixer") -> MambaTensorParallel:
    """The tensor-parallel replacement of a ``Mamba`` mixer on this rank (raises ConfigError naming ``where``)."""
    tp = mesh.size()
    if mixer.d_inner % tp:
        raise ConfigError(f"--tp {tp}: d_inner = {mixer.d_inner} in {where} (Mamba, expand * d_model) must be "
                          "divisible by the tensor-parallel degree")
    return MambaTensorParallel(mixer, mesh)


def shard_s4(mixer, mesh, where: str = "mixer") -> S4TensorParallel:
    """The tensor-parallel replacement of an ``S4`` mixer on this rank (raises ConfigError naming ``where``)."""
    tp = mesh.size()
    if mixer.d_model % tp:
        raise ConfigError(f"--tp {tp}: d_model = {mixer.d_model} in {where} (S4 channels) must be divisible by the "
                          "tensor-parallel degree")
    return S4TensorParallel(mixer, mesh)
