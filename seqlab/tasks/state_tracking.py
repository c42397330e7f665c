"""State tracking: the S5 and A5 word problems and parity (Merrill, Petty & Sabharwal 2024, "The Illusion of
State in State-Space Models").

The input is a word of group elements g_1 .. g_L; at every position the model must output the running product
g_1 g_2 ... g_t. For the non-solvable groups A5 and S5 this is NC^1-complete, so a fixed-depth transformer or
(diagonal, input-independent-transition) SSM cannot do it at every length; parity (Z2) is the easy, solvable
case.

Group elements are permutations of {0..n-1} as tuples, numbered in lexicographic order (identity = token 0):
    "S5"      all 120 permutations of 5 points         vocab 120
    "A5"      the 60 even ones                          vocab 60
    "parity"  S2 = Z2: token 0 = identity, 1 = swap     vocab 2 (the prefix product is the running XOR)
Product convention: ``compose(a, b)`` applies a first, then b: compose(a, b)[i] = b[a[i]]; the prefix product is
p_1 = g_1, p_t = compose(p_{t-1}, g_t).
    inputs  (B, L) uniform random element tokens
    targets (B, L) token of p_t at every position t (token tagging: every position is scored)
Metric: accuracy over positions; ``seqlab.tasks.metrics.accuracy_by_position`` gives it per prefix length, and
the arena evaluates at each of ``eval_lengths``. Published result (qualitative): models of fixed depth need more
layers as the length grows on A5/S5, while a one-layer RNN solves them (Merrill et al. 2024, Fig. 3).
"""

from __future__ import annotations

import functools
import itertools

import torch

from seqlab.errors import ConfigError
from seqlab.tasks.base import Batch, Task, randint, require_int, require_lengths

Permutation = tuple[int, ...]
GROUPS = ("A5", "S5", "parity")


def compose(a: Permutation, b: Permutation) -> Permutation:
    """a then b: i -> b[a[i]]."""
    return tuple(b[i] for i in a)


def is_even(p: Permutation) -> bool:
    """A permutation is even when its inversion count is even."""
    return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2 == 0


@functools.cache
def group_elements(group: str) -> tuple[Permutation, ...]:
    """The elements of ``group`` as permutation tuples, in lexicographic order (identity first)."""
    if group == "S5":
        return tuple(itertools.permutations(range(5)))
    if group == "A5":
        return tuple(p for p in itertools.permutations(range(5)) if is_even(p))
    if group == "parity":
        return tuple(itertools.permutations(range(2)))
    raise ConfigError(f"group: expected one of {GROUPS}, got {group!r}")


@functools.cache
def cayley_table(group: str) -> torch.Tensor:
    """(n, n) int64: table[i, j] = token of compose(element i, element j)."""
    elements = group_elements(group)
    index = {p: k for k, p in enumerate(elements)}
    return torch.tensor([[index[compose(a, b)] for b in elements] for a in elements], dtype=torch.long)


def prefix_products(tokens: torch.Tensor, group: str) -> torch.Tensor:
    """(B, L) element tokens -> (B, L) tokens of the running products, by a log-depth (Hillis-Steele) scan."""
    table = cayley_table(group)
    out = tokens.clone()
    offset = 1
    while offset < out.shape[1]:
        # the product is associative, so combining blocks of 2^k elements pairwise gives every prefix in log L steps
        out = torch.cat([out[:, :offset], table[out[:, :-offset], out[:, offset:]]], dim=1)
        offset *= 2
    return out


class StateTracking(Task):
    name = "state_tracking"
    vocab_size = 60
    default_seqlen = 32
    metric = "accuracy"
    PAPER = {"group": "A5", "seqlen": 32}
    PUBLISHED = ()

    def __init__(self, group: str = "A5", seqlen: int = 32, eval_lengths: list[int] | None = None):
        self.group = group
        self.vocab_size = len(group_elements(group))
        self.default_seqlen = require_int("seqlen", seqlen, 1)
        lengths = [8, 16, 32, 64, 128] if eval_lengths is None else eval_lengths
        self.eval_lengths = require_lengths("eval_lengths", lengths)
        self._config = {"group": group, "seqlen": seqlen, "eval_lengths": list(self.eval_lengths)}

    @property
    def elements(self) -> tuple[Permutation, ...]:
        return group_elements(self.group)

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        self._check_sample_args(batch_size, seqlen, 1)
        inputs = randint(0, self.vocab_size, (batch_size, seqlen), generator)
        return Batch(inputs, prefix_products(inputs, self.group))
