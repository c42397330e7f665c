"""The task interface: a deterministic generator of (inputs, targets) token batches, plus its metric.

A task draws every sample from a seeded ``torch.Generator``; train and test streams use disjoint seed ranges
(see ``split_seed``), so a test set can be regenerated from its seed and never overlaps training.

    inputs  (B, L) int64 token ids fed to the model
    targets (B, L) int64 next-token labels; IGNORE (-100) where a position is not scored
A position is "correct" when argmax(logits) == target; ``accuracy`` is over scored positions, and
``exact_match`` over samples whose every scored position is correct.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
TRAIN, TEST = "train", "test"
_SPLIT_OFFSET = {TRAIN: 0, TEST: 1 << 40}


def split_seed(seed: int, split: str) -> int:
    """Seed of a split's stream: train and test seeds never collide for seeds below 2**40."""
    return _SPLIT_OFFSET[split] + seed


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, IGNORE where not scored


class Task:
    """Subclasses set ``name``, ``vocab_size``, ``default_seqlen`` and implement ``sample``."""

    name: str = "task"
    vocab_size: int = 0
    default_seqlen: int = 0

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def batches(self, batch_size: int, seqlen: int | None = None, seed: int = 0, split: str = TRAIN):
        """An endless, reproducible stream of batches for ``split``."""
        generator = torch.Generator().manual_seed(split_seed(seed, split))
        while True:
            yield self.sample(batch_size, seqlen or self.default_seqlen, generator)
