"""Distributed training on PyTorch's own engine (torch.distributed): launch with ``torchrun``.

- ``setup``: process-group set-up from the torchrun environment, rank-0 helpers, barrier and clean-up.
- ``data_parallel``: DDP and FSDP2 (``fully_shard`` per block), activation checkpointing per block.
- ``tensor_parallel``: DTensor tensor parallelism for attention, SwiGLU and MoE experts; ``tp_mamba`` for Mamba-2,
  ``tp_recurrent`` for Mamba-1 and S4 (sharded by channel).
- ``context_parallel``: sequence (context) parallelism for the SSM scans: a long sequence is split along L
  across ranks, which exchange (decay, state) summaries and the conv halo; exact forward and backward.
- ``checkpoint``: sharded save/load through torch.distributed.checkpoint, resharding across world sizes.

Submodules import torch.distributed lazily where they can; import them by name.
"""

from seqlab.distributed.setup import (
    DistributedEnv,
    barrier,
    cleanup,
    get_env,
    init_distributed,
    is_rank_zero,
    launched_by_torchrun,
    rank_zero_print,
)

__all__ = [
    "DistributedEnv",
    "barrier",
    "cleanup",
    "get_env",
    "init_distributed",
    "is_rank_zero",
    "launched_by_torchrun",
    "rank_zero_print",
]
