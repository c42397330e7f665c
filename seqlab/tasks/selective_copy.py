"""Selective copying (Mamba paper, Gu & Dao 2023, sec. 4.1.1 and App. E.1).

A few data tokens are scattered at random positions among noise; after the noise region the model must
reproduce the data tokens, in order, at a run of marker positions. Solving it needs content-aware memory:
a time-invariant convolution (S4) cannot tell data from noise, a selective SSM can.

Token format (vocab_size V, n_tokens M, sequence length L):
    0            noise token (the "white" token of the paper's Figure 2)
    1 .. V-2     data tokens
    V-1          marker (separator): "emit the next data token here"
    inputs  = [ region of L-M tokens: M data tokens at random sorted positions, noise elsewhere ] [ M markers ]
    targets = IGNORE in the region; at the i-th marker, the i-th data token (scored positions only)
Metric: accuracy over the M answer positions (the paper's number); exact match = all M right.

Published setup (``PAPER``): L = 4096 including the answer, V = 16, M = 16. Published accuracy
(Mamba paper Table 1): S4 18.3, H3 57.0, Hyena 30.1, Mamba 99.8.
"""

from __future__ import annotations

import torch

from seqlab.errors import ConfigError
from seqlab.tasks.base import IGNORE, Batch, Task, randint, random_positions, require_int, require_lengths

_SOURCE = "Gu & Dao 2023, Mamba, Table 1"


class SelectiveCopy(Task):
    name = "selective_copy"
    vocab_size = 16
    default_seqlen = 256
    metric = "accuracy"
    PAPER = {"seqlen": 4096, "n_tokens": 16, "vocab_size": 16}
    PUBLISHED = (
        {"model": "s4", "metric": "accuracy", "value": 18.3, "source": _SOURCE},
        {"model": "h3", "metric": "accuracy", "value": 57.0, "source": _SOURCE},
        {"model": "hyena", "metric": "accuracy", "value": 30.1, "source": _SOURCE},
        {"model": "mamba", "metric": "accuracy", "value": 99.8, "source": _SOURCE},
    )

    NOISE = 0

    def __init__(self, seqlen: int = 256, n_tokens: int = 8, vocab_size: int = 16,
                 eval_lengths: list[int] | None = None):
        self.default_seqlen = require_int("seqlen", seqlen, 2)
        self.n_tokens = require_int("n_tokens", n_tokens, 1)
        self.vocab_size = require_int("vocab_size", vocab_size, 3)
        if seqlen < 2 * n_tokens:
            raise ConfigError(f"seqlen: expected >= 2 * n_tokens = {2 * n_tokens}, got {seqlen}")
        self.marker = vocab_size - 1
        self.eval_lengths = require_lengths("eval_lengths", [seqlen] if eval_lengths is None else eval_lengths)
        self._config = {"seqlen": seqlen, "n_tokens": n_tokens, "vocab_size": vocab_size,
                        "eval_lengths": list(self.eval_lengths)}

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        M = self.n_tokens
        self._check_sample_args(batch_size, seqlen, 2 * M)
        region = seqlen - M
        data = randint(1, self.vocab_size - 1, (batch_size, M), generator)  # (B, M)
        positions = random_positions(batch_size, region, M, generator)  # (B, M) sorted
        inputs = torch.full((batch_size, seqlen), self.NOISE, dtype=torch.long)
        inputs.scatter_(1, positions, data)
        inputs[:, region:] = self.marker
        targets = torch.full((batch_size, seqlen), IGNORE, dtype=torch.long)
        targets[:, region:] = data
        return Batch(inputs, targets)
