"""Language modelling on real text as a Task: random windows of a packed token stream, plus a deterministic
evaluation over the validation split in bits per byte.

``TextData(data, tokenizer=None, split="train")`` encodes (or reads from the cache) the corpus ``data`` (see
``seqlab.data.corpus``) and serves ``sample(batch_size, seqlen, generator) -> Batch(inputs, targets, seq_idx)``:

    window   tokens[s : s + L + 1] of the split's stream, s uniform in [0, N - L - 1]
    inputs   window[:-1]  (B, L) int64
    targets  window[1:]   (B, L) int64, every position scored (the separator that starts the next document is
             the "end of document" prediction)
    seq_idx  (B, L) int32  document number of each input position, counted from 0 in each row; a model given it
             resets its state (and masks attention) at every document start, so nothing crosses documents

Bits per byte (``evaluate_text``): the cross entropy summed over every scored token, in bits, divided by the
UTF-8 bytes of the text those tokens cover: ``bpb = loss / ln 2 * tokens / bytes`` -- tokenizer-independent, so
byte-level and subword models compare on the same scale.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import nn

from seqlab.data.corpus import absolute_spec, find_documents
from seqlab.data.tokenize import encode_corpus, load_tokenizer, separator_id
from seqlab.errors import ConfigError, InputError
from seqlab.tasks.base import IGNORE, TEST, TRAIN, Batch, Task

_SPLIT_NAMES = {TRAIN: "train", TEST: "validation", "validation": "validation", "val": "validation"}


class TextData(Task):
    """Packed-document language modelling on a text corpus (see the module docstring)."""

    name = "text"
    metric = "bpb"

    def __init__(
        self,
        data: str = "stdlib",
        tokenizer: str | None = None,
        split: str = "train",
        cache_dir: str | os.PathLike | None = None,
        validation_fraction: float = 0.05,
        seqlen: int = 256,
        _shared: tuple | None = None,
    ):
        if split not in _SPLIT_NAMES:
            raise InputError("split", f"one of {sorted(_SPLIT_NAMES)}", repr(split))
        data = absolute_spec(data)  # stored and found alike: one fingerprint however the path was spelled
        if _shared is None:
            corpus = find_documents(data)
            tok = load_tokenizer(tokenizer)
            streams, folder = encode_corpus(corpus, tok, cache_dir, validation_fraction)
            _shared = (tok, streams, folder)
        self.tokenizer, self.streams, self.cache_folder = _shared
        self.split = _SPLIT_NAMES[split]
        self.stream = self.streams[self.split]
        self.vocab_size = self.tokenizer.vocab_size
        self.separator = separator_id(self.tokenizer)
        self.default_seqlen = seqlen
        self.eval_lengths = (seqlen,)
        self._config = {"data": data,
                        "tokenizer": None if tokenizer is None else os.path.abspath(tokenizer),
                        "validation_fraction": validation_fraction, "seqlen": seqlen}  # fmt: skip
        self._cache_dir = cache_dir
        self._checked_lengths: set[int] = set()

    def spec(self) -> dict:
        """What a checkpoint stores to rebuild this data source (``TextData.from_spec``); ``fingerprint`` names the
        exact encoded text (corpus files, tokenizer, split)."""
        return {**self._config, "fingerprint": self.cache_folder.name}

    @classmethod
    def from_spec(cls, spec: dict, split: str = "train", cache_dir=None) -> TextData:
        """Rebuild from ``spec()``; warns when the text changed since (another Python's stdlib, edited files)."""
        known = {"data", "tokenizer", "validation_fraction", "seqlen"}
        data = cls(**{k: v for k, v in spec.items() if k in known}, split=split, cache_dir=cache_dir)
        if spec.get("fingerprint") not in (None, data.cache_folder.name):
            warnings.warn(
                f"data: {spec['data']!r} is not the text it was when this spec was saved (its files or the "
                "tokenizer changed); batches and scores will differ from the original run",
                stacklevel=2,
            )
        return data

    def for_split(self, split: str) -> TextData:
        """The same corpus and tokenizer, another split (nothing is re-read)."""
        if _SPLIT_NAMES.get(split) == self.split:
            return self
        return TextData(**self._config, split=split, cache_dir=self._cache_dir,
                        _shared=(self.tokenizer, self.streams, self.cache_folder))  # fmt: skip

    def __len__(self) -> int:
        return len(self.stream.tokens)

    def sample(self, batch_size: int, seqlen: int, generator: torch.Generator) -> Batch:
        self._check_sample_args(batch_size, seqlen, 2)
        self.check_window(seqlen)
        tokens = self.stream.tokens
        starts = torch.randint(0, len(tokens) - seqlen, (batch_size,), generator=generator).numpy()
        positions = starts[:, None] + np.arange(seqlen + 1)  # (B, L + 1)
        window = torch.from_numpy(tokens[positions].astype(np.int64))
        return Batch(window[:, :-1], window[:, 1:], seq_idx=self.document_index(positions[:, :-1]))

    def check_window(self, seqlen: int) -> None:
        """Windows of seqlen + 1 tokens must fit in this split -- and, when training, in the validation split too
        (checked at the first training batch, not at the end of training)."""
        if seqlen in self._checked_lengths:
            return
        splits = self.streams if self.split == "train" else {self.split: self.stream}
        for name, stream in splits.items():
            if len(stream.tokens) < seqlen + 1:
                raise ConfigError(
                    f"--seqlen: the {name} split of {self._config['data']!r} holds {len(stream.tokens)} tokens, "
                    f"fewer than seqlen + 1 = {seqlen + 1}; use a shorter --seqlen or more text (split by document)"
                )
        self._checked_lengths.add(seqlen)

    def document_index(self, positions: np.ndarray) -> torch.Tensor:
        """(B, L) stream positions -> (B, L) int32 document numbers counted from 0 in each row."""
        doc = np.searchsorted(self.stream.offsets, positions, side="right") - 1
        return torch.from_numpy((doc - doc[:, :1]).astype(np.int32))


@torch.no_grad()
def evaluate_text(
    model: nn.Module,
    data: TextData,
    seqlen: int = 256,
    batch_size: int = 16,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    split: str = "validation",
) -> dict:
    """Loss (nats/token), bits per byte and perplexity over the ``split`` stream (validation), read in order.

    The stream is cut into consecutive windows of ``seqlen`` inputs (the last one shorter), each scored from a fresh
    state with ``seq_idx``; ``max_tokens`` keeps only the first windows (a fixed prefix of the split). Deterministic:
    no randomness is involved.
    """
    from seqlab.train import autocast_context

    if seqlen < 1:
        raise ConfigError(f"eval: --seqlen must be >= 1, got {seqlen}")
    data = data.for_split(split)
    tokens = data.stream.tokens
    n_targets = len(tokens) - 1
    if max_tokens is not None:
        n_targets = min(n_targets, max(1, int(max_tokens)))
    if n_targets < 1:
        other = "train" if data.split == "validation" else "validation"
        raise ConfigError(
            f"eval: the {data.split} split of {data.spec()['data']!r} holds no documents; score the {other} split "
            "(--split) or give more documents"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    starts = list(range(0, n_targets, seqlen))
    was_training = model.training
    model.eval()
    total_nats, scored = 0.0, 0
    try:
        for first in range(0, len(starts), batch_size):
            rows = starts[first : first + batch_size]
            inputs = np.full((len(rows), seqlen), data.separator, dtype=np.int64)
            targets = np.full((len(rows), seqlen), IGNORE, dtype=np.int64)
            positions = np.zeros((len(rows), seqlen), dtype=np.int64)
            for r, s in enumerate(rows):
                n = min(seqlen, n_targets - s)
                inputs[r, :n] = tokens[s : s + n]
                targets[r, :n] = tokens[s + 1 : s + n + 1]
                positions[r] = s + np.minimum(np.arange(seqlen), n - 1)
            seq_idx = data.document_index(positions).to(device)
            inputs_t, targets_t = torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)
            with autocast_context(device, dtype):
                logits = model(inputs_t, seq_idx=seq_idx)  # (b, L, V)
            nats = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), targets_t.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            total_nats += float(nats)
            scored += int((targets_t != IGNORE).sum())
    finally:
        model.train(was_training)
    covered_bytes = _bytes_covered(data, n_targets)
    loss = total_nats / scored
    return {
        "loss": loss,
        "bpb": total_nats / math.log(2) / covered_bytes,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": scored,
        "bytes": covered_bytes,
        "seqlen": seqlen,
    }


def _bytes_covered(data: TextData, n_targets: int) -> int:
    """UTF-8 bytes of the text whose tokens are among the first ``n_targets`` targets (all of the split's bytes
    when the whole stream is scored; otherwise in proportion to the text tokens scored)."""
    stream = data.stream
    if n_targets >= len(stream.tokens) - 1:
        return stream.n_bytes
    text_tokens = n_targets - int(np.searchsorted(stream.offsets, n_targets, side="right")) + 1
    return max(1, round(stream.n_bytes * text_tokens / max(1, stream.n_text_tokens)))
