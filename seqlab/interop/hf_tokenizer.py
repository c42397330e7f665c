"""A local Hugging Face tokenizer (``tokenizer.json``, read with the ``tokenizers`` package; nothing downloads)
behind the ByteTokenizer interface: ``encode(text) -> ids``, ``decode(ids) -> text``, ``stream_decoder()``,
``bos_id`` / ``eos_id`` (None when the tokenizer has none), ``vocab_size``.

Special tokens come from ``tokenizer_config.json`` (``bos_token`` / ``eos_token``), then ``config.json``
(``bos_token_id`` / ``eos_token_id``), then common names (``</s>``, ``<|endoftext|>``, ``<eos>``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from seqlab.errors import CheckpointError, ConfigError, InputError

_EOS_NAMES = ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|startoftext|>", "<bos>", "<|bos|>", "[CLS]")


class HFTokenizer:
    def __init__(self, directory: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ConfigError(
                "--tokenizer: reading a Hugging Face tokenizer needs the `tokenizers` package "
                '(pip install "seqlab[hf]")'
            ) from err
        directory = Path(directory).expanduser()
        path = directory / "tokenizer.json" if directory.is_dir() else directory
        if not path.is_file():
            raise CheckpointError(
                f"tokenizer: {str(path)!r} does not exist; pass a directory with a tokenizer.json (as written by "
                "transformers' save_pretrained or tokenizers' Tokenizer.save)"
            )
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises plain Exceptions for malformed files
            raise CheckpointError(f"tokenizer: {str(path)!r} could not be read ({err})") from err
        self.directory = path.parent
        # ids need not be contiguous: the vocabulary spans the largest id, not the number of entries
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.bos_id = self._special("bos", _BOS_NAMES)
        self.eos_id = self._special("eos", _EOS_NAMES)
        self.pad_id = self._special("pad", ("<pad>", "[PAD]", "<|pad|>"))

    def _special(self, kind: str, names: tuple[str, ...]) -> int | None:
        token = _read_json(self.directory / "tokenizer_config.json").get(f"{kind}_token")
        if isinstance(token, dict):  # AddedToken serialised as {"content": ...}
            token = token.get("content")
        if isinstance(token, str) and self._tokenizer.token_to_id(token) is not None:
            return self._tokenizer.token_to_id(token)
        token_id = _read_json(self.directory / "config.json").get(f"{kind}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < self.vocab_size:
            return token_id
        for name in names:
            found = self._tokenizer.token_to_id(name)
            if found is not None:
                return found
        return None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InputError("text", "a str", type(text).__name__)
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        eos = [self.eos_id] if add_eos and self.eos_id is not None else []
        return bos + list(ids) + eos

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); special tokens and ids beyond the vocabulary (a model's padding
        rows) are skipped."""
        ids = [i for i in _as_ints(ids) if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> HFStreamDecoder:
        return HFStreamDecoder(self)


class HFStreamDecoder:
    """``push(ids) -> str``: the text the ids so far add; a trailing incomplete character (U+FFFD from a split
    byte sequence) is held back until the next ids complete it. ``flush()`` returns whatever is left."""

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, ids: Iterable[int] | int) -> str:
        self._ids += [ids] if isinstance(ids, int) else _as_ints(ids)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted) :], text
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        new = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _as_ints(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
