"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"), byte level.

A short fact, "The magic word is X.", is hidden at a chosen depth of a long, boring filler text; at the end
the model is asked for it and must emit X. Plotted over (length x depth) it shows where a model's memory of
a single precise fact gives out.

Token format (ByteTokenizer ids: 0..255 are UTF-8 bytes, 256 pad, 257 bos, 258 eos; vocab 259):
    inputs = [bos] filler[:a] "The magic word is X. " filler[a:] "\\nWhat is the magic word? The magic word is " X
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " repeated
             and cut so that the whole sequence is exactly L tokens; the needle goes in at the sentence boundary
             closest to depth d (0 = start, 1 = end of the filler)
    X      = ``answer_len`` random characters (digits, or digits and capital letters with alphabet="alnum")
    targets = IGNORE except at the answer: the position before each byte of X is labelled with that byte
              (next-token convention, teacher forcing), i.e. targets[L-n-1 .. L-2] = X
Metric: exact match of the whole answer (all n bytes right).

``sample(..., depth=None)`` draws a uniform depth per sample; ``grid(lengths, depths, ...)`` yields one batch per
(length, depth) cell for the heatmap.
"""

from __future__ import annotations

import torch

from seqlab.errors import ConfigError, InputError
from seqlab.tasks.base import IGNORE, TEST, Batch, Task, randint, require_int, require_lengths, split_seed

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258  # as seqlab.tokenizer.ByteTokenizer
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The magic word is {}. "
QUESTION = "\nWhat is the magic word? The magic word is "
ALPHABETS = {"digits": "0123456789", "alnum": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class Passkey(Task):
    name = "passkey"
    vocab_size = 259
    default_seqlen = 512
    metric = "exact_match"
    PAPER = {"seqlen": 4096, "answer_len": 5, "eval_lengths": [1024, 2048, 4096, 8192, 16384, 32768],
             "depths": [0.0, 0.25, 0.5, 0.75, 1.0]}
    PUBLISHED = ()

    def __init__(self, seqlen: int = 512, answer_len: int = 5, alphabet: str = "digits",
                 eval_lengths: list[int] | None = None, depths: list[float] | None = None):
        self.default_seqlen = require_int("seqlen", seqlen, 1)
        self.answer_len = require_int("answer_len", answer_len, 1)
        if alphabet not in ALPHABETS:
            raise ConfigError(f"alphabet: expected one of {sorted(ALPHABETS)}, got {alphabet!r}")
        self.alphabet = alphabet
        self._symbols = _bytes(ALPHABETS[alphabet])
        self._needle_prefix = _bytes(NEEDLE.split("{}")[0])
        self._needle_suffix = _bytes(NEEDLE.split("{}")[1])
        self._question = _bytes(QUESTION)
        if seqlen < self.min_seqlen:
            raise ConfigError(f"seqlen: expected >= {self.min_seqlen} (needle, question and answer), got {seqlen}")
        lengths = [256, 512, 1024, 2048] if eval_lengths is None else eval_lengths
        self.eval_lengths = require_lengths("eval_lengths", lengths)
        depths = [0.0, 0.25, 0.5, 0.75, 1.0] if depths is None else depths
        if not depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
            raise ConfigError(f"depths: expected a list of numbers in [0, 1], got {depths!r}")
        self.depths = tuple(float(d) for d in depths)
        self._config = {"seqlen": seqlen, "answer_len": answer_len, "alphabet": alphabet,
                        "eval_lengths": list(self.eval_lengths), "depths": list(self.depths)}

    @property
    def min_seqlen(self) -> int:
        """bos + needle + question + answer, with no filler at all."""
        fixed = len(self._needle_prefix) + self.answer_len + len(self._needle_suffix)
        return 1 + fixed + len(self._question) + self.answer_len

    def _filler(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n filler bytes and the sentence boundaries in them (positions where a sentence starts)."""
        unit = _bytes(FILLER)
        filler = unit.repeat(n // len(unit) + 1)[:n]
        ends = ((filler[:-1] == ord(".")) & (filler[1:] == ord(" "))).nonzero().flatten() + 2
        return filler, torch.cat([torch.tensor([0]), ends, torch.tensor([n])]).unique()

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator,
               depth: float | None = None) -> Batch:
        self._check_sample_args(batch_size, seqlen, self.min_seqlen)
        if depth is not None and not (isinstance(depth, (int, float)) and 0 <= depth <= 1):
            raise InputError("depth", "a number in [0, 1] or None", repr(depth))
        n = self.answer_len
        answers = self._symbols[randint(0, len(self._symbols), (batch_size, n), generator)]  # (B, n)
        depths = torch.rand(batch_size, generator=generator, dtype=torch.float64) if depth is None else None
        filler, boundaries = self._filler(seqlen - self.min_seqlen)
        inputs = torch.empty(batch_size, seqlen, dtype=torch.long)
        for b in range(batch_size):
            d = float(depths[b]) if depths is not None else float(depth)
            cut = int(boundaries[(boundaries.double() - d * len(filler)).abs().argmin()])
            inputs[b] = torch.cat([
                torch.tensor([BOS_ID]), filler[:cut], self._needle_prefix, answers[b], self._needle_suffix,
                filler[cut:], self._question, answers[b],
            ])
        targets = torch.full((batch_size, seqlen), IGNORE, dtype=torch.long)
        targets[:, seqlen - n - 1:seqlen - 1] = answers
        return Batch(inputs, targets)

    def grid(self, batch_size: int, lengths: list[int] | None = None, depths: list[float] | None = None,
             seed: int = 0, split: str = TEST):
        """Yield (length, depth, Batch) for every cell of lengths x depths (defaults: eval_lengths x depths)."""
        generator = torch.Generator().manual_seed(split_seed(seed, split))
        for length in lengths or self.eval_lengths:
            for depth in depths or self.depths:
                yield length, depth, self.sample(batch_size, length, generator, depth=depth)
