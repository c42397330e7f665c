"""What the Trainer needs to run under torchrun: the process group, the wrapped model, per-rank data streams,
cross-rank metric averages, gradient clipping over sharded gradients, and sharded checkpoints with every rank's
RNG state.

Global batch per optimizer step = batch_size (micro batch, per rank) x grad_accum x data-parallel world size.
The gradient is the mean over ranks and micro batches of each micro batch's mean loss (equal to the mean over the
global batch when every micro batch scores the same number of tokens, as the synthetic tasks do).
Data-parallel rank r draws its micro batches from its own generator seeded by (seed, r) (rank 0 keeps the
single-process stream); under pure tensor parallelism every rank reads the same batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from seqlab.distributed import data_parallel as dp
from seqlab.distributed.checkpoint import is_sharded_checkpoint, load_sharded, save_sharded
from seqlab.distributed.setup import DistributedEnv, init_distributed
from seqlab.errors import CheckpointError, ConfigError


def needs_parallel(config) -> bool:
    return config.parallel != "none" or config.tp > 1 or config.checkpoint_activations


class ParallelContext:
    """The distributed side of one training run (one per process)."""

    def __init__(self, config):
        dp.check_parallel(config.parallel, 1, 1)  # the mode name, before touching the environment
        env = init_distributed(config.device)
        if config.parallel != "none" and not env.distributed:
            raise ConfigError(
                f"--parallel {config.parallel}: needs several processes; launch with "
                f"torchrun --nproc-per-node N -m seqlab train ... --parallel {config.parallel} "
                "(or pass --parallel none to train, or resume, in one process)"
            )
        dp.check_parallel(config.parallel, env.world_size, config.tp)
        self.env: DistributedEnv = env
        self.config = config
        self.tp = config.tp
        # data-parallel coordinates: pure TP has one data rank
        self.data_world = env.world_size // config.tp
        self.data_rank = env.rank // config.tp

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def wrap(self, model: nn.Module) -> nn.Module:
        return dp.prepare_model(model, self.config.parallel, self.device, self.config.checkpoint_activations,
                                self.config.tp)

    def generator(self, seed: int) -> torch.Generator:
        return dp.rank_generator(seed, self.data_rank)

    def no_sync(self, model: nn.Module):
        return dp.no_gradient_sync(model)

    def clip(self, parameters, max_norm: float) -> torch.Tensor:
        return dp.clip_grad_norm(parameters, max_norm)

    def mean(self, *values: float) -> list[float]:
        """Average plain numbers over all ranks (metrics only)."""
        if not self.env.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.env.world_size).tolist()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, trainer, path: Path, write_rank0) -> Path:
        """Sharded model/optimizer (every rank) + rank 0's files + all ranks' RNG states."""
        rng = _gather_rng(trainer, self.env)
        optimizer_model = dp.unwrap(trainer.model)

        def write(tmp: Path) -> None:
            from seqlab.io import save_tensors

            write_rank0(tmp, rng)
            save_tensors(tmp / "trainer_state.safetensors", rng)

        return save_sharded(path, optimizer_model, trainer.optimizer, write)


def _gather_rng(trainer, env: DistributedEnv) -> dict[str, torch.Tensor]:
    """Every rank's data-generator and torch RNG states, keyed ``data_generator.rank<r>`` etc. (all ranks call)."""
    own = {"data_generator": trainer.generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        own["torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
    out = {}
    for name, state in own.items():
        if env.distributed:
            parts = [torch.empty_like(state) for _ in range(env.world_size)]
            if env.backend == "nccl":
                moved = state.to(env.device)
                gathered = [p.to(env.device) for p in parts]
                dist.all_gather(gathered, moved)
                parts = [p.cpu() for p in gathered]
            else:
                dist.all_gather(parts, state)
        else:
            parts = [state]
        for r, part in enumerate(parts):
            out[f"{name}.rank{r}"] = part
    return out


def restore_rng(trainer, rng: dict[str, torch.Tensor], rank: int, world_size: int, saved_world: int) -> None:
    """Set this rank's data stream and torch RNG from a checkpoint's states (``name.rank<r>`` or legacy ``name``)."""
    def pick(name: str):
        return rng.get(f"{name}.rank{rank}", rng.get(name) if rank == 0 else None)

    if saved_world != world_size:
        warnings.warn(
            f"resuming a run saved by {saved_world} processes with {world_size}: weights and optimizer are resharded "
            "exactly, but the data order differs from an uninterrupted run (per-rank streams change)", stacklevel=2,
        )
    data = pick("data_generator")
    try:
        if data is not None:
            trainer.generator.set_state(data)
        cpu = pick("torch_cpu")
        if cpu is not None:
            torch.set_rng_state(cpu)
        cuda = pick("torch_cuda")
        if cuda is not None and trainer.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, trainer.device)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint: damaged RNG state ({err})") from err


def load_trainer_checkpoint(trainer, path: Path) -> dict:
    """Restore model + optimizer from a sharded checkpoint (any world size, with or without a process group) and
    this rank's RNG states. Returns trainer.json's contents for the caller to restore step/elapsed/evals."""
    from seqlab.io import load_tensors
    from seqlab.train import read_trainer_json

    info = read_trainer_json(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"checkpoint: {str(path)!r} is not a sharded checkpoint")
    load_sharded(path, dp.unwrap(trainer.model), trainer.optimizer)
    rng = load_tensors(path / "trainer_state.safetensors", what="trainer RNG state")
    env = trainer.parallel.env if trainer.parallel is not None else DistributedEnv()
    restore_rng(trainer, rng, env.rank, env.world_size, int(info.get("world_size", 1)))
    return info
