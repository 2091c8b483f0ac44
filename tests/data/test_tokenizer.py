"""Tokenizers: round trips, EOS handling, files the user names, locally trained BPE."""

from __future__ import annotations

import base64
import random

import pytest

from mixlab.data.tokenizer import (
    ByteTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    load_tokenizer_from_dir,
    save_tokenizer_to_dir,
    train_bpe,
)

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "unicode: naïve café — 東京 🚀",
    "",
    "tabs\tand\r\nnewlines\n\n",
]


def _corpus(n: int = 300) -> list[str]:
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "class", "value", "x", "y", "(", ")", ":", "\n    ", " = ", "+"]
    return ["".join(rng.choice(words) + " " for _ in range(40)) for _ in range(n)]


def test_byte_tokenizer_round_trip_and_eos() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    assert tok.decode([104, 105, tok.eos_id, 33]) == "hi!"  # EOS is not text
    assert load_tokenizer("byte").identity() == tok.identity()


def test_trained_bpe_round_trips_and_compresses(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    docs = _corpus()
    tok = train_bpe(docs, vocab_size=300, out_dir=tmp_path / "tok")
    assert tok.vocab_size == 300
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    for s in [*SAMPLES, docs[0]]:
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(docs[0])) < len(docs[0].encode()) / 2  # the merges were learned
    # loading by directory and by file gives the same tokenizer
    for spec in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        again = load_tokenizer(spec)
        assert again.identity() == tok.identity()
        assert again.encode(docs[1]) == tok.encode(docs[1])


def test_sentencepiece_model_file(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(_corpus(200)))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.vocab_size == 300 and tok.eos_id >= 0
    s = "def return self value"
    assert tok.decode(tok.encode(s)) == s


def _tiktoken_file(path) -> None:
    ranks = [bytes([i]) for i in range(256)] + [b"de", b"def", b"re", b"ret"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_tiktoken_ranks_file(tmp_path) -> None:
    pytest.importorskip("tiktoken")
    f = tmp_path / "tiny.tiktoken"
    _tiktoken_file(f)
    tok = load_tokenizer(f)
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (261, 260)
    assert tok.encode("def") == [257]  # the merge, not three bytes
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_missing_tokenizer_file_says_what_is_accepted(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"use 'byte', a tokenizer.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_tokenizer_travels_with_an_exported_dir(tmp_path) -> None:
    save_tokenizer_to_dir("byte", tmp_path / "a")
    assert isinstance(load_tokenizer_from_dir(tmp_path / "a"), ByteTokenizer)
    pytest.importorskip("tokenizers")
    tok = train_bpe(_corpus(50), vocab_size=280, out_dir=tmp_path / "tok")
    save_tokenizer_to_dir(tmp_path / "tok", tmp_path / "b")
    again = load_tokenizer_from_dir(tmp_path / "b")
    assert again.identity() == tok.identity()
