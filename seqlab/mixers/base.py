"""What every mixer shares: the recurrent/cache state it carries between calls.

A mixer is an ``nn.Module`` with
    forward(x (B, L, d_model), state: MixerState | None = None, seq_idx (B, L) | None = None) -> (B, L, d_model)
    allocate_state(batch, max_seqlen, device=None, dtype=None) -> MixerState
    state_bytes(batch, seqlen, dtype=torch.float32) -> int        # analytic; tests check it against real tensors
    from_config(config: ModelConfig, layer_idx: int)  (classmethod)

Mixers whose ``allocate_state``/``state_bytes`` also take ``state_dtype`` (Mamba, Mamba-2) set
``takes_state_dtype = True``: their recurrent state may be kept in a 16-bit float instead of float32.

With a state, ``forward`` continues from it and updates it in place, so chunked prefill and one-token decode
are the same call. ``state.offset`` counts the positions consumed so far.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from seqlab.errors import InputError
from seqlab.ops.decode_linear import decode_linear


def check_mixer_input(x: torch.Tensor, d_model: int, seq_idx: torch.Tensor | None = None) -> None:
    """Raise InputError unless ``x`` is (B, L, d_model) and ``seq_idx``, when given, is (B, L)."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise InputError("x", f"a (B, L, {d_model}) tensor", f"shape {tuple(x.shape)}")
    if seq_idx is not None and tuple(seq_idx.shape) != tuple(x.shape[:2]):
        raise InputError("seq_idx", f"shape {tuple(x.shape[:2])}", f"shape {tuple(seq_idx.shape)}")


# Decode steps fold the block's pre-norm into the mixer's input GEMM and Mamba's conv step into its epilogue (each
# where the Triton GEMM is the faster kernel for the shape: seqlab.ops.decode_linear times them) and run Mamba's
# fused dt_proj + step kernel (seqlab.ops.mamba_step) as FUSED_DECODE_KERNELS says; FUSE_DECODE = False runs the
# unfused ops throughout (benchmarks compare them). "dt_proj_step": True runs the fused kernel, False (the default)
# the dt GEMM and the step kernel, "auto" whichever seqlab.ops.mamba_step.dt_proj_step_choice timed faster for the
# shape on its GPU. On an H200 at Mamba 1.4b's batch-64 step (benchmarks/generate-gpu/run15) "auto" ran as fast as
# the pair (2.326 ms both) and the fused kernel's default tile slower (2.453), so the pair stays the default.
# "layer": Mamba's whole decode step (pre-norm to residual) as one persistent launch (seqlab.ops.mamba_layer), on
# CUDA without autograd where the layer fits; off unless SEQLAB_DECODE_LAYER=1.
FUSE_DECODE = True
FUSED_DECODE_KERNELS = {"dt_proj_step": False, "layer": os.environ.get("SEQLAB_DECODE_LAYER", "0") == "1"}

# L2 prefetch in a decode step (seqlab.ops.prefetch), for mixers with ``takes_prefetch``: a decode step's small
# kernels leave HBM idle, so weights read a few kernels later are fetched into L2 meanwhile. Right after its input
# GEMM the mixer prefetches its own later weights (x_proj, dt_proj, out_proj) and, per the schedule, the weights the
# next layer's step reads first (``decode_first_weights()``, which the model passes in as ``prefetch``):
#   "off"    nothing;       "own"   its own later weights only;
#   "early"  own and next together, after the input GEMM;   "split"  own there, next after the state update.
# Concurrent branches in a decode step: with DECODE_BRANCHES["z"], Mamba's in_proj runs as two GEMMs on CUDA, the
# gate half z on a second stream while the x half, the conv step and x_proj run on the first (a graph records the
# two as parallel branches); off unless SEQLAB_DECODE_Z_BRANCH=1: on an H200 at Mamba 1.4b's batch-64 step it was
# 3.9% slower (benchmarks/generate-gpu/run16).
DECODE_BRANCHES = {"z": os.environ.get("SEQLAB_DECODE_Z_BRANCH", "0") == "1"}
_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """A second CUDA stream of ``device`` for decode-step branches, made once and kept."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


DECODE_PREFETCH_SCHEDULES = ("off", "own", "early", "split")
DECODE_PREFETCH = {"schedule": os.environ.get("SEQLAB_DECODE_PREFETCH", "off")}


def decode_prefetch_schedule() -> str:
    """DECODE_PREFETCH["schedule"], checked."""
    schedule = DECODE_PREFETCH["schedule"]
    if schedule not in DECODE_PREFETCH_SCHEDULES:
        raise InputError("DECODE_PREFETCH['schedule'] (SEQLAB_DECODE_PREFETCH)",
                         f"one of {DECODE_PREFETCH_SCHEDULES}", repr(schedule))
    return schedule

RECURRENT_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def recurrent_state_dtype(state_dtype: torch.dtype | None) -> torch.dtype:
    """``state_dtype`` or float32; InputError unless it is float32, bfloat16 or float16."""
    if state_dtype is None:
        return torch.float32
    if state_dtype not in RECURRENT_STATE_DTYPES:
        raise InputError("state_dtype", "torch.float32, torch.bfloat16 or torch.float16", state_dtype)
    return state_dtype


class MixerState:
    """Named tensors of one mixer's state for a batch, plus the number of positions already consumed."""

    def __init__(self, offset: int = 0, **tensors: torch.Tensor):
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.offset = offset

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()
        self.offset = 0

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"MixerState(offset={self.offset}, {shapes})"


def project(layer: nn.Linear, x: torch.Tensor, residual: torch.Tensor | None = None,
            few_rows: bool = False, norm: nn.Module | None = None) -> torch.Tensor:
    """``layer(norm(x))`` (+ ``residual``); ``norm`` (an RMSNorm, or None) is applied to x first. With ``few_rows``
    (a decode step) through ``seqlab.ops.decode_linear``, which adds the residual inside the GEMM, folds the norm
    into it and picks the faster kernel for the shape. A layer with hooks or sharded weights (tensor parallelism's
    DTensors) always runs as its module, so the hooks see the call."""
    if few_rows and plain_linear(layer):
        fused_norm = None if norm is None else (norm.weight, norm.eps)
        return decode_linear(x, layer.weight, layer.bias, residual, norm=fused_norm)
    if norm is not None:
        x = norm(x)
    out = layer(x)
    return out if residual is None else residual + out


def plain_linear(layer: nn.Linear) -> bool:
    """No hooks and no sharded weight: the layer's weight may be handed to a fused kernel."""
    return not (layer._forward_pre_hooks or layer._forward_hooks or hasattr(layer.weight, "device_mesh"))
