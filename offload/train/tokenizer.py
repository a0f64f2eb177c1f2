"""Tokenizers for training: UTF-8 bytes (always there), or a model directory's own tokenizer.

The byte tokenizer needs no files, so the CPU recipe and the from-scratch GPU recipes run anywhere.
A Hugging Face tokenizer is only ever loaded from local files: training never touches the network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Ids are in [0, vocab_size)."""
        ...

    @property
    def eos_id(self) -> int:
        """The id that ends each document."""
        ...

    def encode(self, text: str) -> list[int]:
        """The ids of text, with no special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """text back from ids (special tokens dropped)."""
        ...


class ByteTokenizer:
    """Ids 0-255 are the UTF-8 bytes of the text; 256, 257, 258 are BOS, EOS and PAD."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`Tokenizer` interface."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
        self.tokenizer = tokenizer
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.vocab_size: int = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False, verbose=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.tokenizer.name_or_path!r})"


def load_tokenizer(spec: str, model_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer named by spec (a recipe's ``data.tokenizer``).

    "bytes": :class:`ByteTokenizer`. "auto": the tokenizer in model_path when there is one and it
    loads from local files, else bytes (with a warning in the log).
    """
    if spec == "bytes":
        return ByteTokenizer()
    if spec != "auto":
        raise ValueError(f"data.tokenizer = {spec!r}: expected 'auto' or 'bytes'")
    if model_path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except Exception as e:  # any failure to load means "not there": the contract is to fall back
        log.warning("no usable tokenizer in %s (%s: %s); using bytes", model_path, type(e).__name__, e)
        return ByteTokenizer()
    return HFTokenizer(hf)
