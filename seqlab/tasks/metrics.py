"""Metrics of the synthetic tasks, from logits and next-token targets.

    logits  (B, L, V) — V may exceed the task's vocab (padded heads); pass ``vocab_size`` to ignore the padding
    targets (B, L)    — IGNORE (-100) where a position is not scored

accuracy     = correct scored positions / scored positions
exact_match  = samples whose every scored position is correct / samples with at least one scored position
``LengthBreakdown`` accumulates both over many batches, keyed by sequence length (and optionally depth), and
``accuracy_by_position`` gives the accuracy at every position (state tracking: accuracy vs prefix length).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from seqlab.errors import InputError
from seqlab.tasks.base import IGNORE


def predictions(logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """argmax over the (first ``vocab_size``) classes: (B, L, V) -> (B, L) int64."""
    if logits.dim() != 3:
        raise InputError("logits", "a (B, L, V) tensor", tuple(logits.shape))
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits.argmax(dim=-1)


def _correct(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored, correct) boolean masks (B, L)."""
    if logits.shape[:2] != targets.shape:
        raise InputError("targets", f"shape {tuple(logits.shape[:2])} matching logits (B, L)", tuple(targets.shape))
    scored = targets != IGNORE
    correct = (predictions(logits, vocab_size) == targets.to(logits.device)) & scored.to(logits.device)
    return scored.to(logits.device), correct


def counts(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> dict[str, int]:
    """Raw counts: correct / scored positions, fully correct / scored samples."""
    scored, correct = _correct(logits, targets, vocab_size)
    has_scored = scored.any(dim=1)
    all_correct = (correct == scored).all(dim=1) & has_scored
    return {
        "correct": int(correct.sum()),
        "scored": int(scored.sum()),
        "exact": int(all_correct.sum()),
        "samples": int(has_scored.sum()),
    }


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def accuracy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> float:
    """Fraction of scored positions predicted correctly (nan when nothing is scored)."""
    c = counts(logits, targets, vocab_size)
    return _ratio(c["correct"], c["scored"])


def exact_match(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> float:
    """Fraction of samples whose every scored position is correct."""
    c = counts(logits, targets, vocab_size)
    return _ratio(c["exact"], c["samples"])


def score(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> dict[str, float]:
    """Both metrics at once: {"accuracy", "exact_match"}."""
    c = counts(logits, targets, vocab_size)
    return {"accuracy": _ratio(c["correct"], c["scored"]), "exact_match": _ratio(c["exact"], c["samples"])}


def accuracy_by_position(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """(L,) float accuracy at each position over the batch; nan where no sample is scored there."""
    scored, correct = _correct(logits, targets, vocab_size)
    n = scored.sum(dim=0).float()
    return torch.where(n > 0, correct.sum(dim=0).float() / n.clamp(min=1), torch.full_like(n, float("nan")))


class LengthBreakdown:
    """Accumulates metrics over batches, keyed by length (and any extra key such as depth).

    >>> bd = LengthBreakdown()
    >>> bd.add(logits, batch.targets, length=256)          # doctest: +SKIP
    >>> bd.rows()  # [{"length": 256, "accuracy": ..., "exact_match": ..., "samples": ...}]   # doctest: +SKIP
    """

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size
        self._counts: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("correct", "scored", "exact",
                                                                                      "samples"), 0))

    def add(self, logits: torch.Tensor, targets: torch.Tensor, **key: Any) -> None:
        c = counts(logits, targets, self.vocab_size)
        slot = self._counts[tuple(sorted(key.items()))]
        for name, value in c.items():
            slot[name] += value

    def rows(self) -> list[dict[str, Any]]:
        """One dict per key: the key fields plus accuracy, exact_match, samples; sorted by key."""
        out = []
        for key in sorted(self._counts):
            c = self._counts[key]
            out.append({**dict(key), "accuracy": _ratio(c["correct"], c["scored"]),
                        "exact_match": _ratio(c["exact"], c["samples"]), "samples": c["samples"]})
        return out
