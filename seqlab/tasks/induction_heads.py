"""Induction heads (Mamba paper, Gu & Dao 2023, sec. 4.1.2; Olsson et al. 2022).

Random tokens; somewhere a special trigger token is followed by an answer token; the sequence ends with the
trigger again and the model must emit the token that followed the trigger the first time. It tests in-context
associative recall and, by testing far beyond the training length, length extrapolation.

Token format (vocab_size V, sequence length L):
    0 .. V-2     ordinary tokens (uniform random)
    V-1          trigger; appears exactly twice: at a random position p <= L-3 and at L-1
    inputs[p+1]  the answer token
    targets = IGNORE everywhere except targets[L-1] = inputs[p+1]
Metric: accuracy at the last position (one scored position per sample, so accuracy = exact match).

Published setup (``PAPER``): V = 16, train at L = 2^8 = 256, test at L = 2^6 .. 2^20. Published result
(Mamba paper Table 2 / Figure 4): Mamba stays at 100% up to 2^20 (4000x the training length); attention with
absolute, RoPE or xPos positions fails beyond ~2x; H3 and Hyena fail beyond the training length.
"""

from __future__ import annotations

import torch

from seqlab.tasks.base import IGNORE, Batch, Task, randint, require_int, require_lengths

_SOURCE = "Gu & Dao 2023, Mamba, Table 2 (accuracy at 2^20 after training at 2^8)"


class InductionHeads(Task):
    name = "induction_heads"
    vocab_size = 16
    default_seqlen = 256
    metric = "accuracy"
    PAPER = {"seqlen": 256, "vocab_size": 16, "eval_lengths": [2**k for k in range(6, 21)]}
    PUBLISHED = ({"model": "mamba", "metric": "accuracy", "value": 100.0, "source": _SOURCE},)

    def __init__(self, seqlen: int = 256, vocab_size: int = 16, eval_lengths: list[int] | None = None):
        self.default_seqlen = require_int("seqlen", seqlen, 4)
        self.vocab_size = require_int("vocab_size", vocab_size, 3)
        self.trigger = vocab_size - 1
        lengths = [2**k for k in range(6, 15)] if eval_lengths is None else eval_lengths
        self.eval_lengths = require_lengths("eval_lengths", lengths)
        self._config = {"seqlen": seqlen, "vocab_size": vocab_size, "eval_lengths": list(self.eval_lengths)}

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        self._check_sample_args(batch_size, seqlen, 4)
        inputs = randint(0, self.vocab_size - 1, (batch_size, seqlen), generator)  # no trigger yet
        p = randint(0, seqlen - 2, (batch_size, 1), generator)  # first trigger in [0, L-3]
        inputs.scatter_(1, p, self.trigger)
        inputs[:, -1] = self.trigger
        answer = inputs.gather(1, p + 1)  # (B, 1) the token after the first trigger
        targets = torch.full((batch_size, seqlen), IGNORE, dtype=torch.long)
        targets[:, -1:] = answer
        return Batch(inputs, targets)
