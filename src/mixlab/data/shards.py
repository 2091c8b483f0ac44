"""Token shards: text tokenised once into memory-mapped ``.bin`` files plus a manifest, then reused.

Layout of a shard directory (``<cache>/shards/<label>-<key>/``)::

    manifest.json          # written last: tokenizer identity, dtype, counts, source fingerprint, split
    train_000.bin ...      # raw uint16 (vocab <= 65536) or uint32 tokens, at most data.shard_tokens each
    val_000.bin ...

Every document is followed by the tokenizer's EOS, so documents are separated by EOS inside a shard.
The directory name holds a hash (``key``) of everything the tokens depend on (source fingerprint,
tokenizer identity, split settings, format version): a matching, complete directory is reused; a
change makes a new one. Directories are built under a temporary name and renamed when complete.

Held-out split: whole documents, picked in a fixed pseudo-random order (by a CRC of their index)
until ``max(val_fraction * tokens, val_min_tokens)`` tokens are held out. When that would take more
than half of the corpus (a corpus of one or a few documents), the tail of the token stream is held
out instead.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.config import DataConfig
from mixlab.data.corpus import fingerprint, iter_documents, resolve_sources
from mixlab.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["FORMAT_VERSION", "TokenShards", "default_cache_dir", "open_shards", "prepare_shards"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class TokenShards:
    """Memory-mapped token shards of one prepared corpus (1-D arrays of token ids)."""

    dir: Path
    manifest: dict[str, Any] = field(repr=False)
    train: list[np.ndarray] = field(repr=False)
    val: list[np.ndarray] = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def train_tokens(self) -> int:
        return int(self.manifest["train"]["tokens"])

    @property
    def val_tokens(self) -> int:
        return int(self.manifest["val"]["tokens"])


def default_cache_dir() -> Path:
    """``$MIXLAB_CACHE`` or ``~/.cache/mixlab``."""
    env = os.environ.get("MIXLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixlab"


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _label(sources: list[str], tok_identity: dict[str, Any]) -> str:
    first = sources[0] if sources[0] == "stdlib" else Path(sources[0].rstrip("/*")).name or "data"
    label = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in first)[:40]
    return f"{label}{'+' if len(sources) > 1 else ''}-{tok_identity['kind']}"


def prepare_shards(
    data: DataConfig,
    tokenizer: Tokenizer | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> TokenShards:
    """Tokenise ``data.source`` into shards (or reuse matching ones) and open them."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(data.tokenizer)
    files = resolve_sources(data.sources, data.format)
    fp = fingerprint(files, data.text_field)
    ident = tok.identity()
    key_src = {
        "version": FORMAT_VERSION,
        "sources": data.sources,
        "format": data.format,
        "fingerprint": fp,
        "tokenizer": ident,
        "val_fraction": data.val_fraction,
        "val_min_tokens": data.val_min_tokens,
        "shard_tokens": data.shard_tokens,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir or data.cache_dir or default_cache_dir()).expanduser() / "shards"
    out = root / f"{_label(data.sources, ident)}-{key}"
    if out.is_dir():
        try:
            shards = open_shards(out)
            if shards.manifest.get("key") == key:
                return shards
        except (OSError, ValueError, KeyError) as e:
            log(f"shard cache {out} is unusable ({e}); rebuilding it")
        shutil.rmtree(out, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
    try:
        log(f"tokenising {len(files)} file(s) from {', '.join(data.sources)} with {tok!r} into {out}")
        manifest = _build(files, data, tok, tmp, fp)
        manifest.update({"key": key, "key_source": key_src, "created": _now()})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same shards first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shards = open_shards(out)
    log(
        f"shards ready: {shards.train_tokens:,} train + {shards.val_tokens:,} val tokens "
        f"({shards.manifest['train']['documents']:,} + {shards.manifest['val']['documents']:,} documents)"
    )
    return shards


def open_shards(path: str | Path) -> TokenShards:
    """Open a prepared shard directory (checks the manifest against the files' sizes)."""
    d = Path(path)
    manifest = json.loads((d / MANIFEST).read_text())
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"shard format version {manifest.get('version')} != {FORMAT_VERSION}")
    dtype = np.dtype(manifest["dtype"])
    arrays: dict[str, list[np.ndarray]] = {}
    for split in ("train", "val"):
        arrays[split] = []
        for entry in manifest[split]["files"]:
            f = d / entry["name"]
            if f.stat().st_size != entry["tokens"] * dtype.itemsize:
                raise ValueError(f"{f} has {f.stat().st_size} bytes, the manifest says {entry['tokens']} tokens")
            if entry["tokens"]:
                arrays[split].append(np.memmap(f, dtype=dtype, mode="r"))
    return TokenShards(d, manifest, arrays["train"], arrays["val"])


# ------------------------------------------------------------------ building


def _encode_docs(docs: Iterator[str], tok: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays of documents, each followed by EOS."""
    eos = np.array([tok.eos_id], dtype=dtype)
    if isinstance(tok, ByteTokenizer):
        for d in docs:
            yield np.concatenate([np.frombuffer(tok.encode_bytes(d), dtype=np.uint8).astype(dtype), eos])
        return
    batch_fn = getattr(tok, "encode_batch", None)
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        encoded = batch_fn(batch) if batch_fn is not None else [tok.encode(t) for t in batch]
        for ids in encoded:
            yield np.concatenate([np.asarray(ids, dtype=dtype), eos])

    for d in docs:
        batch.append(d)
        if len(batch) == 256:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


class _ShardWriter:
    def __init__(self, dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.dir, self.split, self.dtype, self.shard_tokens = dir, split, dtype, shard_tokens
        self.files: list[dict[str, Any]] = []
        self.fh = None
        self.in_shard = 0
        self.tokens = 0
        self.documents = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.files):03d}.bin"
        self.fh = open(self.dir / name, "wb")  # noqa: SIM115 - closed in _close
        self.files.append({"name": name, "tokens": 0})
        self.in_shard = 0

    def write(self, arr: np.ndarray) -> None:
        self.documents += 1
        while arr.size:
            if self.fh is None or self.in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(arr.size, self.shard_tokens - self.in_shard)
            self.fh.write(arr[:take].tobytes())
            self.in_shard += take
            self.files[-1]["tokens"] += take
            self.tokens += take
            arr = arr[take:]

    def _close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def finish(self) -> dict[str, Any]:
        self._close()
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents}


def _build(files: list, data: DataConfig, tok: Tokenizer, out: Path, fp: str) -> dict[str, Any]:
    dtype = _dtype_for(tok.vocab_size)
    # pass 1: every document into one stream, remembering where documents start
    stream_path = out / "all.tmp"
    lengths: list[int] = []
    with open(stream_path, "wb") as fh:
        for arr in _encode_docs(iter_documents(files, data.text_field), tok, dtype):
            fh.write(arr.tobytes())
            lengths.append(arr.size)
    total = int(sum(lengths))
    if total == 0:
        raise ValueError(f"data.source {data.sources} holds no text")
    stream = np.memmap(stream_path, dtype=dtype, mode="r")
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # choose the held-out documents
    target = 0 if data.val_fraction == 0 else max(math.ceil(data.val_fraction * total), data.val_min_tokens)
    order = sorted(range(len(lengths)), key=lambda i: (zlib.crc32(i.to_bytes(8, "little")), i))
    val_docs: set[int] = set()
    got = 0
    for i in order:
        if got >= target:
            break
        val_docs.add(i)
        got += lengths[i]
    method = "documents"
    if target and got > total // 2:
        method, val_docs = "tail", set()
    train_w = _ShardWriter(out, "train", dtype, data.shard_tokens)
    val_w = _ShardWriter(out, "val", dtype, data.shard_tokens)
    if method == "documents":
        for i in range(len(lengths)):
            (val_w if i in val_docs else train_w).write(np.asarray(stream[starts[i] : starts[i + 1]]))
    else:
        n_val = min(target, total // 2)
        train_w.write(np.asarray(stream[: total - n_val]))
        val_w.write(np.asarray(stream[total - n_val :]))
    del stream
    stream_path.unlink()
    return {
        "version": FORMAT_VERSION,
        "dtype": dtype.name,
        "tokenizer": tok.identity(),
        "source": {
            "sources": data.sources,
            "format": data.format,
            "text_field": data.text_field,
            "fingerprint": fp,
            "files": len(files),
        },
        "split": {"method": method, "val_fraction": data.val_fraction, "val_min_tokens": data.val_min_tokens},
        "train": train_w.finish(),
        "val": val_w.finish(),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
