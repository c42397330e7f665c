"""Copy a long number across a long prompt (cf. Jelassi et al. 2024, "Repeat After Me": copying separates
fixed-state models from attention).

A number of ``n_digits`` digits opens the sequence; filler follows; then a marker, after which the model must
reproduce the number digit by digit.

Token format (vocab 16, n_digits D, sequence length L >= 2D + 1):
    0 .. 9       digits
    10 .. 14     filler symbols (uniform random)
    15           marker ("now copy")
    inputs  = [d_1 .. d_D] [filler x (L - 2D)] [marker] [d_1 .. d_{D-1}]
    targets = IGNORE except: at the marker d_1, at the copy of d_i the next digit d_{i+1} (teacher forcing)
Metric: exact match of all D digits (accuracy = per digit).
"""

from __future__ import annotations

import torch

from seqlab.tasks.base import IGNORE, Batch, Task, randint, require_int, require_lengths

N_FILLER = 5


class CopyDigits(Task):
    name = "copy_digits"
    vocab_size = 16
    default_seqlen = 128
    metric = "exact_match"
    FILLER_IDS = tuple(range(10, 10 + N_FILLER))
    MARKER = 15
    # tested at the training length and beyond (the default [64 .. 512] would never reach the 1024 trained on)
    PAPER = {"n_digits": 20, "seqlen": 1024, "eval_lengths": [256, 512, 1024, 2048, 4096]}
    PUBLISHED = ()

    def __init__(self, seqlen: int = 128, n_digits: int = 20, eval_lengths: list[int] | None = None):
        self.n_digits = require_int("n_digits", n_digits, 1)
        self.default_seqlen = require_int("seqlen", seqlen, 2 * n_digits + 1)
        lengths = [64, 128, 256, 512] if eval_lengths is None else eval_lengths
        self.eval_lengths = require_lengths("eval_lengths", [n for n in lengths if n >= 2 * n_digits + 1])
        self._config = {"seqlen": seqlen, "n_digits": n_digits, "eval_lengths": list(self.eval_lengths)}

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        D = self.n_digits
        self._check_sample_args(batch_size, seqlen, 2 * D + 1)
        digits = randint(0, 10, (batch_size, D), generator)  # (B, D)
        inputs = randint(10, 10 + N_FILLER, (batch_size, seqlen), generator)
        start = seqlen - D  # position of the marker
        inputs[:, :D] = digits
        inputs[:, start] = self.MARKER
        inputs[:, start + 1:] = digits[:, :-1]
        targets = torch.full((batch_size, seqlen), IGNORE, dtype=torch.long)
        targets[:, start:] = digits
        return Batch(inputs, targets)
