"""Text corpora as a deterministic stream of documents (strings).

Sources (``DataConfig.source``; a list mixes them, in order):

- ``"stdlib"``: the embedded default corpus, the Python standard library's own ``.py`` files
  (``sysconfig.get_paths()["stdlib"]``) without test directories and site-packages, sorted by
  relative path: about 15 MB of text on every machine, nothing to download. One file = one document.
- a text file, a directory (every non-hidden file under it, sorted) or a glob (``data/**/*.txt``).
- ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line, the document is its ``text_field``.
- ``*.parquet``: the ``text_field`` column (needs ``pyarrow``).
- a directory written by ``datasets.Dataset.save_to_disk`` (needs ``datasets``): its
  ``text_field`` column (the ``train`` split of a ``DatasetDict``).

``format`` (``auto``/``text``/``jsonl``/``parquet``/``hf``) forces the kind of every path.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SourceFile", "fingerprint", "iter_documents", "resolve_sources", "stdlib_files"]

_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class SourceFile:
    """One input: a file (``text``/``jsonl``/``parquet``) or a saved ``datasets`` directory (``hf``)."""

    path: Path
    kind: str
    name: str  # stable display / fingerprint name (relative path for stdlib files)


def stdlib_files() -> list[SourceFile]:
    """The embedded default corpus: the standard library's ``.py`` files, sorted, without tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {str(root)!r}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test_"):
                p = Path(dirpath) / fn
                files.append(SourceFile(p, "text", "stdlib/" + p.relative_to(root).as_posix()))
    files.sort(key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {str(root)!r}")
    return files


def _kind_of(path: Path, forced: str) -> str:
    if forced != "auto":
        return forced
    if path.is_dir():
        if any((path / m).is_file() for m in _HF_MARKERS):
            return "hf"
        return "dir"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve_sources(sources: list[str], format: str = "auto") -> list[SourceFile]:
    """Every input file of ``sources`` in a deterministic order (see module doc)."""
    out: list[SourceFile] = []
    for src in sources:
        if src == "stdlib":
            out.extend(stdlib_files())
            continue
        if any(ch in src for ch in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(src), recursive=True))
            paths = [Path(m) for m in matches if Path(m).is_file()]
            if not paths:
                raise FileNotFoundError(f"data.source glob {src!r} matches no file")
        else:
            p = Path(src).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"data.source {src!r}: no such file or directory (or use 'stdlib')")
            paths = [p]
        for p in paths:
            kind = _kind_of(p, format)
            if kind == "dir":
                for dirpath, dirnames, filenames in os.walk(p):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    for fn in sorted(filenames):
                        if not fn.startswith("."):
                            f = Path(dirpath) / fn
                            out.append(SourceFile(f, _kind_of(f, format), str(f)))
            else:
                out.append(SourceFile(p, kind, str(p)))
    return out


def fingerprint(files: list[SourceFile], text_field: str) -> str:
    """A hash of the inputs' names, kinds, sizes and modification times (and the text field)."""
    h = hashlib.sha256()
    h.update(f"field={text_field};py={sys.version_info[:2]}".encode())
    for f in files:
        paths = sorted(p for p in f.path.rglob("*") if p.is_file()) if f.path.is_dir() else [f.path]
        for p in paths:
            st = p.stat()
            h.update(f"{f.kind}|{f.name}|{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def iter_documents(files: list[SourceFile], text_field: str = "text") -> Iterator[str]:
    """The documents of ``files`` in order (empty documents skipped)."""
    for f in files:
        if f.kind == "text":
            yield from _text(f.path)
        elif f.kind == "jsonl":
            yield from _jsonl(f.path, text_field)
        elif f.kind == "parquet":
            yield from _parquet(f.path, text_field)
        elif f.kind == "hf":
            yield from _hf(f.path, text_field)
        else:
            raise ValueError(f"unknown source kind {f.kind!r} for {str(f.path)!r}")


def _text(path: Path) -> Iterator[str]:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return  # a binary file inside a text directory: skipped
    text = data.decode("utf-8", errors="replace")
    if text:
        yield text


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path!s}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path!s}:{lineno}: no field {field!r} (has {keys}); set data.text_field")
            text = row[field]
            if text:
                yield str(text)


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("Parquet sources need pyarrow: pip install pyarrow (or 'mixlab[data]')") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path!s}: no column {field!r} (has {names}); set data.text_field")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield str(text)


def _hf(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("saved `datasets` directories need the datasets package: pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path!s}: a DatasetDict without a 'train' split (has {sorted(ds)})")
        ds = ds["train"]
    if field not in ds.column_names:
        raise ValueError(f"{path!s}: no column {field!r} (has {ds.column_names}); set data.text_field")
    for batch in ds.iter(batch_size=1024):
        for text in batch[field]:
            if text:
                yield str(text)
