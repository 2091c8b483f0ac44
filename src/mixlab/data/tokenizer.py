"""Tokenizers behind one small interface.

Every tokenizer has ``vocab_size`` (ids are ``0 .. vocab_size-1``), ``eos_id`` (the document
separator in token shards), ``encode(text) -> list[int]`` (no special tokens added),
``decode(ids) -> str`` and ``identity() -> dict`` (what a shard manifest records: kind plus a
content hash of the file, so changing the tokenizer invalidates cached shards).

- ``byte``: UTF-8 bytes as ids 0..255, EOS = 256, vocab 257. Needs nothing.
- ``tokenizer.json`` (Hugging Face ``tokenizers``): EOS is the first of ``<|endoftext|>``, ``</s>``,
  ``<eos>``, ``<|eos|>``, ``<|end_of_text|>`` that the vocabulary holds.
- SentencePiece ``.model``: EOS is the model's ``eos_id()``.
- tiktoken ranks file (``*.tiktoken``, base64 token + rank per line, e.g. GPT-2's): the GPT-2 split
  pattern; EOS ``<|endoftext|>`` is appended after the last rank unless ``tiktoken`` knows it.
- a directory: the first of ``tokenizer.json``, ``tokenizer.model``, ``*.tiktoken`` inside it (what
  ``mixlab data tokenizer`` writes).

The optional libraries are imported only when used; a missing one fails with the pip command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "EOS_CANDIDATES",
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "load_tokenizer_from_dir",
    "save_tokenizer_to_dir",
    "train_bpe",
]

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
#: GPT-2's pre-tokenisation pattern (tiktoken's ``gpt2`` encoding).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
#: file written next to an exported model that names its tokenizer (see ``save_tokenizer_to_dir``)
TOKENIZER_SPEC_FILE = "mixlab_tokenizer.json"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def identity(self) -> dict[str, Any]: ...


def _need(module: str, extra: str = "tokenizers") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this tokenizer needs the '{module}' package: pip install {module} (or pip install 'mixlab[{extra}]')"
        ) from None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255 are the bytes, 256 is EOS; ``vocab_size = 257``."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """The ids as raw bytes (fast path for shard writing: one uint8 per token)."""
        return text.encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, path: str | Path) -> None:
        tk = _need("tokenizers")
        self.path = Path(path)
        self._tok = tk.Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        eos = next((vocab[c] for c in EOS_CANDIDATES if c in vocab), None)
        if eos is None:
            raise ValueError(
                f"tokenizer {str(self.path)!r} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); "
                "add one as a special token, or train one with `mixlab data tokenizer`"
            )
        self.eos_id = int(eos)
        self._hash = _file_hash(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return {"kind": "hf", "sha256_16": self._hash, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file."""

    def __init__(self, path: str | Path) -> None:
        spm = _need("sentencepiece")
        self.path = Path(path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(f"SentencePiece model {str(self.path)!r} defines no EOS piece (eos_id = -1)")
        self.eos_id = eos
        self._hash = _file_hash(self.path)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self._sp.encode(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def identity(self) -> dict[str, Any]:
        return {"kind": "sentencepiece", "sha256_16": self._hash, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer:
    """A tiktoken ranks file (base64 token, space, rank per line), split with GPT-2's pattern."""

    def __init__(self, path: str | Path, pattern: str = GPT2_PATTERN) -> None:
        tiktoken = _need("tiktoken")
        from tiktoken.load import load_tiktoken_bpe

        self.path = Path(path)
        ranks = load_tiktoken_bpe(str(self.path))
        n = max(ranks.values()) + 1
        self._enc = tiktoken.Encoding(
            name=f"mixlab-{self.path.stem}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens={EOS_CANDIDATES[0]: n},
        )
        self.eos_id = n
        self.vocab_size = n + 1
        self._hash = _file_hash(self.path)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "sha256_16": self._hash, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _find_in_dir(d: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            return d / name
    found = sorted(d.glob("*.tiktoken")) + sorted(d.glob("*.model"))
    if found:
        return found[0]
    raise FileNotFoundError(
        f"tokenizer directory {str(d)!r} holds no tokenizer.json, tokenizer.model or *.tiktoken file"
    )


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"byte"`` or a path (file or directory; see module doc)."""
    if str(spec) == "byte":
        return ByteTokenizer()
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"data.tokenizer={str(spec)!r}: no such file or directory; use 'byte', a tokenizer.json, a SentencePiece "
            ".model, a .tiktoken file, or a directory from `mixlab data tokenizer`"
        )
    if p.is_dir():
        p = _find_in_dir(p)
    if p.suffix == ".json":
        return HFTokenizer(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(p)
    return TiktokenTokenizer(p)


def save_tokenizer_to_dir(spec: str | Path, out_dir: str | Path) -> Path:
    """Make ``out_dir`` self-contained for :func:`load_tokenizer_from_dir`: copy the tokenizer file
    (if any) and write ``mixlab_tokenizer.json`` naming it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if str(spec) == "byte":
        entry: dict[str, Any] = {"kind": "byte"}
    else:
        p = Path(spec).expanduser()
        src = _find_in_dir(p) if p.is_dir() else p
        dst = out / {".json": "tokenizer.json", ".model": "tokenizer.model"}.get(src.suffix, src.name)
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        entry = {"kind": "file", "file": dst.name}
    (out / TOKENIZER_SPEC_FILE).write_text(json.dumps(entry) + "\n")
    return out / TOKENIZER_SPEC_FILE


def load_tokenizer_from_dir(path: str | Path) -> Tokenizer:
    """The tokenizer of an exported model or run directory (``mixlab_tokenizer.json``, written by
    :func:`save_tokenizer_to_dir`); falls back to a tokenizer file in it, then to ``byte``."""
    d = Path(path)
    spec_file = d / TOKENIZER_SPEC_FILE
    if spec_file.is_file():
        entry = json.loads(spec_file.read_text())
        if entry.get("kind") == "byte":
            return ByteTokenizer()
        return load_tokenizer(d / entry["file"])
    try:
        return load_tokenizer(_find_in_dir(d))
    except FileNotFoundError:
        return ByteTokenizer()


def train_bpe(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2, show_progress: bool = False
) -> HFTokenizer:
    """Train a byte-level BPE (``tokenizers``) on ``texts``; writes ``out_dir/tokenizer.json``.

    The vocabulary holds the 256 byte symbols, the merges, and ``<|endoftext|>`` (the EOS).
    """
    tk = _need("tokenizers")
    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least 258)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_CANDIDATES[0]],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return HFTokenizer(out / "tokenizer.json")


def _batches(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
