"""Process-group set-up from the environment ``torchrun`` provides (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), rank-0-only printing, barrier and clean-up.

Backend: NCCL when the process drives a CUDA device, gloo on CPU. Each process uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqlab.errors import ConfigError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun variables are all set (``torchrun`` / ``python -m torch.distributed.run``)."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"environment: {name} must be an integer (set by torchrun), got {raw!r}") from err


def init_distributed(device: str = "auto", backend: str | None = None) -> DistributedEnv:
    """Join the process group torchrun set up; without torchrun return a single-process env (no group).

    ``device`` "auto" picks ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``backend`` defaults to nccl on
    CUDA and gloo on CPU. Calling it again once the group exists returns the same env.
    """
    if not launched_by_torchrun():
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           ("cpu" if device == "auto" else device))
        return DistributedEnv(device=dev)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    use_cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {device!r} requested but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"--device: process LOCAL_RANK={local_rank} needs cuda:{local_rank}, but this machine "
                              f"has {torch.cuda.device_count()} CUDA device(s); start at most that many processes per "
                              "node (torchrun --nproc-per-node) or pass --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                          backend=dist.get_backend())


def get_env() -> DistributedEnv:
    """The env of an already initialised group (or the single-process env)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedEnv()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    backend = dist.get_backend()
    dev = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_zero_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every process prints when there is no process group)."""
    if is_rank_zero():
        print(*args, **kwargs)
        (kwargs.get("file") or sys.stdout).flush()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (safe to call when none exists).

    Wrapped models (DDP reducers, FSDP states) still waiting in reference cycles are collected first and the ranks
    meet once more, so no communication object outlives the group: destroying it under a live one aborts the
    process at exit ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
