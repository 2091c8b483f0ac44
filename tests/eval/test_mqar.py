"""MQAR and selective copying: layout, labels, the gap law, determinism, rank splits, accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mixlab.data.synthetic import (
    _POOL_CACHE,
    IGNORE_INDEX,
    LabeledBatch,
    SyntheticLoader,
    _distinct_uniform,
    mqar_batch,
    mqar_gap_probs,
    selective_copying_batch,
    synthetic_batch,
)
from mixlab.eval.mqar import evaluate_mqar, labeled_accuracy, mqar_test_set


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def test_mqar_layout_and_labels_by_hand() -> None:
    L, n, V = 32, 4, 64
    b = mqar_batch(_rng(1), 50, L, n, V, random_non_queries=False)
    x, y = b.inputs.numpy(), b.labels.numpy()
    assert x.shape == y.shape == (50, L)
    for row in range(50):
        keys, values = x[row, 0 : 2 * n : 2], x[row, 1 : 2 * n : 2]
        assert len(set(keys)) == n and all(1 <= k < V // 2 for k in keys)
        assert len(set(values)) == n and all(V // 2 <= v < V for v in values)
        assert (y[row, : 2 * n] == IGNORE_INDEX).all()
        q = np.flatnonzero(y[row] != IGNORE_INDEX)
        assert len(q) == n and all(p >= 2 * n and (p - 2 * n) % 2 == 0 for p in q)
        # each key queried exactly once; the label is its value; everything else is blank (0)
        kv = dict(zip(keys, values))
        assert sorted(x[row, q]) == sorted(keys)
        assert all(y[row, p] == kv[x[row, p]] for p in q)
        rest = np.ones(L, dtype=bool)
        rest[: 2 * n] = False
        rest[q] = False
        assert (x[row, rest] == 0).all()


def test_mqar_random_non_queries_fills_only_blanks() -> None:
    L, n, V = 64, 8, 128
    plain = mqar_batch(_rng(3), 8, L, n, V, random_non_queries=False)
    noisy = mqar_batch(_rng(3), 8, L, n, V, random_non_queries=True)
    filled = plain.inputs == 0
    assert torch.equal(noisy.inputs[~filled], plain.inputs[~filled])
    assert torch.equal(noisy.labels, plain.labels)
    vals = noisy.inputs[filled]
    assert vals.min() >= 0 and vals.max() < V and vals.unique().numel() > V // 4  # spread over the vocabulary


def test_gap_probs_by_hand() -> None:
    assert np.allclose(mqar_gap_probs(4, 1.0), [0.25] * 4)
    p = mqar_gap_probs(3, 0.5)
    w = np.array([1.0, 2**-0.5, 3**-0.5])
    assert np.allclose(p, w / w.sum())
    assert np.all(np.diff(mqar_gap_probs(100, 0.01)) < 0)  # short gaps favoured


def test_gap_distribution_matches_the_law_and_numpy_choice() -> None:
    L, V, rows = 2 + 2 * 10, 16, 20000  # one pair: 10 query slots
    b = mqar_batch(_rng(5), rows, L, 1, V, random_non_queries=False)
    slot = (b.labels != IGNORE_INDEX).nonzero()[:, 1].numpy()
    slot = (slot - 2) // 2
    freq = np.bincount(slot, minlength=10) / rows
    assert np.abs(freq - mqar_gap_probs(10)).max() < 0.012
    # several pairs: slots drawn without replacement as numpy's sequential choice(replace=False, p)
    n, slots = 3, 6
    b = mqar_batch(_rng(6), rows, 2 * n + 2 * slots, n, V, random_non_queries=False)
    pos = (b.labels != IGNORE_INDEX).nonzero()[:, 1].numpy()
    ours = np.bincount((pos - 2 * n) // 2, minlength=slots) / rows
    p = mqar_gap_probs(slots)
    ref_rng = np.random.RandomState(0)
    ref = np.zeros(slots)
    for _ in range(rows):
        ref[ref_rng.choice(slots, size=n, replace=False, p=p)] += 1
    assert np.abs(ours - ref / rows).max() < 0.02
    assert abs(ours.sum() - n) < 1e-9


def test_mqar_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="even"):
        mqar_batch(_rng(), 1, 33, 4, 64)
    with pytest.raises(ValueError, match=r"data\.seq_len >= 64"):
        mqar_batch(_rng(), 1, 32, 16, 8192)
    with pytest.raises(ValueError, match="vocab_size=16 is too small"):
        mqar_batch(_rng(), 1, 64, 8, 16)


def test_batches_are_pure_functions_and_split_over_ranks() -> None:
    kw = dict(num_kv_pairs=4, vocab_size=256)
    a = synthetic_batch("mqar", 7, 3, 8, 32, **kw)
    assert torch.equal(a.inputs, synthetic_batch("mqar", 7, 3, 8, 32, **kw).inputs)
    assert not torch.equal(a.inputs, synthetic_batch("mqar", 7, 4, 8, 32, **kw).inputs)
    assert not torch.equal(a.inputs, synthetic_batch("mqar", 8, 3, 8, 32, **kw).inputs)
    r0 = synthetic_batch("mqar", 7, 3, 8, 32, rank=0, world_size=2, **kw)
    r1 = synthetic_batch("mqar", 7, 3, 8, 32, rank=1, world_size=2, **kw)
    assert torch.equal(a.inputs[0::2], r0.inputs) and torch.equal(a.labels[1::2], r1.labels)
    loader = SyntheticLoader("mqar", {**kw, "eval_examples": 20}, 32, 8, seed=7)
    assert torch.equal(loader.batch(3).inputs, a.inputs)
    held = loader.eval_batches()
    assert [h.inputs.shape[0] for h in held] == [8, 8, 4]
    train_rows = {tuple(r) for s in range(5) for r in loader.batch(s).inputs.tolist()}
    assert not any(tuple(r) in train_rows for h in held for r in h.inputs.tolist())
    with pytest.raises(ValueError, match="unknown synthetic task"):
        SyntheticLoader("copy", kw, 32, 8, seed=0)


def test_distinct_uniform_rows_are_distinct_and_uniform() -> None:
    for n, k in ((4095, 16), (10, 4)):  # rejection, and the Gumbel path when k^2 > n
        x = _distinct_uniform(_rng(11), 20000, n, k)
        assert x.shape == (20000, k) and x.min() >= 0 and x.max() < n
        assert all(len(set(r)) == k for r in x[:2000].tolist())
    x = _distinct_uniform(_rng(12), 40000, 20, 4)  # k^2 <= n: rejection
    assert all(len(set(r)) == 4 for r in x.tolist())
    for j in range(4):  # every position uniform over range(n)
        freq = np.bincount(x[:, j], minlength=20) / len(x)
        assert np.abs(freq - 1 / 20).max() < 0.006


def test_fixed_training_set_is_deterministic_and_read_in_epochs() -> None:
    kw = {"num_kv_pairs": 4, "vocab_size": 256, "train_examples": 24}
    a = SyntheticLoader("mqar", kw, 32, 8, seed=3)
    _POOL_CACHE.clear()
    b = SyntheticLoader("mqar", kw, 32, 8, seed=3)
    for s in (5, 0, 3, 7):  # any order of steps: a pure function of the step
        assert torch.equal(a.batch(s).inputs, b.batch(s).inputs) and torch.equal(a.batch(s).labels, b.batch(s).labels)
    pool = {tuple(r) for r in synthetic_batch("mqar", 3, 0, 24, 32, num_kv_pairs=4, vocab_size=256).inputs.tolist()}
    epochs = [[tuple(r) for s in range(3 * e, 3 * e + 3) for r in a.batch(s).inputs.tolist()] for e in range(2)]
    assert set(epochs[0]) == set(epochs[1]) == pool and len(set(epochs[0])) == 24  # each example once per epoch
    assert epochs[0] != epochs[1]  # in a new order
    assert not torch.equal(a.batch(0).inputs, SyntheticLoader("mqar", kw, 32, 8, seed=4).batch(0).inputs)
    fresh = SyntheticLoader("mqar", {**kw, "train_examples": 0}, 32, 8, seed=3)
    assert {tuple(r) for s in range(3, 6) for r in fresh.batch(s).inputs.tolist()}.isdisjoint(pool)
    r1 = SyntheticLoader("mqar", kw, 32, 8, seed=3, rank=1, world_size=2)
    assert torch.equal(r1.batch(4).inputs, a.batch(4).inputs[1::2]) and r1.batch(4).inputs.dtype == torch.int64
    # a batch straddling two epochs (24 is not a multiple of 10)
    c = SyntheticLoader("mqar", kw, 32, 10, seed=3)
    assert len({tuple(r) for s in range(2) for r in c.batch(s).inputs.tolist()}) == 20
    assert {tuple(r) for r in c.batch(2).inputs.tolist()} <= pool
    with pytest.raises(ValueError, match="train_examples=-1 must be >= 0"):
        SyntheticLoader("mqar", {**kw, "train_examples": -1}, 32, 8, seed=3)


def test_selective_copying_layout() -> None:
    L, n, V = 24, 4, 10
    b = selective_copying_batch(_rng(2), 30, L, n, V)
    x, y = b.inputs.numpy(), b.labels.numpy()
    for row in range(30):
        ctx = x[row, : L - n]
        data = ctx[ctx != 0]
        assert len(data) == n and all(1 <= t < V - 1 for t in data)
        assert (x[row, L - n :] == V - 1).all()
        assert (y[row, : L - n] == IGNORE_INDEX).all()
        assert list(y[row, L - n :]) == list(data)  # in order of appearance
    with pytest.raises(ValueError, match=r"data\.seq_len >= 40"):
        selective_copying_batch(_rng(), 1, 30, 20, 10)


class _Oracle(nn.Module):
    """Looks each query key up in the context: perfect MQAR recall for the first ``solve`` queries of
    every row (by position), a wrong answer (token 0) for the rest."""

    def __init__(self, vocab: int, n_pairs: int, solve: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.vocab, self.n, self.solve = vocab, n_pairs, solve

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[..., 0] = 1.0
        for b in range(B):
            kv = {int(ids[b, i]): int(ids[b, i + 1]) for i in range(0, 2 * self.n, 2)}
            seen: dict[int, int] = {}
            for t in range(2 * self.n, T, 2):
                k = int(ids[b, t])
                if k in kv and k not in seen and len(seen) < self.n:
                    seen[k] = t
            for i, t in enumerate(sorted(seen.values())):
                if i < self.solve:
                    logits[b, t, kv[int(ids[b, t])]] = 5.0
        return logits


def test_accuracy_of_controlled_models() -> None:
    V, L, n = 64, 32, 4
    test = mqar_test_set(L, n, V, examples=24, batch_size=8, random_non_queries=False)
    assert labeled_accuracy(_Oracle(V, n, n), test)["accuracy"] == 1.0
    half = labeled_accuracy(_Oracle(V, n, 1), test)
    assert half["accuracy"] == pytest.approx(0.25) and half["sequence_accuracy"] == 0.0 and half["targets"] == 96
    assert labeled_accuracy(_Oracle(V, n, 0), test)["accuracy"] == 0.0
    # the loss of a uniform prediction is log V
    uniform = LabeledBatch(test[0].inputs, test[0].labels)

    class Uniform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            return torch.zeros(*ids.shape, V)

    assert labeled_accuracy(Uniform(), [uniform])["loss"] == pytest.approx(np.log(V))


def test_evaluate_mqar_checks_the_vocabulary() -> None:
    from mixlab import build_model, get_preset

    cfg = get_preset("transformer-tiny")
    cfg.d_model, cfg.n_layers, cfg.vocab_size = 32, 1, 128
    model = build_model(cfg)
    out = evaluate_mqar(model, [(32, 4)], examples=8, batch_size=8)
    assert out["vocab_size"] == 128 and 0.0 <= out["accuracy"] <= 1.0 and out["results"][0]["targets"] == 32
    with pytest.raises(ValueError, match="larger than the model"):
        evaluate_mqar(model, [(32, 4)], vocab_size=256, examples=8)
