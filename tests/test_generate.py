"""generate(): sampling filters on hand-computed distributions, cache decoding against full forwards,
ragged batches against single prompts, EOS, streaming, CUDA graphs (GPU only)."""

from __future__ import annotations

import importlib
import io

import pytest
import torch

from mixlab.config import (
    AttentionConfig,
    DeltaNetConfig,
    GatedDeltaNetConfig,
    Mamba2Config,
    MambaConfig,
    ModelConfig,
)
from mixlab.generate import TextStreamer, apply_repetition_penalty, filter_logits, generate, sample_next
from mixlab.models import build_model

V = 40


def _model(pattern: str, dtype=torch.float64, seed: int = 0, backend: str = "chunked"):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V, d_model=32, n_layers=len(pattern), pattern=pattern, d_intermediate=64, tie_embeddings=False,
        init_std=0.2, backend=backend,
        attention=AttentionConfig(n_heads=2, n_kv_heads=1, window=4),
        mamba=MambaConfig(d_state=4, expand=2),
        mamba2=Mamba2Config(d_state=8, headdim=16, chunk_size=8),
        deltanet=DeltaNetConfig(n_heads=2, head_dim=16),
        gated_deltanet=GatedDeltaNetConfig(n_heads=2, head_dim=16),
    )  # fmt: skip
    return build_model(cfg, dtype=dtype).eval()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------
# sampling filters

PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    assert _kept(filter_logits(logits, top_k=2)) == [3, 4]
    assert _kept(filter_logits(logits, top_k=0)) == [0, 1, 2, 3, 4]
    assert _kept(filter_logits(logits, top_k=9)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "top_p, kept", [(0.4, [0]), (0.6, [0, 1]), (0.75, [0, 1, 2]), (0.9, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3, 4])]
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    # shuffled order: the filter must work on sorted probabilities and scatter back
    perm = torch.tensor([3, 0, 4, 1, 2])
    logits = PROBS.log()[:, perm]
    got = sorted(perm[i].item() for i in _kept(filter_logits(logits, top_p=top_p)))
    assert got == kept


def test_min_p_is_relative_to_the_top_probability():
    assert _kept(filter_logits(PROBS.log(), min_p=0.25)) == [0, 1, 2]  # threshold 0.125
    assert _kept(filter_logits(PROBS.log(), min_p=0.35)) == [0, 1]  # threshold 0.175
    assert _kept(filter_logits(PROBS.log(), min_p=0.5)) == [0]  # threshold 0.25
    assert _kept(filter_logits(PROBS.log(), min_p=0.05)) == [0, 1, 2, 3, 4]


def test_filters_see_the_renormalised_distribution():
    # Alone, top_p=0.72 keeps {0, 1, 2} (mass before token 2 is 0.70). After top_k=4 the renormalised
    # probabilities are 0.5/0.95, 0.2/0.95, ...: the mass before token 2 is 0.737 >= 0.72, so it goes.
    assert _kept(filter_logits(PROBS.log(), top_p=0.72)) == [0, 1, 2]
    assert _kept(filter_logits(PROBS.log(), top_k=4, top_p=0.72)) == [0, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_temperature_scales_the_sampled_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(20000, 3)
    for temperature in (0.5, 2.0):
        g = torch.Generator().manual_seed(0)
        draws = sample_next(logits, temperature=temperature, generator=g)
        freq = torch.bincount(draws, minlength=3).double() / draws.numel()
        want = torch.softmax(logits[0].double() / temperature, -1)
        assert (freq - want).abs().max() < 0.015, (temperature, freq, want)


def test_greedy_is_argmax_whatever_the_filters():
    logits = torch.randn(6, V)
    assert torch.equal(sample_next(logits, temperature=0.0, top_p=0.1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), logits.argmax(-1))


def test_sampling_never_draws_a_filtered_token():
    logits = torch.randn(200, V)
    g = torch.Generator().manual_seed(3)
    draws = sample_next(logits, temperature=1.3, top_k=5, top_p=0.8, min_p=0.05, generator=g)
    allowed = torch.isfinite(filter_logits(logits / 1.3, top_k=5, top_p=0.8, min_p=0.05))
    assert allowed.gather(1, draws[:, None]).all()


# ----------------------------------------------------------------------------------------------
# decoding


def _greedy_by_full_forward(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("pattern", ["G", "D", "M", "m", "AS"])
def test_greedy_decoding_through_the_cache_matches_full_forwards(pattern):
    model = _model(pattern)
    prompt = _prompts([7])[0]
    got = generate(model, [prompt], 10, temperature=0.0)[0]
    assert got == _greedy_by_full_forward(model, prompt, 10)
    assert generate(model, [prompt], 10, temperature=0.0)[0] == got  # deterministic


@pytest.mark.parametrize(
    "pattern, row_positions, aligned",
    [
        ("GD", True, True),
        ("Mm", True, True),
        ("GS", True, True),
        ("A", True, True),
        ("GS", False, False),
        ("A", False, False),
    ],
)
def test_ragged_batch_equals_each_prompt_alone(pattern, row_positions, aligned, monkeypatch):
    import mixlab.generate as gen
    from mixlab.layers.attention import AttentionCache

    model = _model(pattern)
    prompts = _prompts([9, 2, 5, 2])
    merges = []
    real_merge = gen._merge_rows
    monkeypatch.setattr(gen, "_merge_rows", lambda *a: (merges.append(1), real_merge(*a)))
    # Without per-row positions in the attention cache (one int position for the batch) generate falls
    # back to lockstep decoding, teacher-forcing the longer prompts; with them, length groups are
    # prefilled separately and merged into the batch cache.
    monkeypatch.setattr(AttentionCache, "supports_row_positions", row_positions)
    batched = generate(model, prompts, 8, temperature=0.0)
    assert bool(merges) == aligned
    for p, row in zip(prompts, batched):
        assert len(row) == len(p) + 8
        assert row == generate(model, [p], 8, temperature=0.0)[0]


@pytest.mark.parametrize("window", [None, 3])
def test_attention_rows_at_different_positions_match_full_forward(window):
    from mixlab.layers.attention import Attention

    torch.manual_seed(0)
    layer = Attention(32, n_heads=4, n_kv_heads=2, window=window, dtype=torch.float64)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    want = layer(x)
    cache = layer.init_cache(2, 16)
    for row, n in ((0, 5), (1, 3)):  # row 0 holds 5 tokens, row 1 holds 3
        c = layer.init_cache(1, 16)
        layer(x[row : row + 1, :n], c)
        cache.k[row], cache.v[row] = c.k[0], c.v[0]
    cache.pos = torch.tensor([5, 3])
    if cache.ring:
        with pytest.raises(ValueError, match="one token per call"):
            layer(torch.stack([x[0, 5:7], x[1, 3:5]]), cache)
        steps = [torch.stack([x[0, 5 + i], x[1, 3 + i]])[:, None] for i in range(2)]
        got = torch.cat([layer(s, cache) for s in steps], dim=1)
    else:
        got = layer(torch.stack([x[0, 5:7], x[1, 3:5]]), cache)
    assert torch.allclose(got[0], want[0, 5:7], atol=1e-12)
    assert torch.allclose(got[1], want[1, 3:5], atol=1e-12)
    assert cache.pos.tolist() == [7, 5]


def test_padded_tensor_with_attention_mask_equals_lists():
    model = _model("GS")
    prompts = _prompts([6, 3])
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(prompts[0]), 1
    ids[1, 3:], mask[1, 3:] = torch.tensor(prompts[1]), 1  # left padding
    out = generate(model, ids, 5, temperature=0.0, attention_mask=mask)
    want = generate(model, prompts, 5, temperature=0.0)
    assert out.shape == (2, 11)
    assert out[0].tolist() == want[0]
    assert out[1, 6:].tolist() == want[1][3:] and torch.equal(out[1, :6], ids[1])


def test_seeded_sampling_is_reproducible():
    model = _model("G", dtype=torch.float32)
    ids = torch.tensor(_prompts([4, 4]))
    kw = dict(temperature=1.5, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.3)
    a = generate(model, ids, 12, seed=7, **kw)
    assert torch.equal(a, generate(model, ids, 12, seed=7, **kw))
    assert not torch.equal(a, generate(model, ids, 12, seed=8, **kw))


def test_eos_stops_a_row_and_pads_the_tensor():
    model = _model("G")
    prompts = torch.tensor(_prompts([5, 5]))
    free = generate(model, prompts, 10, temperature=0.0)
    eos = int(free[0, 5 + 3])  # the 4th token row 0 generates
    stop0 = 5 + (free[0, 5:] == eos).nonzero()[0].item()
    hits1 = (free[1, 5:] == eos).nonzero()
    stop1 = 5 + hits1[0].item() if len(hits1) else None
    out = generate(model, prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=V + 1)
    assert out[0, : stop0 + 1].tolist() == free[0, : stop0 + 1].tolist()
    assert (out[0, stop0 + 1 :] == V + 1).all()
    if stop1 is None:
        assert out[1].tolist() == free[1].tolist()
    lists = generate(model, prompts.tolist(), 10, temperature=0.0, eos_token_id=[eos])
    assert lists[0] == free[0, : stop0 + 1].tolist()


def test_streamer_gets_tokens_in_order_then_end():
    class Recorder:
        def __init__(self):
            self.tokens, self.ends = [], 0

        def put(self, value):
            assert value.shape == (1,)
            self.tokens.append(int(value[0]))

        def end(self):
            self.ends += 1

    model = _model("G")
    prompt = _prompts([4])[0]
    rec = Recorder()
    out = generate(model, [prompt], 9, temperature=0.0, streamer=rec)[0]
    assert rec.tokens == out[4:] and rec.ends == 1


def test_text_streamer_prints_whole_characters():
    from mixlab.data.tokenizer import ByteTokenizer

    buf = io.StringIO()
    s = TextStreamer(ByteTokenizer(), file=buf, stop_ids=[256])
    for b in "aé".encode():
        s.put(torch.tensor([b]))
        assert "\ufffd" not in buf.getvalue()
    assert buf.getvalue() == "aé"
    s.put(torch.tensor([256]))  # EOS: not printed
    s.end()
    assert buf.getvalue() == "aé\n"


def test_zero_new_tokens_and_bad_inputs():
    model = _model("G")
    assert generate(model, [[1, 2, 3]], 0) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, V]], 3)


def test_language_model_generate_method():
    model = _model("G")
    prompt = torch.tensor([_prompts([5])[0]])
    assert torch.equal(model.generate(prompt, 6, temperature=0.0), generate(model, prompt, 6, temperature=0.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", ["G", "M", "m", "D", "GS", "A"])
def test_cuda_graph_decoding_matches_eager(pattern):
    importlib.import_module("mixlab.layers")
    model = _model(pattern, dtype=torch.float32, backend="auto").cuda()
    prompts = _prompts([6, 3, 6])
    eager = generate(model, prompts, 16, temperature=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused graph warns: fail instead
        graphed = generate(model, prompts, 16, temperature=0.0, cuda_graph=True)
    assert graphed == eager


# ----------------------------------------------------------------------------------------------
# command line


def _saved_model(path, vocab: int = 320):
    from mixlab.models.hub import save_pretrained

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=2, pattern="GS", d_intermediate=64, tie_embeddings=False, init_std=0.2,
        attention=AttentionConfig(n_heads=2, window=8), gated_deltanet=GatedDeltaNetConfig(n_heads=2, head_dim=16),
    )  # fmt: skip
    model = build_model(cfg).eval()
    save_pretrained(model, path)
    return model


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_cli_generate_streams_the_greedy_continuation(tmp_path, capsys, tokenizer):
    from mixlab.cli import main
    from mixlab.data.tokenizer import save_tokenizer_to_dir, train_bpe
    from mixlab.models.hub import load_tokenizer_for

    model = _saved_model(tmp_path)
    if tokenizer == "byte":
        save_tokenizer_to_dir("byte", tmp_path)
    else:
        train_bpe(["def add(a, b):\n    return a + b\n"] * 20, 300, tmp_path)
    tok = load_tokenizer_for(tmp_path)
    assert type(tok).__name__ == ("ByteTokenizer" if tokenizer == "byte" else "HFTokenizer")
    prompt = "def add(a, b):"
    ids = tok.encode(prompt)
    want = generate(model, [ids], 12, temperature=0.0, eos_token_id=tok.eos_id)[0][len(ids) :]
    want = [t for t in want if t != tok.eos_id]
    rc = main(["generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12", "--greedy", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out == prompt + tok.decode(want) + "\n"


def test_cli_generate_and_convert_errors(tmp_path, capsys):
    from mixlab.cli import main
    from mixlab.models.hub import from_pretrained

    model = _saved_model(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--device", "cpu"]) == 2
    assert "names no tokenizer" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out")]) == 0
    ids = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        assert torch.equal(from_pretrained(tmp_path / "out")(ids), model(ids))
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out")]) == 2  # exists
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "ms"), "--to", "mamba_ssm"]) == 2
    assert "cannot export to mamba_ssm" in capsys.readouterr().err
