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


def restore_rng(trainer, rng: dict[str, torch.Tensor], rank: int, world_size: int, saved_world: int,
                tp: int = 1, saved_tp: int = 1) -> None:
    """Set this rank's data stream and torch RNG from a checkpoint's states (``name.rank<r>`` or legacy ``name``).

    The data stream is that of this rank's data-parallel rank (``rank // tp``), read from the first saved rank of
    the same data rank (``data_rank * saved_tp``): the ranks of one tensor-parallel group must read the same
    batches, whatever the degrees of the run that wrote the checkpoint."""
    def pick(name: str, r: int):
        return rng.get(f"{name}.rank{r}", rng.get(name) if r == 0 else None)

    data_world, saved_data_world = world_size // tp, max(saved_world // saved_tp, 1)
    if saved_data_world != data_world:
        warnings.warn(
            f"resuming a run saved by {saved_world} processes with {world_size} ({saved_data_world} data-parallel "
            f"ranks, now {data_world}): weights and optimizer are resharded exactly, but the data order differs from "
            "an uninterrupted run (per-rank streams change)", stacklevel=2,
        )
    data = pick("data_generator", (rank // tp) * saved_tp)
    try:
        if data is not None:
            trainer.generator.set_state(data)
        cpu = pick("torch_cpu", rank)
        if cpu is not None:
            torch.set_rng_state(cpu)
        cuda = pick("torch_cuda", rank)
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
    saved_tp = int(info.get("train_config", {}).get("tp", 1) or 1)
    restore_rng(trainer, rng, env.rank, env.world_size, int(info.get("world_size", 1)), tp=trainer.config.tp,
                saved_tp=saved_tp)
    return info


def load_plain_checkpoint(trainer, path: Path) -> dict:
    """Restore a single-process checkpoint (model.safetensors + optimizer.safetensors) into a tensor-parallel
    trainer (``--tp N``, ``--parallel none``): every rank reads the full weights and AdamW state and keeps its
    shards; every rank continues the single-process data stream. Returns trainer.json's contents."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from seqlab.distributed.checkpoint import optim_to_local_layout, tp_shards
    from seqlab.io import load_tensors, read_json
    from seqlab.train import parameter_groups, read_trainer_json

    info = read_trainer_json(path)
    model = dp.unwrap(trainer.model)
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError("checkpoint: resuming a single-process checkpoint with --tp needs a LanguageModel")
    with torch.device("meta"):  # the unsharded model: its parameter names, aliases and optimizer order
        ref = type(model)(config)
    canonical: dict[int, str] = {}
    aliases = {}
    for name, p in ref.named_parameters(remove_duplicate=False):
        aliases[name] = canonical.setdefault(id(p), name)
    weights = load_tensors(path / "model.safetensors", what="model weights")
    for name, first in aliases.items():
        if name not in weights and first in weights:
            weights[name] = weights[first]  # tied weights stored once
    expected = set(ref.state_dict())
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise CheckpointError(f"checkpoint: {str(path)!r} does not match the model (missing {missing}, unexpected "
                              f"{unexpected})")
    prefixes = tuple(prefix for prefix, _ in tp_shards(model))
    params = dict(model.named_parameters())
    device = trainer.device

    def place(name: str, t: torch.Tensor) -> torch.Tensor:
        """A full tensor of parameter ``name`` -> this rank's part (the TP mixers slice their own in their hooks)."""
        t = t.to(device)
        current = params.get(name)
        if name.startswith(prefixes) or current is None or not hasattr(current, "device_mesh"):
            return t
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t, current.device_mesh, current.placements)

    model.load_state_dict({name: place(name, weights[name]) for name in sorted(weights)})

    # optimizer: "<index>.<key>" in the unsharded model's parameter order -> by name -> this rank's shards
    order = [canonical[id(p)] for g in parameter_groups(ref, trainer.config.weight_decay) for p in g["params"]]
    tensors = load_tensors(path / "optimizer.safetensors", what="optimizer state")
    meta = read_json(path / "optimizer.json", what="optimizer state")
    current = get_optimizer_state_dict(model, trainer.optimizer)
    local_groups = [list(g["params"]) for g in current["param_groups"]]
    saved_groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if not isinstance(saved_groups, list) or len(saved_groups) != len(local_groups):
        raise CheckpointError("checkpoint: optimizer.json does not match the model's parameter groups")
    state: dict[str, dict] = {}
    try:
        for key, value in tensors.items():
            index, _, entry = key.partition(".")
            state.setdefault(order[int(index)], {})[entry] = value.to(device)
        for index, step in meta.get("steps", {}).items():
            state.setdefault(order[int(index)], {})["step"] = torch.tensor(step, dtype=torch.float32)
    except (ValueError, IndexError) as err:
        raise CheckpointError(f"checkpoint: optimizer state does not match the model ({err})") from err
    optim_state = {"state": state, "param_groups": [{**g, "params": []} for g in saved_groups]}
    optim_to_local_layout(model, optim_state, local_groups)
    for name in sorted(state):
        if not name.startswith(prefixes):
            state[name] = {k: place(name, v) if v.ndim > 0 else v for k, v in state[name].items()}
    set_optimizer_state_dict(model, trainer.optimizer, optim_state)

    rng = load_tensors(path / "trainer_state.safetensors", what="trainer RNG state")
    env = trainer.parallel.env
    restore_rng(trainer, rng, env.rank, env.world_size, 1, tp=trainer.config.tp, saved_tp=1)
    return info
