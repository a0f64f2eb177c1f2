"""offload.train.data and offload.train.tokenizer: files to tokens to deterministic, resumable batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from offload.config import ConfigError, from_dict
from offload.train.data import DataError, DataSpec, TokenStream, batches, expand_files, tokenize
from offload.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

EOS = ByteTokenizer.eos_id


# --------------------------------------------------------------------------------------------------
# Tokenizers


@pytest.mark.parametrize("text", ["", "hello world", "tiers: gpu → host → nvme", "naïve 🙂\n\ttabs"])
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_ids() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"
    assert tok.decode([0xE2, 0x86]) == "\ufffd"  # a cut multi-byte character does not raise


def _save_word_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "memory", "tiers", "move", "data"]
    raw = RawTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(directory)


def test_load_tokenizer_from_a_model_directory(tmp_path: Path) -> None:
    _save_word_tokenizer(tmp_path)
    tok = load_tokenizer("auto", tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 6
    assert tok.eos_id == 1
    ids = tok.encode("memory tiers move data")
    assert ids == [2, 3, 4, 5]
    assert tok.decode(ids) == "memory tiers move data"
    assert tok.encode("memory </s> disks") == [2, 1, 0]


def test_load_tokenizer_falls_back_to_bytes(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer("auto", None), ByteTokenizer)
    assert isinstance(load_tokenizer("auto", tmp_path), ByteTokenizer)  # no tokenizer files there
    assert isinstance(load_tokenizer("auto", tmp_path / "missing"), ByteTokenizer)
    _save_word_tokenizer(tmp_path)
    assert isinstance(load_tokenizer("bytes", tmp_path), ByteTokenizer)


def test_load_tokenizer_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match=r"data\.tokenizer = 'sentencepiece': expected 'auto' or 'bytes'"):
        load_tokenizer("sentencepiece")


# --------------------------------------------------------------------------------------------------
# Files and documents


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_expand_files_globs_relative_to_root(tmp_path: Path) -> None:
    b = _write(tmp_path / "corpus" / "b.txt", "b")
    a = _write(tmp_path / "corpus" / "a.txt", "a")
    c = _write(tmp_path / "corpus" / "deep" / "c.txt", "c")
    _write(tmp_path / "corpus" / "notes.md", "n")
    assert expand_files(["corpus/*.txt"], tmp_path) == [a, b]
    assert expand_files(["corpus/**/*.txt"], tmp_path) == [a, b, c]
    assert expand_files(["corpus/b.txt", "corpus/*.txt"], tmp_path) == [b, a]  # each file once
    assert expand_files([str(c)], "/nonexistent") == [c]  # absolute paths ignore root


@pytest.mark.parametrize("pattern", ["corpus/*.json", "corpus/missing.txt", "nowhere/**/*.txt"])
def test_files_matching_nothing(tmp_path: Path, pattern: str) -> None:
    _write(tmp_path / "corpus" / "a.txt", "a")
    with pytest.raises(DataError) as e:
        expand_files(["corpus/a.txt", pattern], tmp_path)
    assert str(e.value) == f"data.files: {pattern!r} matches no files (looked for {tmp_path / pattern})"


def test_text_documents_are_separated_by_eos(tmp_path: Path) -> None:
    files = [_write(tmp_path / "1.txt", "ab"), _write(tmp_path / "2.txt", "c")]
    tokens = tokenize(files, ByteTokenizer(), "text")
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [97, 98, EOS, 99, EOS]


def test_jsonl_documents(tmp_path: Path) -> None:
    lines = [json.dumps({"body": "hi", "id": 1}), "", json.dumps({"body": "yo"})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert tokenize([path], ByteTokenizer(), "jsonl", "body").tolist() == [104, 105, EOS, 121, 111, EOS]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "d.jsonl:2: not a JSON object"),
        (json.dumps({"title": "x"}), "d.jsonl:2: no 'text' key (data.field) in this record"),
        (json.dumps(["text"]), "d.jsonl:2: no 'text' key (data.field) in this record"),
        (json.dumps({"text": 3}), "d.jsonl:2: 'text' holds int, not text"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "d.jsonl", json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        tokenize([path], ByteTokenizer(), "jsonl")
    assert str(e.value).startswith(f"{tmp_path}/{message}"), str(e.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"files": []}, "data.files = []: name at least one file or glob pattern"),
        ({"files": "a.txt"}, "data.files = 'a.txt': expected list[str], got str"),
        ({"files": ["a", " "]}, "data.files[1] = ' ': must not be empty"),
        ({"files": ["a"], "format": "csv"}, "data.format = 'csv': expected one of 'text', 'jsonl'"),
        ({"files": ["a"], "tokenizer": "bpe"}, "data.tokenizer = 'bpe': expected one of 'auto', 'bytes'"),
        ({"files": ["a"], "field": ""}, "data.field = '': must name a JSON key"),
        ({}, "data.files = None: missing required field"),
    ],
)
def test_data_spec_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(DataSpec, data, "data")
    assert str(e.value) == message


# --------------------------------------------------------------------------------------------------
# Batches


def _stream(n_tokens: int = 1000, **kw: int) -> TokenStream:
    tokens = np.arange(n_tokens, dtype=np.int32)
    args = {"batch_size": 4, "seq_len": 10, "seed": 0, **kw}
    return TokenStream(tokens, **args)


def _take(stream: TokenStream, n: int) -> list[torch.Tensor]:
    return [next(stream)["input_ids"] for _ in range(n)]


def test_batch_shape_and_labels() -> None:
    batch = next(_stream())
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (4, 10) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    for row in batch["input_ids"]:  # every row is one contiguous, aligned window
        assert row[0] % 10 == 0 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))


def test_batches_are_deterministic() -> None:
    first, second = _take(_stream(), 60), _take(_stream(), 60)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = _take(_stream(seed=1), 60)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_each_epoch_visits_every_window_once() -> None:
    stream = _stream(n_tokens=1005, batch_size=1)
    assert stream.num_windows == 100
    epochs = [sorted(int(b[0, 0]) // 10 for b in _take(stream, 100)) for _ in range(3)]
    assert all(e == list(range(100)) for e in epochs)
    assert stream.state_dict() == {"epoch": 3, "index": 0, "num_windows": 100}


def test_epochs_are_shuffled_differently() -> None:
    stream = _stream(batch_size=100)
    first, second = next(stream)["input_ids"][:, 0], next(stream)["input_ids"][:, 0]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("k", [0, 1, 7, 24, 25, 26, 61])
def test_resume_continues_with_the_next_batch(k: int) -> None:
    stream = _stream(batch_size=3)  # 100 windows: batches straddle epoch boundaries
    _take(stream, k)
    state = json.loads(json.dumps(stream.state_dict()))
    assert all(type(v) is int for v in state.values())
    expected = _take(stream, 5)

    resumed = _stream(batch_size=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(_take(resumed, 5), expected, strict=True))


def test_batch_larger_than_the_data_wraps_into_the_next_epoch() -> None:
    stream = _stream(n_tokens=30, batch_size=5)
    rows = next(stream)["input_ids"][:, 0].tolist()
    assert sorted(rows[:3]) == [0, 10, 20]  # all of epoch 0, then two windows of epoch 1
    assert len(set(rows[3:])) == 2 and set(rows[3:]) <= {0, 10, 20}
    assert stream.state_dict() == {"epoch": 1, "index": 2, "num_windows": 3}


def test_ranks_split_each_global_batch() -> None:
    whole = _take(_stream(batch_size=6), 4)
    parts = [_take(_stream(batch_size=2, rank=r, world_size=3), 4) for r in range(3)]
    for step in range(4):
        assert torch.equal(torch.cat([p[step] for p in parts]), whole[step])


def test_load_state_dict_errors() -> None:
    stream = _stream()
    with pytest.raises(ValueError, match=r"saved over 50 windows, this data has 100"):
        stream.load_state_dict({"epoch": 0, "index": 0, "num_windows": 50})
    with pytest.raises(ValueError, match=r"index = 100: must be in \[0, 100\)"):
        stream.load_state_dict({"epoch": 0, "index": 100})
    with pytest.raises(ValueError, match=r"needs non-negative int 'epoch' and 'index'"):
        stream.load_state_dict({"epoch": "1", "index": 0})


def test_too_few_tokens_for_one_window() -> None:
    with pytest.raises(DataError, match=r"^the data holds 9 tokens, fewer than one window of seq_len = 10$"):
        _stream(n_tokens=9)


def test_stream_argument_errors() -> None:
    with pytest.raises(ValueError, match="both must be >= 1"):
        _stream(batch_size=0)
    with pytest.raises(ValueError, match=r"rank = 2: must be in \[0, world_size = 2\)"):
        _stream(rank=2, world_size=2)


def test_batches_from_files(tmp_path: Path) -> None:
    _write(tmp_path / "corpus" / "a.txt", "x" * 100)
    _write(tmp_path / "corpus" / "b.txt", "y" * 57)
    spec = DataSpec(files=["corpus/*.txt"], tokenizer="bytes")
    stream = batches(spec, ByteTokenizer(), batch_size=2, seq_len=16, seed=3, root=tmp_path)
    assert stream.num_windows == (101 + 58) // 16
    ids = next(stream)["input_ids"]
    assert ids.shape == (2, 16) and int(ids.max()) < 259


def test_batches_with_too_few_tokens(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "short")
    _write(tmp_path / "b.txt", "text")
    spec = DataSpec(files=["*.txt"])
    with pytest.raises(DataError) as e:
        batches(spec, ByteTokenizer(), batch_size=1, seq_len=128, root=tmp_path)
    assert str(e.value) == (
        "data.files (2 files) hold 11 tokens, fewer than one window of train.seq_len = 128 "
        "(data.cycle: true repeats them)"
    )


def test_cycle_fills_a_window_longer_than_the_corpus(tmp_path: Path) -> None:
    """A long-context recipe over a small corpus: the corpus, end to start, fills one batch."""
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("tiers")
    spec = DataSpec(files=["*.txt"], cycle=True)
    stream = batches(spec, ByteTokenizer(), batch_size=2, seq_len=16, root=tmp_path)
    corpus = [*b"hello", EOS, *b"tiers", EOS]
    assert stream.num_windows == 2  # 36 tokens: three passes over the 12 of the corpus
    b = next(stream)
    got = sorted(b["input_ids"].tolist())
    assert got == sorted([(corpus * 3)[:16], (corpus * 3)[16:32]])
    assert torch.equal(b["labels"], b["input_ids"])
    # A corpus long enough already is left as it is.
    long = batches(spec, ByteTokenizer(), batch_size=1, seq_len=4, root=tmp_path)
    assert long.num_windows == 3


def test_cycle_is_a_checked_boolean() -> None:
    with pytest.raises(ConfigError, match="cycle = 'yes': expected bool"):
        from_dict(DataSpec, {"files": ["x"], "cycle": "yes"})


def test_batches_with_files_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.files: '\*\.txt' matches no files"):
        batches(DataSpec(files=["*.txt"]), ByteTokenizer(), batch_size=1, seq_len=8, root=tmp_path)
