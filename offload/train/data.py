"""Training data: text files tokenized into one token array, served as shuffled fixed-length windows.

Documents are joined with the tokenizer's EOS id into a single array, which is cut into
``len // seq_len`` non-overlapping windows. With ``data.cycle`` a corpus shorter than one batch of
windows (a long-context recipe's 128K-token sequence over a 54K-token corpus) is repeated whole,
end to start, until it fills one batch: a window then holds the corpus more than once. Each epoch visits the windows in a permutation drawn from
``(seed, epoch)``, so the sequence of batches is a pure function of the data, the seed and the
position ``(epoch, index)``. That position is the whole state: a resumed run that loads it gets
exactly the batch that would have come next. Batches may straddle an epoch boundary, so a corpus
smaller than one batch still trains.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from offload.config import ConfigError, check_fields
from offload.train.tokenizer import Tokenizer

__all__ = ["DataError", "DataSpec", "TokenStream", "batches", "expand_files", "read_documents", "tokenize"]


class DataError(ValueError):
    """The data cannot make batches: no files, unreadable records, or too few tokens."""


@dataclass(kw_only=True, slots=True)
class DataSpec:
    """Where the training text is and how to read it."""

    files: list[str]
    """Paths or glob patterns (``**`` recurses); relative ones are relative to the recipe file."""
    format: Literal["text", "jsonl"] = "text"
    """"text": each file is one document. "jsonl": one JSON object per line, a document each."""
    field: str = "text"
    """For jsonl: the key holding each document's text."""
    tokenizer: Literal["auto", "bytes"] = "auto"
    """"auto": the model directory's tokenizer if the model has a path and it loads, else bytes."""
    cycle: bool = False
    """Repeat the whole token array (each pass ends with EOS, as every document does) until it
    holds one batch of windows, batch_size x seq_len tokens per rank, when it holds fewer. Off:
    such a corpus is refused (DataError)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.files:
            raise ConfigError("files", self.files, "name at least one file or glob pattern")
        for i, pattern in enumerate(self.files):
            if not pattern.strip():
                raise ConfigError(f"files[{i}]", pattern, "must not be empty")
        if not self.field:
            raise ConfigError("field", self.field, "must name a JSON key")


def expand_files(patterns: Sequence[str], root: str | Path | None = None) -> list[Path]:
    """The files that patterns name, in order, each once; relative patterns are under root.

    Glob patterns expand in sorted order. Raises DataError naming a pattern that matches nothing.
    """
    base = Path(root) if root is not None else Path.cwd()
    found: dict[Path, None] = {}
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else base / full
        if glob.has_magic(str(full)):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        else:
            matches = [full] if full.is_file() else []
        if not matches:
            raise DataError(f"data.files: {pattern!r} matches no files (looked for {full})")
        found.update(dict.fromkeys(matches))
    return list(found)


def read_documents(path: Path, format: str, field: str = "text") -> Iterator[str]:
    """The documents in the file at path: the whole file ("text"), or one per JSON line ("jsonl")."""
    text = path.read_text(encoding="utf-8")
    if format == "text":
        yield text
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{lineno}: no {field!r} key (data.field) in this record")
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{lineno}: {field!r} holds {type(record[field]).__name__}, not text")
        yield record[field]


def tokenize(files: Sequence[Path], tokenizer: Tokenizer, format: str, field: str = "text") -> np.ndarray:
    """Every document of files encoded and followed by EOS, as one int32 array."""
    parts: list[np.ndarray] = []
    for path in files:
        for doc in read_documents(path, format, field):
            parts.append(np.asarray([*tokenizer.encode(doc), tokenizer.eos_id], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class TokenStream:
    """Endless deterministic batches of ``{"input_ids", "labels"}``, LongTensor[batch_size, seq_len].

    labels equal input_ids (Hugging Face causal LMs shift them). With world_size > 1 every rank
    advances through the same windows and takes its own batch_size of each world_size * batch_size.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size = {batch_size}, seq_len = {seq_len}: both must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: must be in [0, world_size = {world_size})")
        self.num_windows = len(tokens) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"the data holds {len(tokens)} tokens, fewer than one window of seq_len = {seq_len}"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        """The next count window ids, advancing the position (across epochs when needed)."""
        taken: list[np.ndarray] = []
        while count > 0:
            order = self._permutation(self.epoch)
            chunk = order[self.index : self.index + count]
            taken.append(chunk)
            count -= len(chunk)
            self.index += len(chunk)
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(taken)

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        windows = self._take(self.batch_size * self.world_size)
        mine = windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        starts = mine[:, None] * self.seq_len + np.arange(self.seq_len)
        input_ids = torch.from_numpy(self.tokens[starts].astype(np.int64))
        return {"input_ids": input_ids, "labels": input_ids.clone()}

    def state_dict(self) -> dict[str, int]:
        """The position (JSON-ready): the next batch starts at window ``index`` of ``epoch``."""
        return {"epoch": self.epoch, "index": self.index, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Moves to a position from :meth:`state_dict`; refuses one taken over different data."""
        epoch, index = state.get("epoch"), state.get("index")
        if not isinstance(epoch, int) or not isinstance(index, int) or epoch < 0:
            raise ValueError(f"data state {state!r}: needs non-negative int 'epoch' and 'index'")
        saved_windows = state.get("num_windows", self.num_windows)
        if saved_windows != self.num_windows:
            raise ValueError(
                f"data state was saved over {saved_windows} windows, this data has {self.num_windows}: "
                "the files, tokenizer or seq_len changed since"
            )
        if not 0 <= index < self.num_windows:
            raise ValueError(f"data state index = {index}: must be in [0, {self.num_windows})")
        self.epoch, self.index = epoch, index


def batches(
    spec: DataSpec,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    root: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TokenStream:
    """The TokenStream of spec's files (relative patterns under root), tokenized with tokenizer."""
    files = expand_files(spec.files, root)
    tokens = tokenize(files, tokenizer, spec.format, spec.field)
    need = seq_len * batch_size * world_size
    if spec.cycle and 0 < len(tokens) < need:
        tokens = np.tile(tokens, -(-need // len(tokens)))
    if len(tokens) < seq_len:
        raise DataError(
            f"data.files ({len(files)} files) hold {len(tokens)} tokens, "
            f"fewer than one window of train.seq_len = {seq_len} (data.cycle: true repeats them)"
        )
    return TokenStream(
        tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank, world_size=world_size
    )
