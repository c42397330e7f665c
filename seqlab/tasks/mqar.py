"""Multi-query associative recall, MQAR (Zoology, Arora et al. 2023; Mamba-2 paper App. D.1).

The sequence opens with key-value pairs; later, each key is asked again among filler and the model must
emit its value. Many queries per sequence make it a test of how much a fixed-size state can store.

Token format (vocab_size V, num_kv_pairs N, sequence length L >= 4N), following Zoology's layout:
    keys    1 .. V/2-1          (distinct within a sample; 0 is the filler token when filler="zero")
    values  V/2 .. V-1          (distinct within a sample)
    inputs  = [k1 v1 k2 v2 ... kN vN] [query region of L-2N tokens]
    query region: N query slots at even offsets 2g (g < (L-2N)/2, distinct); slot of key k_i holds k_i;
                  every other position holds filler (random tokens from the whole vocab, or 0)
    targets = IGNORE except at each query slot: the value paired with the key there (next-token: having read
              the key, emit its value)
Query gaps g are drawn with probability ~ (g+1)^(power_a-1) (Zoology's power law, power_a = 0.01 puts most
queries early); power_a=None draws them uniformly.
Metric: accuracy over the query positions.

Published setup (``PAPER``, Mamba-2 App. D.1): V = 8192, L in {256, 512, 1024}, N = L/4. Zoology Fig. 2:
attention solves MQAR (~100%) at every model width; gated convolutions and SSMs need width growing with N.
"""

from __future__ import annotations

import torch

from seqlab.errors import ConfigError, InputError
from seqlab.tasks.base import IGNORE, Batch, Task, randint, require_int, require_lengths

_SOURCE = "Arora et al. 2023, Zoology, Fig. 2"


class MQAR(Task):
    name = "mqar"
    vocab_size = 256
    default_seqlen = 64
    metric = "accuracy"
    PAPER = {"seqlen": 256, "vocab_size": 8192, "num_kv_pairs": None, "eval_lengths": [256, 512, 1024]}
    PUBLISHED = ({"model": "transformer", "metric": "accuracy", "value": 100.0, "source": _SOURCE},)

    def __init__(self, seqlen: int = 64, vocab_size: int = 256, num_kv_pairs: int | None = None,
                 power_a: float | None = 0.01, filler: str = "random", eval_lengths: list[int] | None = None):
        self.default_seqlen = require_int("seqlen", seqlen, 4)
        self.vocab_size = require_int("vocab_size", vocab_size, 6)
        self.num_kv_pairs = None if num_kv_pairs is None else require_int("num_kv_pairs", num_kv_pairs, 1)
        if power_a is not None and not (isinstance(power_a, (int, float)) and 0 < power_a <= 1):
            raise ConfigError(f"power_a: expected a number in (0, 1] or None, got {power_a!r}")
        if filler not in ("random", "zero"):
            raise ConfigError(f"filler: expected 'random' or 'zero', got {filler!r}")
        self.power_a, self.filler = power_a, filler
        self.eval_lengths = require_lengths("eval_lengths", [seqlen] if eval_lengths is None else eval_lengths)
        self.pairs(seqlen)  # validate now
        self._config = {"seqlen": seqlen, "vocab_size": vocab_size, "num_kv_pairs": num_kv_pairs,
                        "power_a": power_a, "filler": filler, "eval_lengths": list(self.eval_lengths)}

    def pairs(self, seqlen: int) -> int:
        """Number of key-value pairs at this length (num_kv_pairs, or seqlen // 4 when unset)."""
        n = self.num_kv_pairs or seqlen // 4
        limit = self.vocab_size // 2 - 1
        if n < 1 or n > limit:
            raise ConfigError(f"num_kv_pairs: expected 1 .. vocab_size//2 - 1 = {limit} at seqlen {seqlen}, got {n}")
        if seqlen < 4 * n:
            raise InputError("seqlen", f">= 4 * num_kv_pairs = {4 * n}", seqlen)
        return n

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        self._check_sample_args(batch_size, seqlen, 4)
        N, V = self.pairs(seqlen), self.vocab_size
        half = V // 2
        # distinct keys in 1..half-1 and distinct values in half..V-1, in random order
        keys = torch.rand(batch_size, half - 1, generator=generator).topk(N, dim=1).indices + 1  # (B, N)
        values = torch.rand(batch_size, V - half, generator=generator).topk(N, dim=1).indices + half  # (B, N)

        n_slots = (seqlen - 2 * N) // 2
        g = torch.arange(1, n_slots + 1, dtype=torch.float64)
        weights = torch.ones_like(g) if self.power_a is None else g ** (self.power_a - 1)
        gaps = torch.multinomial(weights.expand(batch_size, n_slots), N, replacement=False, generator=generator)
        query_pos = 2 * N + 2 * gaps  # (B, N) position of the query for key i

        if self.filler == "random":
            inputs = randint(0, V, (batch_size, seqlen), generator)
        else:
            inputs = torch.zeros(batch_size, seqlen, dtype=torch.long)
        inputs[:, 0:2 * N:2] = keys
        inputs[:, 1:2 * N:2] = values
        inputs.scatter_(1, query_pos, keys)
        targets = torch.full((batch_size, seqlen), IGNORE, dtype=torch.long)
        targets.scatter_(1, query_pos, values)
        return Batch(inputs, targets)
