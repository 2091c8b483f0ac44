"""Perplexity, bits per byte and the length curve on models whose probabilities we control."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from mixlab import build_model, get_preset
from mixlab.data.tokenizer import ByteTokenizer
from mixlab.eval.ppl import documents_from_stream, heldout_documents, length_curve, perplexity, token_nll


class Bigram(nn.Module):
    """log p(next | current) = table[current]: every scoring mode must give the same, hand-computable NLL."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.log_softmax(-1), requires_grad=False)

    def forward(self, ids: torch.Tensor, cache=None) -> torch.Tensor:
        return self.table[ids]

    def init_cache(self, batch: int, max_len: int):
        return object()


def _tiny(pattern: str, vocab: int = 32) -> nn.Module:
    cfg = get_preset("transformer-tiny")
    cfg.pattern, cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.d_intermediate = pattern, 32, 2, vocab, 64
    cfg.attention.n_heads = 2
    cfg.gated_deltanet.n_heads, cfg.gated_deltanet.head_dim = 2, 16
    cfg.gated_deltanet.chunk_size = 8
    torch.manual_seed(0)
    return build_model(cfg, dtype=torch.float64).eval()


def test_uniform_logits_give_vocab_size_and_log2v_per_byte() -> None:
    V = 320
    cfg = get_preset("transformer-tiny")
    cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.tie_embeddings = 32, 1, V, False
    cfg.attention.n_heads = 2
    model = build_model(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tok = ByteTokenizer()
    texts = ["hello world", "é and ü are two bytes each", "x" * 300]
    docs = [tok.encode(t) for t in texts]
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(d) + 1 for d in docs)  # + the closing EOS of each document
    for kw in ({"mode": "window", "context": 64}, {"mode": "window", "context": 64, "stride": 16}, {"mode": "state"}):
        out = perplexity(model, docs, tok.eos_id, tokenizer=tok, **kw)
        assert out["ppl"] == pytest.approx(V, rel=1e-5)
        assert out["tokens"] == n_tokens and out["bytes"] == n_bytes
        assert out["bits_per_byte"] == pytest.approx(math.log2(V) * n_tokens / n_bytes, rel=1e-5)


def test_bigram_model_nll_by_hand_in_every_mode() -> None:
    V, eos = 6, 5
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = Bigram(table)
    logp = table.log_softmax(-1)
    docs = [[1, 2, 3, 4, 0, 1], [2], [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]]
    want = 0.0
    for d in docs:
        s = [eos, *d, eos]
        want -= sum(float(logp[a, b]) for a, b in itertools.pairwise(s))
    count = sum(len(d) + 1 for d in docs)
    for kw in (
        {"mode": "window", "context": 3},
        {"mode": "window", "context": 4, "stride": 1},
        {"mode": "window", "context": 100},
        {"mode": "state", "chunk": 2},
    ):
        out = perplexity(model, docs, eos, num_bytes=10, **kw)
        assert out["nll"] == pytest.approx(want, rel=1e-9), kw
        assert out["tokens"] == count and out["ppl"] == pytest.approx(math.exp(want / count))
        assert out["bits_per_byte"] == pytest.approx(want / math.log(2) / 10)


@pytest.mark.parametrize("pattern", ["A", "G"])
def test_state_mode_and_long_windows_equal_one_full_forward(pattern: str) -> None:
    model = _tiny(pattern)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 30, (n,), generator=g).tolist() for n in (37, 5, 20)]
    eos = 31
    full = 0.0
    for d in docs:
        s = torch.tensor([[eos, *d, eos]])
        full += float(token_nll(model, s[:, :-1], s[:, 1:]).sum())
    state = perplexity(model, docs, eos, mode="state", chunk=7)
    window = perplexity(model, docs, eos, mode="window", context=64, batch_size=2)
    assert state["nll"] == pytest.approx(full, rel=1e-9)
    assert window["nll"] == pytest.approx(full, rel=1e-9)


def test_sliding_windows_give_each_token_its_last_context_tokens() -> None:
    model = _tiny("A")
    eos, C = 31, 6
    doc = torch.randint(0, 30, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    s = [eos, *doc, eos]
    ref = 0.0
    for t in range(1, len(s)):  # brute force: target t seen with inputs s[max(0, t-C):t]
        x = torch.tensor([s[max(0, t - C) : t]])
        ref += float(token_nll(model, x, torch.tensor([s[max(0, t - C) + 1 : t + 1]]))[0, -1])
    out = perplexity(model, [doc], eos, mode="window", context=C, stride=1)
    assert out["nll"] == pytest.approx(ref, rel=1e-9)
    disjoint = perplexity(model, [doc], eos, mode="window", context=C)
    assert disjoint["tokens"] == out["tokens"] == len(doc) + 1
    assert disjoint["nll"] != pytest.approx(ref, rel=1e-6)  # fewer context tokens for some targets


def test_bad_arguments_are_named() -> None:
    model = Bigram(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="mode='rolling'"):
        perplexity(model, [[1]], 3, mode="rolling")
    with pytest.raises(ValueError, match="stride=9"):
        perplexity(model, [[1]], 3, context=4, stride=9)
    with pytest.raises(ValueError, match="no non-empty document"):
        perplexity(model, [[]], 3)


def test_length_curve_buckets_and_values() -> None:
    V = 8
    model = Bigram(torch.zeros(V, V))
    stream = np.arange(200) % V
    out = length_curve(model, stream, train_len=8, factor=4, max_sequences=3)
    assert out["length"] == 32 and out["sequences"] == 3
    assert [(b["start"], b["end"]) for b in out["buckets"]] == [(i, i + 2) for i in range(0, 32, 2)]
    assert all(b["loss"] == pytest.approx(math.log(V)) for b in out["buckets"])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        length_curve(model, stream[:30], train_len=8)
    # a real model: the curve is the mean per-position NLL of the sequences
    tiny = _tiny("A")
    stream = torch.randint(0, 30, (100,), generator=torch.Generator().manual_seed(4)).numpy()
    out = length_curve(tiny, stream, train_len=6, factor=4, bucket=12, max_sequences=2)
    seqs = torch.from_numpy(np.stack([stream[0:25], stream[24:49]]))
    per = token_nll(tiny, seqs[:, :-1], seqs[:, 1:]).mean(0)
    assert [b["loss"] for b in out["buckets"]] == pytest.approx([float(per[:12].mean()), float(per[12:].mean())])
    assert out["loss_within"] == pytest.approx(float(per[:6].mean()))


def test_documents_from_stream_and_text_files(tmp_path) -> None:
    assert documents_from_stream([1, 2, 9, 9, 3, 9, 4], eos_id=9) == [[1, 2], [3], [4]]
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second")
    tok = ByteTokenizer()
    docs, stream = heldout_documents(tmp_path, tok)
    assert sorted(docs) == sorted([tok.encode("first document"), tok.encode("second")])
    assert documents_from_stream(stream, tok.eos_id) == docs
    with pytest.raises((ValueError, FileNotFoundError)):
        heldout_documents(tmp_path / "missing", tok)
