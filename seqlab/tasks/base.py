"""The task interface: a deterministic generator of (inputs, targets) token batches, plus its metric.

A task draws every sample from a seeded ``torch.Generator``; train and test streams use disjoint seed ranges
(see ``split_seed``), so a test set can be regenerated from its seed and never overlaps training.

    inputs  (B, L) int64 token ids fed to the model
    targets (B, L) int64 next-token labels; IGNORE (-100) where a position is not scored
A position is "correct" when argmax(logits) == target; ``accuracy`` is over scored positions, and
``exact_match`` over samples whose every scored position is correct.

Beyond ``sample``/``batches`` every task carries a little metadata the arena and the report use:
``metric`` (its headline metric), ``eval_lengths`` (the lengths it is tested at), ``PAPER`` (the constructor
arguments of the published setup, see ``paper_config``), ``PUBLISHED`` (published numbers) and ``config()``
(the arguments it was built with, JSON-ready).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqlab.errors import ConfigError, InputError

IGNORE = -100
TRAIN, TEST = "train", "test"
# torch.Generator (CPU, mt19937) keeps only the low 32 bits of its seed, so the split offset must stay below 2**32:
# with an offset of 2**40 the train and test streams of a seed would be the very same stream.
SEED_LIMIT = 1 << 31  # seeds of train and test streams stay below it
_SPLIT_OFFSET = {TRAIN: 0, TEST: SEED_LIMIT}


def split_seed(seed: int, split: str) -> int:
    """Seed of a split's stream: train and test seeds never collide for seeds below 2**31."""
    if split not in _SPLIT_OFFSET:
        raise InputError("split", f"one of {tuple(_SPLIT_OFFSET)}", repr(split))
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise InputError("seed", "an int in [0, 2**31)", repr(seed))
    return _SPLIT_OFFSET[split] + seed


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, IGNORE where not scored
    seq_idx: torch.Tensor | None = None  # (B, L) document index of packed text; models reset state between documents


class Task:
    """Subclasses set ``name``, ``vocab_size``, ``default_seqlen`` and implement ``sample``."""

    name: str = "task"
    vocab_size: int = 0
    default_seqlen: int = 0
    metric: str = "accuracy"
    eval_lengths: tuple[int, ...] = ()
    PAPER: ClassVar[dict[str, Any]] = {}
    PUBLISHED: ClassVar[tuple[dict[str, Any], ...]] = ()

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def batches(self, batch_size: int, seqlen: int | None = None, seed: int = 0, split: str = TRAIN):
        """An endless, reproducible stream of batches for ``split``."""
        generator = torch.Generator().manual_seed(split_seed(seed, split))
        while True:
            yield self.sample(batch_size, seqlen or self.default_seqlen, generator)

    # --- helpers shared by the concrete tasks -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The constructor arguments this task was built with (JSON-ready; for results.json meta)."""
        return dict(getattr(self, "_config", {}))

    @classmethod
    def paper_config(cls) -> dict[str, Any]:
        """Constructor arguments of the published setup (large; the defaults are scaled for a CPU budget)."""
        return dict(cls.PAPER)

    def score(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """accuracy / exact_match of ``logits`` (B, L, V>=vocab_size) against ``targets`` (B, L)."""
        from seqlab.tasks.metrics import score

        return score(logits, targets, vocab_size=self.vocab_size)

    def _check_sample_args(self, batch_size: int, seqlen: int, min_seqlen: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch_size", "a positive int", repr(batch_size))
        if not isinstance(seqlen, int) or seqlen < min_seqlen:
            raise InputError("seqlen", f"an int >= {min_seqlen} for {self.name} with {self.config()}", repr(seqlen))


def require_int(argument: str, value: Any, minimum: int) -> int:
    """Constructor-argument check: an int >= minimum, else ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{argument}: expected an int >= {minimum}, got {value!r}")
    return value


def require_lengths(argument: str, value: Any) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (evaluation lengths)."""
    if isinstance(value, int) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{argument}: expected a list of positive ints, got {value!r}")
    lengths = tuple(value)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ConfigError(f"{argument}: expected a list of positive ints, got {value!r}")
    return lengths


def randint(low: int, high: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform int64 in [low, high) drawn from ``generator`` (CPU)."""
    return torch.randint(low, high, size, generator=generator, dtype=torch.long)


def random_positions(batch_size: int, n_slots: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(B, k) sorted distinct positions in [0, n_slots) per row, uniformly."""
    keys = torch.rand(batch_size, n_slots, generator=generator)
    return keys.topk(k, dim=1).indices.sort(dim=1).values
