"""Synthetic memory tasks: each a deterministic (inputs, targets) generator with a metric.

    from seqlab.tasks import make_task
    task = make_task("mqar", seqlen=128, num_kv_pairs=16)
    batch = next(task.batches(batch_size=32, seed=0, split="train"))   # Batch(inputs (B, L), targets (B, L))
    make_task("selective_copy", paper=True)                              # the published setup

| name | what it tests | source |
|---|---|---|
| selective_copy | content-aware memory (copy data tokens scattered among noise) | Mamba, sec. 4.1.1 |
| induction_heads | associative recall + length extrapolation | Mamba, sec. 4.1.2 |
| mqar | multi-query associative recall (state capacity) | Zoology; Mamba-2 App. D.1 |
| passkey | retrieval of one fact at any depth of a long text (bytes) | Landmark Attention |
| state_tracking | A5 / S5 word problems, parity | The Illusion of State |
| copy_digits | copying a 20-digit number across filler | Repeat After Me |
"""

from __future__ import annotations

import inspect
from typing import Any

from seqlab.errors import ConfigError
from seqlab.tasks.base import IGNORE, TEST, TRAIN, Batch, Task, split_seed
from seqlab.tasks.copy_digits import CopyDigits
from seqlab.tasks.induction_heads import InductionHeads
from seqlab.tasks.mqar import MQAR
from seqlab.tasks.passkey import Passkey
from seqlab.tasks.selective_copy import SelectiveCopy
from seqlab.tasks.state_tracking import StateTracking

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SelectiveCopy, InductionHeads, MQAR, Passkey, StateTracking, CopyDigits)
}


def make_task(name: str, paper: bool = False, **kwargs: Any) -> Task:
    """Build a task by name; ``paper=True`` starts from the published setup (``cls.PAPER``), kwargs override."""
    if name not in TASKS:
        raise ConfigError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    cls = TASKS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(f"{name}: unknown argument(s) {unknown}; expected some of {sorted(accepted)}")
    return cls(**{**(cls.paper_config() if paper else {}), **kwargs})


def published_results() -> list[dict[str, Any]]:
    """Published numbers of every task, as results.json ``meta.published`` entries (values in percent)."""
    return [{"task": name, **entry} for name, cls in TASKS.items() for entry in cls.PUBLISHED]


__all__ = ["IGNORE", "TEST", "TRAIN", "TASKS", "Batch", "Task", "make_task", "published_results", "split_seed"]
