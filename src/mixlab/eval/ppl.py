"""Perplexity and bits per byte on held-out text, and a length-extrapolation curve.

Documents are scored one by one as the training stream shows them: ``[EOS] doc [EOS]`` (EOS is the
document separator in token shards), every token after the leading EOS predicted, the closing EOS
included. Two ways to score a document longer than the model's context:

- ``mode="window"`` (the default): disjoint windows of ``context`` tokens (default: the training
  sequence length), or overlapping ones with ``stride < context`` where each token is scored once
  with up to ``context`` tokens of left context (the sliding-window method). Every architecture
  sees exactly what it saw in training, so the figure is comparable across attention and
  recurrent models and with the training loss; lm-evaluation-harness's rolling log-likelihood
  scores the same way.
- ``mode="state"``: the whole document through the decode cache in chunks of ``chunk`` tokens,
  carrying the recurrent state (or the KV cache) across chunks: exact full-context scoring at any
  length. For recurrent models this measures how well the state carries beyond the training
  length; for attention it extrapolates RoPE beyond the trained positions.

``ppl = exp(total NLL / tokens)``; ``bits_per_byte = total NLL / ln 2 / UTF-8 bytes`` of the
scored text, which compares models with different tokenizers. The length curve
(:func:`length_curve`) runs held-out sequences of ``factor`` × the training length in one forward
pass and reports the mean loss per position bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODES",
    "documents_from_stream",
    "heldout_documents",
    "length_curve",
    "perplexity",
    "token_nll",
]

MODES = ("window", "state")
_LN2 = math.log(2.0)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """Per-token negative log-likelihood ``[B, T]`` (nats; float32, float64 for float64 models) of ``targets`` given ``inputs``
    (both ``[B, T]``), continuing ``cache`` when given. The LM head runs in chunks of positions
    when the model exposes ``forward_hidden`` (no full ``[B, T, V]`` logits in memory)."""
    if hasattr(model, "forward_hidden") and hasattr(model, "lm_head"):
        hidden = model.forward_hidden(inputs, cache) if cache is not None else model.forward_hidden(inputs)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        step = max(1, (1 << 24) // max(1, hidden.shape[0] * model.lm_head.weight.shape[0]))
        for s in range(0, hidden.shape[1], step):
            logits = model.lm_head(hidden[:, s : s + step]).to(acc)
            out[:, s : s + step] = F.cross_entropy(logits.transpose(1, 2), targets[:, s : s + step], reduction="none")
        return out
    logits = model(inputs, cache=cache) if cache is not None else model(inputs)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def _windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first_scored)`` input windows over targets ``1..n_targets`` of a sequence
    ``s[0..n_targets]``: inputs ``s[start:end]`` predict ``s[start+1:end+1]``, of which positions
    ``>= first_scored`` (input index, absolute) are new."""
    out, done, start = [], 0, 0
    while done < n_targets:
        end = min(start + context, n_targets)
        out.append((start, end, done))
        done = end
        if end == n_targets:
            break
        start = max(start + stride, end - context) if stride < context else end
    return out


def _doc_bytes(tokenizer: Any, ids: Sequence[int]) -> int:
    from mixlab.data.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return sum(1 for i in ids if 0 <= int(i) < 256)
    return len(tokenizer.decode([int(i) for i in ids]).encode("utf-8"))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    documents: Sequence[Sequence[int]],
    eos_id: int,
    *,
    tokenizer: Any = None,
    num_bytes: int | None = None,
    mode: str = "window",
    context: int = 2048,
    stride: int | None = None,
    chunk: int = 1024,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity of ``documents`` (token id lists, without separators) under ``model``.

    ``mode``: ``window`` (``context`` tokens per window, ``stride`` default ``context``: disjoint)
    or ``state`` (carried decode cache, ``chunk`` tokens per forward); see the module doc.
    ``num_bytes`` (or ``tokenizer``, to count them) gives bits per byte.

    Returns ``{"ppl", "loss", "bits_per_byte", "nll", "tokens", "bytes", "documents", "mode",
    "context", "stride", "chunk"}`` (``bits_per_byte``/``bytes`` None without a byte count)."""
    if mode not in MODES:
        raise ValueError(f"perplexity: mode={mode!r}; allowed: {', '.join(MODES)}")
    if context < 1 or chunk < 1:
        raise ValueError("perplexity: context and chunk must be positive")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"perplexity: stride={stride} must be in [1, context={context}]")
    docs = [list(map(int, d)) for d in documents if len(d) > 0]
    if not docs:
        raise ValueError("perplexity: no non-empty document to score")
    was_training = model.training
    model.eval()
    device = _device(model)
    nll, count = 0.0, 0
    try:
        if mode == "state":
            for d in docs:
                s = torch.tensor([eos_id, *d, eos_id], device=device)[None]
                cache = model.init_cache(1, s.shape[1])
                for a in range(0, s.shape[1] - 1, chunk):
                    b = min(a + chunk, s.shape[1] - 1)
                    nll += float(token_nll(model, s[:, a:b], s[:, a + 1 : b + 1], cache).sum())
                count += s.shape[1] - 1
        else:
            # (inputs, targets, scored mask) rows grouped by length, then batched
            groups: dict[int, list[tuple[list[int], list[int], int]]] = {}
            for d in docs:
                s = [eos_id, *d, eos_id]
                for start, end, first in _windows(len(s) - 1, context, stride):
                    groups.setdefault(end - start, []).append((s[start:end], s[start + 1 : end + 1], first - start))
                count += len(s) - 1
            for _length, rows in sorted(groups.items()):
                for i in range(0, len(rows), batch_size):
                    part = rows[i : i + batch_size]
                    x = torch.tensor([r[0] for r in part], device=device)
                    y = torch.tensor([r[1] for r in part], device=device)
                    per = token_nll(model, x, y)
                    keep = (
                        torch.arange(x.shape[1], device=device)[None, :]
                        >= torch.tensor([r[2] for r in part], device=device)[:, None]
                    )
                    nll += float((per * keep).sum())
    finally:
        model.train(was_training)
    if num_bytes is None and tokenizer is not None:
        num_bytes = sum(_doc_bytes(tokenizer, d) for d in docs)
    loss = nll / count
    return {
        "ppl": math.exp(min(loss, 700.0)),
        "loss": loss,
        "bits_per_byte": nll / _LN2 / num_bytes if num_bytes else None,
        "nll": nll,
        "tokens": count,
        "bytes": num_bytes,
        "documents": len(docs),
        "mode": mode,
        "context": context if mode == "window" else None,
        "stride": stride if mode == "window" else None,
        "chunk": chunk if mode == "state" else None,
    }


@torch.no_grad()
def length_curve(
    model: nn.Module,
    stream: Sequence[int] | np.ndarray,
    train_len: int,
    *,
    factor: int = 4,
    bucket: int | None = None,
    max_sequences: int = 16,
    batch_size: int = 1,
) -> dict[str, Any]:
    """Mean loss by position over held-out sequences of ``factor * train_len`` tokens.

    ``stream``: held-out tokens (documents joined by EOS, as in the shards), cut into up to
    ``max_sequences`` disjoint sequences of ``factor * train_len + 1`` tokens, each run in ONE
    forward pass (positions beyond ``train_len`` are the extrapolation). ``bucket``: positions per
    bucket (default ``train_len // 4``). Returns ``{"train_len", "length", "sequences", "buckets":
    [{"start", "end", "loss"}], "loss_within", "loss_beyond"}`` (mean loss at positions below /
    at or beyond ``train_len``)."""
    length = factor * train_len
    arr = np.asarray(stream, dtype=np.int64)
    n = min(max_sequences, (len(arr) - 1) // length)
    if n < 1:
        raise ValueError(
            f"length_curve: {len(arr)} held-out tokens are fewer than one sequence of {length + 1} "
            f"({factor} x train length {train_len} + 1); hold out more text or lower the factor"
        )
    bucket = bucket or max(1, train_len // 4)
    was_training = model.training
    model.eval()
    device = _device(model)
    total = torch.zeros(length, dtype=torch.float64)
    try:
        for i in range(0, n, batch_size):
            rows = [arr[j * length : j * length + length + 1] for j in range(i, min(n, i + batch_size))]
            t = torch.from_numpy(np.stack(rows)).to(device)
            total += token_nll(model, t[:, :-1], t[:, 1:]).double().sum(0).cpu()
    finally:
        model.train(was_training)
    mean = total / n
    buckets = [
        {"start": s, "end": min(s + bucket, length), "loss": float(mean[s : s + bucket].mean())}
        for s in range(0, length, bucket)
    ]
    return {
        "train_len": train_len,
        "length": length,
        "sequences": n,
        "buckets": buckets,
        "loss_within": float(mean[:train_len].mean()),
        "loss_beyond": float(mean[train_len:].mean()) if length > train_len else None,
    }


def documents_from_stream(stream: Sequence[int] | np.ndarray, eos_id: int) -> list[list[int]]:
    """Split a token stream at EOS into documents (EOS dropped, empty ones skipped)."""
    arr = np.asarray(stream, dtype=np.int64)
    cuts = np.flatnonzero(arr == eos_id)
    out, start = [], 0
    for c in [*cuts.tolist(), len(arr)]:
        if c > start:
            out.append(arr[start:c].tolist())
        start = c + 1
    return out


def heldout_documents(
    source: str | Path | dict[str, Any],
    tokenizer: Any,
    max_tokens: int = 200_000,
) -> tuple[list[list[int]], np.ndarray]:
    """Held-out documents and the held-out token stream (both cut to about ``max_tokens``).

    ``source``: a run directory (its ``config.yaml`` names the data: the run's own held-out split,
    tokenised with the run's tokenizer and cached as shards), a ``data`` config mapping (the keys
    of ``mixlab.config.DataConfig``), or a path / glob of text, JSONL or Parquet files whose
    documents are all held out."""
    import yaml

    from mixlab.config import DataConfig
    from mixlab.data.corpus import iter_documents, resolve_sources
    from mixlab.data.shards import prepare_shards

    eos = int(tokenizer.eos_id)
    data: dict[str, Any] | None = None
    if isinstance(source, dict):
        data = dict(source)
    else:
        p = Path(source)
        if p.is_dir() and (p / "config.yaml").is_file():
            data = (yaml.safe_load((p / "config.yaml").read_text()) or {}).get("data") or {}
    if data is not None:
        from mixlab.configio import config_from_dict

        dc = config_from_dict({"data": data}).data
        if dc.val_fraction <= 0 and dc.val_min_tokens <= 0:
            raise ValueError("the run holds no text out (data.val_fraction=0); pass held-out text files instead")
        shards = prepare_shards(dc, tokenizer=tokenizer, log=lambda _m: None)
        if not shards.val:
            raise ValueError(f"the held-out split of {dc.sources} is empty; pass held-out text files instead")
        stream = np.concatenate([np.asarray(a, dtype=np.int64) for a in shards.val])[:max_tokens]
        return documents_from_stream(stream, eos), stream
    files = resolve_sources([str(source)], DataConfig().format)
    docs: list[list[int]] = []
    total = 0
    for text in iter_documents(files):
        ids = tokenizer.encode(text)
        if not ids:
            continue
        docs.append(ids)
        total += len(ids) + 1
        if total >= max_tokens:
            break
    if not docs:
        raise ValueError(f"{source}: no text found to evaluate on")
    stream = np.array([t for d in docs for t in (*d, eos)], dtype=np.int64)
    return docs, stream
