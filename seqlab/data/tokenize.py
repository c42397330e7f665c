"""Encode a corpus once into memory-mapped token streams, cached on disk.

Stream layout (one per split, "train" and "validation")::

    tokens   [eos d0 ... eos d1 ... eos ... eos]   every document is preceded by the separator (eos); one
                                                   final eos closes the last document
    offsets  (n_docs + 1,) int64                   document i is tokens[offsets[i]:offsets[i+1]], starting with
                                                   its separator; offsets[-1] is the closing eos

Tokens are uint16 when the vocabulary has fewer than 65536 ids, else uint32. The cache folder is
``<cache_dir>/<name>-<key>`` with ``key`` a hash of the corpus fingerprint (names, sizes, mtimes), the tokenizer
fingerprint and the split settings, so a changed file or another tokenizer re-encodes, and an unchanged corpus is
read back without touching its text. Folders are written atomically (``seqlab.io.atomic_dir``).

The split is by document: document ``name`` goes to validation when the first 8 bytes of sha256(name), as an
integer, modulo 10000 fall below ``validation_fraction * 10000`` -- the same document lands in the same split on
every machine. With two or more documents each split gets at least one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqlab.data.corpus import Corpus
from seqlab.errors import ConfigError
from seqlab.io import atomic_dir, read_json, write_json

SPLITS = ("train", "validation")
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$SEQLAB_CACHE/data`` or ``~/.cache/seqlab/data``."""
    base = os.environ.get("SEQLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seqlab")
    return Path(base) / "data"


def load_tokenizer(directory: str | os.PathLike | None):
    """ByteTokenizer when ``directory`` is None, else the local Hugging Face tokenizer in ``directory``."""
    if directory is None:
        from seqlab.tokenizer import ByteTokenizer

        return ByteTokenizer()
    from seqlab.interop.hf_tokenizer import HFTokenizer

    return HFTokenizer(directory)


def tokenizer_fingerprint(tokenizer) -> str:
    path = getattr(tokenizer, "directory", None)
    if path is not None and (Path(path) / "tokenizer.json").is_file():
        return "hf-" + hashlib.sha256((Path(path) / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}-{tokenizer.vocab_size}"


def separator_id(tokenizer) -> int:
    for name in ("eos_id", "bos_id", "pad_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("--tokenizer: it has no eos/bos/pad token to separate documents with")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def is_validation(name: str, fraction: float) -> bool:
    value = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 10000
    return value < fraction * 10000


def assign_splits(names: list[str], fraction: float) -> list[str]:
    """"train" / "validation" for each document name (deterministic; see the module docstring)."""
    splits = ["validation" if is_validation(n, fraction) else "train" for n in names]
    if len(names) >= 2 and 0 < fraction < 1:
        keys = [hashlib.sha256(n.encode()).hexdigest() for n in names]
        for missing in SPLITS:
            if missing not in splits:  # move the document with the smallest hash over
                index = min(range(len(names)), key=keys.__getitem__)
                splits[index] = missing
    return splits


@dataclass
class TokenStream:
    """One split's memory-mapped tokens (N,) and document offsets (n_docs + 1,)."""

    tokens: np.ndarray
    offsets: np.ndarray
    names: list[str]
    n_bytes: int  # UTF-8 bytes of the split's text (bits per byte divides by these)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_text_tokens(self) -> int:
        """Tokens of the text itself (separators excluded)."""
        return len(self.tokens) - len(self.offsets)


def encode_corpus(
    corpus: Corpus,
    tokenizer=None,
    cache_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.05,
) -> tuple[dict[str, TokenStream], Path]:
    """Token streams of both splits of ``corpus`` (encoded now, or read back from the cache) and the cache folder."""
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation_fraction: expected a number in [0, 1), got {validation_fraction!r}")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, corpus.fingerprint(), tokenizer_fingerprint(tokenizer), validation_fraction]).encode()
    ).hexdigest()[:20]
    label = "".join(ch if ch.isalnum() else "_" for ch in corpus.name)[:40].strip("_") or "corpus"
    folder = cache_dir / f"{label}-{key}"
    if not (folder / "meta.json").is_file():
        _write_cache(folder, corpus, tokenizer, validation_fraction)
    meta = read_json(folder / "meta.json", what="token cache")
    streams = {}
    for split in SPLITS:
        stream = TokenStream(
            tokens=np.load(folder / f"{split}_tokens.npy", mmap_mode="r"),
            offsets=np.load(folder / f"{split}_offsets.npy"),
            names=meta["splits"][split]["names"],
            n_bytes=int(meta["splits"][split]["bytes"]),
        )
        streams[split] = stream
    return streams, folder


def _encode_text(tokenizer, text: str) -> np.ndarray:
    from seqlab.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _write_cache(folder: Path, corpus: Corpus, tokenizer, fraction: float) -> None:
    names = corpus.names()
    splits = assign_splits(names, fraction)
    sep = separator_id(tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
    n_bytes = dict.fromkeys(SPLITS, 0)
    for path, split in zip(corpus.paths, splits):
        text = path.read_bytes().decode("utf-8", errors="replace")
        ids = _encode_text(tokenizer, text)
        pieces[split].append(np.asarray([sep], dtype=dtype))
        pieces[split].append(ids.astype(dtype))
        lengths[split].append(1 + len(ids))
        n_bytes[split] += len(text.encode("utf-8"))
    meta = {"format": CACHE_FORMAT, "corpus": corpus.name, "root": str(corpus.root),
            "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
            "separator": sep, "validation_fraction": fraction, "dtype": dtype.name, "splits": {}}  # fmt: skip
    with atomic_dir(folder) as tmp:
        for split in SPLITS:
            tokens = np.concatenate([*pieces[split], np.asarray([sep], dtype=dtype)])
            offsets = np.concatenate([[0], np.cumsum(lengths[split], dtype=np.int64)]).astype(np.int64)
            np.save(tmp / f"{split}_tokens.npy", tokens)
            np.save(tmp / f"{split}_offsets.npy", offsets)
            meta["splits"][split] = {
                "names": [n for n, s in zip(names, splits) if s == split],
                "tokens": int(len(tokens)),
                "bytes": n_bytes[split],
            }
        write_json(tmp / "meta.json", meta)
