"""Data parallelism on PyTorch's engine: DDP (replicated parameters, all-reduced gradients) and FSDP2
(``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded per block), plus
activation checkpointing per block.

Global batch = micro batch x gradient-accumulation steps x data-parallel world size. Each rank draws its own
micro batches (``rank_generator``), so the ranks' data streams are disjoint and deterministic.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqlab.errors import ConfigError

PARALLEL_MODES = ("none", "ddp", "fsdp")


def check_parallel(parallel: str, world_size: int, tp: int = 1) -> None:
    """Clear errors for combinations that cannot run (names the option and the value given)."""
    if parallel not in PARALLEL_MODES:
        raise ConfigError(f"--parallel: expected one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if tp < 1:
        raise ConfigError(f"--tp: expected an integer >= 1, got {tp}")
    if tp > 1 and world_size == 1:
        raise ConfigError(
            f"--tp {tp}: tensor parallelism needs {tp} processes; launch with "
            f"torchrun --nproc-per-node {tp} -m seqlab train ... --tp {tp}"
        )
    if tp > 1 and world_size != tp:
        raise ConfigError(
            f"--tp {tp}: the world size must equal the tensor-parallel degree (got {world_size} processes); "
            "combining --tp with data parallelism (2-D meshes) is not supported"
        )
    if tp > 1 and parallel != "none":
        raise ConfigError(f"--tp {tp}: use it with --parallel none (got --parallel {parallel}); 2-D TP x DP is not "
                          "supported")


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ``LanguageModel`` (its layers, and the Zamba shared block when present)."""
    blocks = list(getattr(model, "layers", []))
    shared = getattr(model, "shared_block", None)
    if shared is not None:
        blocks.append(shared)
    return blocks


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of storing them (non-reentrant
    ``torch.utils.checkpoint``). The block's ``forward`` is wrapped in place, so parameter names (and saved
    checkpoints) do not change. Returns ``model``."""
    for block in blocks_of(model):
        if getattr(block, "_seqlab_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._seqlab_checkpointed = True
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # an MoE expert that receives no token in a step has no gradient: DDP must be told to look for those
    unused = any(hasattr(m, "n_experts") and hasattr(m, "router") for m in model.modules())
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def shard_fsdp(model: nn.Module, device: torch.device, mesh=None) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the root (embedding, final norm, head). On CUDA the compute runs in
    bf16 with fp32 parameters and fp32 gradient reduction (``MixedPrecisionPolicy``); on CPU everything stays fp32.
    The model is sharded in place (same object, parameters become DTensors). Returns ``model``. Without ``mesh`` the
    shards live on ``device``'s type over the whole group (FSDP's own default mesh would take the accelerator
    whenever one is present, even for a CPU run)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def prepare_model(model: nn.Module, parallel: str, device: torch.device, activation_checkpointing: bool = False,
                  tp: int = 1) -> nn.Module:
    """Apply tensor parallelism (``tp > 1``), activation checkpointing and the data-parallel wrapper.

    Returns the module to call for training: a DDP wrapper for "ddp", ``model`` itself otherwise.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    check_parallel(parallel, world_size, tp)
    if parallel != "none" and not dist.is_initialized():
        raise ConfigError(
            f"--parallel {parallel}: needs a process group; launch with torchrun --nproc-per-node N -m seqlab train"
        )
    model = model.to(device)
    if tp > 1:
        from seqlab.distributed.tensor_parallel import parallelize_model

        parallelize_model(model, tp_mesh(device, tp))
    if activation_checkpointing:
        checkpoint_activations(model)
    if parallel == "ddp":
        return wrap_ddp(model, device)
    if parallel == "fsdp":
        return shard_fsdp(model, device)
    return model


def tp_mesh(device: torch.device, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))


def no_gradient_sync(model: nn.Module):
    """Context for micro batches before the last one of an accumulation: skip the gradient all-reduce
    (DDP ``no_sync``; FSDP2 ``set_requires_gradient_sync(False)``); a no-op for plain modules."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so it is its own model)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def rank_generator(seed: int, data_rank: int) -> torch.Generator:
    """The data stream of data-parallel rank ``data_rank``: rank 0 keeps the single-process stream, rank r > 0
    a disjoint one seeded from (seed, r)."""
    from seqlab.tasks.base import TRAIN, split_seed

    base = split_seed(seed, TRAIN)
    return torch.Generator().manual_seed(base if data_rank == 0 else base + 1_000_003 * data_rank)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm when gradients may be DTensors (FSDP2, TP) mixed with plain tensors.

    A sharded DTensor contributes the sum of squares of its local shard, all-reduced over its mesh; a replicated
    one (and a plain tensor) counts once. Returns the total norm (a plain float32 tensor)."""
    from torch.distributed.tensor import DTensor, Replicate

    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm) if grads else torch.zeros(())
    device = grads[0].device
    replicated = torch.zeros((), device=device)
    sharded: dict = {}
    for g in grads:
        if isinstance(g, DTensor):
            local = g.to_local().float().pow(2).sum()
            if all(isinstance(p, Replicate) for p in g.placements):
                replicated = replicated + local
            else:
                key = id(g.device_mesh)
                mesh, acc = sharded.get(key, (g.device_mesh, torch.zeros((), device=device)))
                sharded[key] = (mesh, acc + local)
        else:
            replicated = replicated + g.float().pow(2).sum()
    total = replicated
    for mesh, acc in sharded.values():
        acc = acc.clone()
        dist.all_reduce(acc, group=mesh.get_group())
        total = total + acc
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype) if not isinstance(g, DTensor) else scale.item())
    return norm
