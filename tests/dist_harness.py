"""Run a test module's worker ``fn(rank, world, *args)`` on local processes joined in a gloo group.

Loopback only: the group meets through a file in a temporary directory (no port to race for), and the
variables torchrun would set are filled in for code that reads them.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqlab.distributed.setup import cleanup

WORLD = 2


def _entry(rank: int, world: int, store: str, module: str, fn_name: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        getattr(importlib.import_module(module), fn_name)(rank, world, *args)
    finally:
        cleanup()


def spawn(fn, *args, world: int = WORLD) -> None:
    """Run ``fn(rank, world, *args)`` (a module-level function of a test module) in ``world`` fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp, "store"))
        mp.spawn(_entry, args=(world, store, fn.__module__, fn.__name__, args), nprocs=world, join=True)


def spawn_collect(fn, out_dir, *args, world: int = WORLD) -> list[dict]:
    """``spawn(fn, str(out_dir), *args)`` where each rank writes ``out_dir/rank{r}.json``; returns those, by rank."""
    spawn(fn, str(out_dir), *args, world=world)
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
