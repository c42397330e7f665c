"""Byte-level tokenizer: token ids 0..255 are the UTF-8 bytes of the text, then three specials.

    pad_id = 256, bos_id = 257, eos_id = 258, vocab_size = 259

Any text round-trips exactly (``decode(encode(s)) == s``). Decoding skips the specials and replaces invalid
UTF-8 with U+FFFD. ``StreamDecoder`` turns a stream of ids into text as it arrives, holding back the bytes of
a multi-byte character until the character is complete.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from seqlab.errors import InputError


class ByteTokenizer:
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InputError("text", "a str", type(text).__name__)
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, or a 1-D tensor); specials and ids >= 256 are skipped."""
        return bytes(i for i in _as_ints(ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()


class StreamDecoder:
    """Incremental decoding: ``push(ids) -> str`` returns only complete characters; ``flush()`` the rest."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Iterable[int] | int) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self._decoder.decode(bytes(i for i in _as_ints(ids) if 0 <= i < 256))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def _as_ints(ids) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensor / numpy array
        ids = ids.tolist()
    return [int(i) for i in ids]
