"""Synthetic recall tasks: MQAR (Zoology) and selective copying (Mamba), as pure batch functions.

Every batch is a pure function of ``(seed, step, rank, world_size)`` like the text loader's: step
``s`` draws the GLOBAL batch from a generator seeded by ``(seed, stream, s)`` and rank ``r`` of
``W`` keeps rows ``r, r+W, ...``, so the data do not depend on the world size and resuming needs
only the step. The held-out set is a different stream of the same generator (never a training
batch).

A batch is a :class:`LabeledBatch`: ``inputs [B, T]`` token ids and ``labels [B, T]`` with the
target of position ``t`` at ``labels[:, t]`` (already shifted: the model's logits at ``t`` are
scored against it) and ``-100`` wherever nothing is scored.

**MQAR** (Arora, Eyuboglu et al., "Zoology", 2023), exactly as its reference generator: keys
from ``[1, V/2)`` and values from ``[V/2, V)``, each drawn without replacement; the context
``k1 v1 k2 v2 ... kn vn`` fills the first ``2n`` positions; each key is then queried once in the
rest of the sequence, at slot ``g`` (position ``2n + 2g``) of ``(T - 2n) / 2`` slots, the slots
drawn without replacement with ``p(g) ∝ (g + 1)^(a - 1)`` (``a = 0.01``: a power law, short
gaps favoured); the label at a query position is that key's value; every other position holds
a uniform random token from ``[0, V)`` (``random_non_queries``) or 0.

**Selective copying** (Gu & Dao, "Mamba", 2023): ``n`` data tokens from ``[1, V - 1)`` scattered
in order at random positions of a context of ``T - n`` blanks (token 0), followed by ``n`` copy
markers (token ``V - 1``); the label at the ``i``-th marker is the ``i``-th data token.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "LabeledBatch",
    "SyntheticLoader",
    "mqar_batch",
    "mqar_gap_probs",
    "selective_copying_batch",
    "synthetic_batch",
]

IGNORE_INDEX = -100
TASKS = ("mqar", "selective_copying")
_TRAIN_STREAM, _EVAL_STREAM, _EPOCH_STREAM = 0, 1, 2
_POOL_CHUNK = 4096  # sequences generated at a time for a fixed training set
_POOL_CACHE: dict[str, Any] = {}  # the last fixed training set made in this process


class LabeledBatch:
    """``inputs [B, T]`` int64 token ids, ``labels [B, T]`` int64 targets (``-100`` = not scored).

    Behaves like the text loader's ``[B, T + 1]`` token tensor where the training loop needs it:
    ``batch[a:b]`` is a micro-batch of rows, ``.to(device)`` moves both, ``.shape`` is the inputs'."""

    __slots__ = ("inputs", "labels")

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        if inputs.shape != labels.shape or inputs.dim() != 2:
            raise ValueError(
                f"LabeledBatch: inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must be [B, T]"
            )
        self.inputs, self.labels = inputs, labels

    @property
    def shape(self) -> torch.Size:
        return self.inputs.shape

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, rows: slice) -> LabeledBatch:
        if not isinstance(rows, slice):
            raise TypeError("LabeledBatch: index rows with a slice, e.g. batch[0:4]")
        return LabeledBatch(self.inputs[rows], self.labels[rows])

    def __iter__(self):  # unpacking: inputs, labels = batch
        return iter((self.inputs, self.labels))

    def to(self, *args: Any, **kwargs: Any) -> LabeledBatch:
        return LabeledBatch(self.inputs.to(*args, **kwargs), self.labels.to(*args, **kwargs))

    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _rng(seed: int, stream: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, stream, step]))


def _choose_without_replacement(
    rng: np.random.Generator, rows: int, n: int, k: int, log_p: np.ndarray | None = None
) -> np.ndarray:
    """``[rows, k]`` distinct indices from ``range(n)`` per row, drawn one after another with
    probabilities ``p`` renormalised over those left (numpy's ``choice(replace=False, p=p)``),
    via the Gumbel-top-k trick: the top k of ``log p + Gumbel noise`` in order."""
    scores = rng.gumbel(size=(rows, n))
    if log_p is not None:
        scores = scores + log_p[None, :]
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (rows, 1))
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _distinct_uniform(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
    """``[rows, k]`` distinct indices from ``range(n)`` per row, uniform over ordered k-tuples (the law
    of :func:`_choose_without_replacement` without ``log_p``). For ``k^2 <= n`` by rejection: draw k
    with replacement, redraw the rows holding a repeat (a few percent), O(rows * k) instead of
    O(rows * n) Gumbel noise."""
    if k * k > n:
        return _choose_without_replacement(rng, rows, n, k)
    out = rng.integers(0, n, size=(rows, k))
    redo = np.arange(rows)
    while True:
        s = np.sort(out[redo], axis=1)
        redo = redo[(s[:, 1:] == s[:, :-1]).any(axis=1)]
        if redo.size == 0:
            return out
        out[redo] = rng.integers(0, n, size=(redo.size, k))


def mqar_gap_probs(num_slots: int, power_a: float = 0.01) -> np.ndarray:
    """Zoology's query-slot distribution ``p(g) ∝ (g + 1)^(a - 1)`` for ``g = 0 .. num_slots - 1``."""
    p = power_a * np.arange(1, num_slots + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _check_mqar(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    if seq_len % 2:
        raise ValueError(f"MQAR needs an even sequence length (data.seq_len), got {seq_len}")
    if num_kv_pairs < 1:
        raise ValueError(f"MQAR needs at least one key-value pair, got synthetic.num_kv_pairs={num_kv_pairs}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"MQAR with {num_kv_pairs} key-value pairs needs data.seq_len >= {4 * num_kv_pairs} "
            f"(2 tokens per pair in the context, then a query slot of 2 per pair), got {seq_len}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise ValueError(
            f"MQAR draws {num_kv_pairs} distinct keys from [1, V/2) and values from [V/2, V): "
            f"synthetic.vocab_size={vocab_size} is too small"
        )


def mqar_batch(
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> LabeledBatch:
    """One MQAR batch from ``rng``: ``inputs, labels [batch_size, seq_len]`` (see the module doc)."""
    _check_mqar(seq_len, num_kv_pairs, vocab_size)
    B, n, V = batch_size, num_kv_pairs, vocab_size
    half = V // 2
    keys = 1 + _distinct_uniform(rng, B, half - 1, n)  # [B, n] in [1, V/2)
    values = half + _distinct_uniform(rng, B, V - half, n)  # [B, n] in [V/2, V)
    ctx = 2 * n
    slots = (seq_len - ctx) // 2
    gaps = _choose_without_replacement(rng, B, slots, n, np.log(mqar_gap_probs(slots, power_a)))  # [B, n]
    inputs = np.zeros((B, seq_len), dtype=np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    qpos = ctx + 2 * gaps
    np.put_along_axis(inputs, qpos, keys, axis=1)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, qpos, values, axis=1)
    if random_non_queries:
        noise = rng.integers(0, V, size=(B, seq_len))
        inputs = np.where(inputs == 0, noise, inputs)
    return LabeledBatch(torch.from_numpy(inputs), torch.from_numpy(labels))


def selective_copying_batch(
    rng: np.random.Generator, batch_size: int, seq_len: int, num_tokens: int, vocab_size: int
) -> LabeledBatch:
    """One selective-copying batch: ``inputs, labels [batch_size, seq_len]`` (see the module doc)."""
    B, n, V = batch_size, num_tokens, vocab_size
    if V < 3:
        raise ValueError(f"selective copying needs synthetic.vocab_size >= 3 (blank, data, marker), got {V}")
    if n < 1 or 2 * n > seq_len:
        raise ValueError(
            f"selective copying with {n} tokens needs data.seq_len >= {2 * n} (context + markers), got {seq_len}"
        )
    ctx = seq_len - n
    data = rng.integers(1, V - 1, size=(B, n))
    pos = np.sort(_choose_without_replacement(rng, B, ctx, n), axis=1)
    inputs = np.zeros((B, seq_len), dtype=np.int64)
    np.put_along_axis(inputs, pos, data, axis=1)
    inputs[:, ctx:] = V - 1
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, ctx:] = data
    return LabeledBatch(torch.from_numpy(inputs), torch.from_numpy(labels))


def synthetic_batch(
    task: str,
    seed: int,
    step: int,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    stream: int = _TRAIN_STREAM,
    num_kv_pairs: int = 16,
    num_tokens: int = 16,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> LabeledBatch:
    """This rank's rows of the global batch ``step`` of ``task`` (``batch_size`` is global)."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of the world size {world_size}")
    rng = _rng(seed, stream, step)
    if task == "mqar":
        b = mqar_batch(rng, batch_size, seq_len, num_kv_pairs, vocab_size, power_a, random_non_queries)
    elif task == "selective_copying":
        b = selective_copying_batch(rng, batch_size, seq_len, num_tokens, vocab_size)
    else:
        raise ValueError(f"unknown synthetic task {task!r}; available: {', '.join(TASKS)}")
    return b if world_size == 1 else b[rank::world_size]


class SyntheticLoader:
    """The synthetic counterpart of :class:`~mixlab.data.loader.TrainLoader`: ``batch(step)`` gives
    this rank's :class:`LabeledBatch` ``[batch_size // world_size, seq_len]``; the state is the step.

    ``params``: any object with the fields of ``mixlab.config.SyntheticConfig`` (``vocab_size``,
    ``num_kv_pairs``, ``num_tokens``, ``power_a``, ``random_non_queries``, ``eval_examples``,
    ``train_examples``) or a dict.

    ``train_examples > 0``: a fixed training set, as Zoology trains: ``train_examples`` sequences
    generated once (chunk ``i`` of 4096 is global batch ``i`` of the training stream), then read in
    epochs, each in its own order (a permutation seeded by ``(seed, epoch)``); the global batch of
    step ``s`` is positions ``[s * B, (s + 1) * B)`` of the concatenated epochs, so a batch is still
    a pure function of the step. ``0``: a fresh global batch every step.
    """

    def __init__(
        self,
        task: str,
        params: Any,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; available: {', '.join(TASKS)}")
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be a multiple of the world size {world_size}")
        p = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.kwargs = {
            k: p[k] for k in ("num_kv_pairs", "num_tokens", "vocab_size", "power_a", "random_non_queries") if k in p
        }
        self.eval_examples = int(p.get("eval_examples", 1000))
        self.train_examples = int(p.get("train_examples", 0) or 0)
        if self.train_examples < 0:
            raise ValueError(
                f"synthetic.train_examples={self.train_examples} must be >= 0 (0: a fresh batch every step)"
            )
        self.step = 0
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None  # int32 inputs, labels [E, T]
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its order)
        self.batch(0)  # validate the settings now, with a clear message

    def _train_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pool is None:
            key = (self.task, self.seed, self.seq_len, self.train_examples, tuple(sorted(self.kwargs.items())))
            if _POOL_CACHE.get("key") != key:  # one set per process: a sweep's next run reuses it
                _POOL_CACHE.clear()
                xs, ys, left, i = [], [], self.train_examples, 0
                while left > 0:
                    b = synthetic_batch(self.task, self.seed, i, min(_POOL_CHUNK, left), self.seq_len, **self.kwargs)
                    xs.append(b.inputs.to(torch.int32))
                    ys.append(b.labels.to(torch.int32))
                    left -= len(b)
                    i += 1
                _POOL_CACHE.update(key=key, pool=(torch.cat(xs), torch.cat(ys)))
            self._pool = _POOL_CACHE["pool"]
        return self._pool

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _rng(self.seed, _EPOCH_STREAM, epoch).permutation(self.train_examples))
        return self._perm[1]

    def pool_rows(self, step: int) -> np.ndarray:
        """Indices into the fixed training set of the global batch of ``step`` (``train_examples > 0``)."""
        E, B = self.train_examples, self.batch_size
        parts, pos, end = [], step * B, (step + 1) * B
        while pos < end:
            epoch, off = divmod(pos, E)
            take = self._epoch_order(epoch)[off : off + end - pos]
            parts.append(take)
            pos += len(take)
        return np.concatenate(parts)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def batch(self, step: int) -> LabeledBatch:
        if self.train_examples:
            inputs, labels = self._train_pool()
            rows = torch.from_numpy(self.pool_rows(step)[self.rank :: self.world_size])
            return LabeledBatch(inputs[rows].long(), labels[rows].long())
        return synthetic_batch(
            self.task, self.seed, step, self.batch_size, self.seq_len,
            rank=self.rank, world_size=self.world_size, **self.kwargs,
        )  # fmt: skip

    def eval_batches(self, batch_size: int | None = None) -> list[LabeledBatch]:
        """The held-out set: ``eval_examples`` sequences (a stream training never draws), in global
        batches of ``batch_size`` (default: the training batch), split over ranks like training."""
        bs = batch_size or self.batch_size
        out, left, i = [], self.eval_examples, 0
        while left > 0:
            n = min(bs, left)
            n -= n % self.world_size
            if n <= 0:
                break
            b = synthetic_batch(
                self.task, self.seed, i, n, self.seq_len, rank=self.rank, world_size=self.world_size,
                stream=_EVAL_STREAM, **self.kwargs,
            )  # fmt: skip
            out.append(b)
            left -= n
            i += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatch = [
            f"{k}: saved {state[k]} != now {v}"
            for k, v in (("seed", self.seed), ("seq_len", self.seq_len), ("batch_size", self.batch_size))
            if k in state and state[k] != v
        ]
        if mismatch:
            raise ValueError(
                "the checkpoint's data order does not match this run (" + "; ".join(mismatch) + "); "
                "resume with the run's own settings, or start fresh with train.resume=never"
            )
        self.step = int(state["step"])
