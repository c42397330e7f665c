"""Evaluate a model on a task: fresh samples from the task's test split, at any length and seed.

Accuracy counts scored positions whose argmax (over the task's vocabulary) equals the target; exact match counts
samples whose every scored position is right (seqlab.tasks.base).
"""

from __future__ import annotations

import torch
from torch import nn

from seqlab.errors import ConfigError
from seqlab.tasks.base import IGNORE, TEST, split_seed


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    task,
    seqlen: int | None = None,
    samples: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: str = "auto",
) -> dict:
    """Accuracy, exact match and loss of ``model`` on ``samples`` fresh test samples of length ``seqlen``.

    The samples are a pure function of (task, seqlen, seed): the same call always sees the same data, and it never
    overlaps the training stream (``split_seed``).
    """
    from seqlab.train import autocast_context, scored_loss

    if samples < 1:
        raise ConfigError(f"eval: --samples must be >= 1, got {samples}")
    seqlen = seqlen or task.default_seqlen
    if hasattr(task, "for_split"):  # a data source holding several splits (text): score its held-out one
        task = task.for_split(TEST)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generator = torch.Generator().manual_seed(split_seed(seed, TEST))
    vocab = getattr(task, "vocab_size", None)
    was_training = model.training
    model.eval()
    correct = scored = exact = seen = 0
    loss_sum = 0.0
    try:
        while seen < samples:
            n = min(batch_size, samples - seen)
            batch = task.sample(n, seqlen, generator)
            inputs, targets = batch.inputs.to(device), batch.targets.to(device)  # (n, L)
            extra = {} if batch.seq_idx is None else {"seq_idx": batch.seq_idx.to(device)}
            with autocast_context(device, dtype):
                logits = model(inputs, **extra)  # (n, L, V)
            logits = logits.float()
            mask = targets != IGNORE
            predictions = (logits[..., :vocab] if vocab else logits).argmax(-1)
            hits = (predictions == targets) & mask
            correct += int(hits.sum())
            scored += int(mask.sum())
            exact += int((hits | ~mask).all(dim=1).sum())
            if mask.any():
                loss_sum += float(scored_loss(logits, targets)) * int(mask.sum())
            seen += n
    finally:
        model.train(was_training)
    return {
        "length": seqlen,
        "samples": seen,
        "seed": seed,
        "loss": loss_sum / max(scored, 1),
        "accuracy": correct / max(scored, 1),
        "exact_match": exact / seen,
    }


def evaluate_lengths(model: nn.Module, task, lengths: list[int], **kwargs) -> list[dict]:
    """``evaluate_model`` at each length (length extrapolation, accuracy by length)."""
    return [evaluate_model(model, task, seqlen=length, **kwargs) for length in lengths]
