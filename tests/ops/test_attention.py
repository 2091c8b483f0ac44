"""The attention op against a naive float64 softmax, and RoPE's defining properties."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mixlab.ops.attention import apply_rope, attention, rope_cos_sin

F64 = torch.float64


def naive_attention(q, k, v, causal=True, window=None, scale=None, q_offset=None):
    """Per-query softmax over the keys it may see, written out position by position."""
    _, tq, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_offset = s - tq if q_offset is None else q_offset
    scale = d**-0.5 if scale is None else scale
    out = []
    for i in range(tq):
        p = q_offset + i
        if causal:
            lo = 0 if window is None else max(0, p - window + 1)
            keys = list(range(lo, p + 1))
        else:
            keys = list(range(s))
        heads = []
        for head in range(h):
            kvh = head // (h // hkv)
            sc = torch.stack([(q[:, i, head] * k[:, j, kvh]).sum(-1) * scale for j in keys], dim=-1)  # [B, n]
            w = torch.softmax(sc, dim=-1)
            heads.append(sum(w[:, n, None] * v[:, j, kvh] for n, j in enumerate(keys)))
        out.append(torch.stack(heads, dim=1))
    return torch.stack(out, dim=1)


def _inputs(b, tq, s, h, hkv, d, dv=None, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, s, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, s, hkv, dv or d, generator=g, dtype=dtype)
    return q, k, v


CASES = [
    # (Tq, S, H, Hkv, causal, window, q_offset)
    (9, 9, 4, 4, True, None, None),  # square causal (SDPA is_causal)
    (9, 9, 4, 2, True, None, None),  # GQA
    (9, 9, 4, 1, True, 3, None),  # MQA + window
    (7, 12, 4, 2, True, None, None),  # queries continue after 5 cached keys
    (7, 12, 2, 2, True, 4, None),  # ... with a window
    (1, 12, 4, 2, True, None, None),  # one decode step
    (1, 12, 4, 2, True, 5, None),  # one decode step, windowed
    (4, 12, 4, 2, True, 3, 2),  # explicit offset: queries in the middle of the keys
    (5, 8, 4, 2, False, None, None),  # no mask
    (6, 6, 2, 1, True, 50, None),  # window longer than the sequence = plain causal
]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_attention_matches_naive_forward_and_grads(backend, case):
    tq, s, h, hkv, causal, window, q_offset = case
    q, k, v = _inputs(2, tq, s, h, hkv, 8, dv=6, seed=CASES.index(case))
    for t in (q, k, v):
        t.requires_grad_(True)
    o = attention(q, k, v, causal=causal, window=window, q_offset=q_offset, backend=backend)
    ref = naive_attention(q, k, v, causal=causal, window=window, q_offset=q_offset)
    assert o.shape == (2, tq, h, 6)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), go)
    g_ref = torch.autograd.grad(ref, (q, k, v), go)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_attention_custom_scale_and_auto_backend():
    q, k, v = _inputs(1, 5, 5, 2, 1, 4)
    o = attention(q, k, v, scale=0.3, window=2)
    torch.testing.assert_close(o, naive_attention(q, k, v, window=2, scale=0.3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 4])
def test_flex_backend_matches_naive(window):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _inputs(1, 19, 19, 4, 2, 16, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is unfused
        o = attention(q, k, v, window=window, backend="flex")
    torch.testing.assert_close(o, naive_attention(q, k, v, window=window), rtol=1e-10, atol=1e-10)


def test_float32_sdpa_close_to_float64():
    q, k, v = _inputs(2, 16, 16, 4, 2, 32, seed=5)
    o32 = attention(q.float(), k.float(), v.float(), window=6)
    o64 = naive_attention(q, k, v, window=6)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(h=3, hkv=2), "multiple of key/value heads"),
        (dict(q_offset=5), "q_offset"),
        (dict(causal=False, window=3), "causal"),
        (dict(window=0), "window"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_attention_bad_input_errors(kwargs, match):
    h, hkv = kwargs.pop("h", 4), kwargs.pop("hkv", 2)
    q, k, v = _inputs(1, 4, 6, h, hkv, 4)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------
# RoPE


def test_rope_is_a_rotation_by_position_times_frequency():
    """Rotate-half pairs (i, i + D/2) as the complex number x_i + j x_{i+D/2}, turned by pos * theta^(-2i/D)."""
    d, theta = 8, 500.0
    x = torch.randn(2, 5, 3, d, dtype=F64)
    pos = torch.tensor([0, 1, 7, 100, 12345])
    cos, sin = rope_cos_sin(pos, d, theta, dtype=F64)
    y = apply_rope(x, cos, sin)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=F64)
    ang = pos.to(F64)[:, None] * freqs[None]
    zr = z * torch.polar(torch.ones_like(ang), ang)[None, :, None, :]
    torch.testing.assert_close(y, torch.cat([zr.real, zr.imag], dim=-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is the identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps norms


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    q = torch.randn(4, d, dtype=F64)
    k = torch.randn(4, d, dtype=F64)

    def score(m, n):
        cq, sq = rope_cos_sin(torch.tensor([m]), d, 10000.0, dtype=F64)
        ck, sk = rope_cos_sin(torch.tensor([n]), d, 10000.0, dtype=F64)
        qr = apply_rope(q[None, None], cq, sq)[0, 0]
        kr = apply_rope(k[None, None], ck, sk)[0, 0]
        return (qr * kr).sum(-1)

    base = score(5, 2)
    for shift in (1, 17, 1000):
        torch.testing.assert_close(score(5 + shift, 2 + shift), base, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(score(6, 2), base)  # and it does depend on the distance


def test_rope_per_batch_tables_and_errors():
    x = torch.randn(2, 3, 1, 4, dtype=F64)
    cos, sin = rope_cos_sin(torch.arange(3), 4, dtype=F64)
    y = apply_rope(x, cos[None].expand(2, 3, 4), sin[None].expand(2, 3, 4))
    torch.testing.assert_close(y, apply_rope(x, cos, sin))
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.arange(3), 5)
    assert math.isclose(float(rope_cos_sin(torch.tensor([1]), 4, dtype=F64)[0][0, 0]), math.cos(1.0))


def test_rope_table_matches_rope_cos_sin_and_grows() -> None:
    from mixlab.ops.attention import _ROPE_TABLES, rope_table

    _ROPE_TABLES.clear()
    cos, sin = rope_table(10, 8, 500.0, "cpu", F64)
    assert cos.shape == (1024, 8)  # at least 1024 positions, a power of two
    ref_cos, ref_sin = rope_cos_sin(torch.arange(1024), 8, 500.0, dtype=F64)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert rope_table(1000, 8, 500.0, "cpu", F64)[0] is cos  # cached
    longer, _ = rope_table(3000, 8, 500.0, "cpu", F64)
    assert longer.shape[0] == 4096 and torch.equal(longer[:1024], cos)


def test_rope_table_built_under_inference_mode_serves_autograd() -> None:
    from mixlab.ops.attention import _ROPE_TABLES, rope_table

    _ROPE_TABLES.clear()
    with torch.inference_mode():
        rope_table(16, 8, 10000.0, "cpu", torch.float32)
    cos, sin = rope_table(16, 8, 10000.0, "cpu", torch.float32)
    x = torch.randn(1, 16, 2, 8, requires_grad=True)
    apply_rope(x, cos[:16], sin[:16]).sum().backward()  # an inference tensor could not be saved for backward
    assert x.grad is not None


def test_compiled_attention_layer_takes_rope_from_the_table_not_from_trig_in_the_graph() -> None:
    from mixlab.layers.attention import Attention
    from mixlab.ops.attention import _ROPE_TABLES

    _ROPE_TABLES.clear()  # the first call builds the table, as a training run's first compiled step does
    torch.manual_seed(0)
    layer = Attention(d_model=32, n_heads=4)
    x = torch.randn(2, 24, 32)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(layer, backend=record)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, layer(x))
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")}
    assert graphs and not any("cos" in t or "sin" in t for t in targets), targets


def test_compiled_ops_trace_no_cached_probe(recwarn) -> None:
    """The backend and attention probes enter compiled graphs as constants: Dynamo finds no
    ``functools.lru_cache`` wrapper to warn about (it did on every compiled block)."""
    from torch._dynamo.utils import warn_once_cache

    from mixlab.layers.attention import Attention

    warn_once_cache.clear()
    torch._dynamo.reset()
    layer = Attention(d_model=32, n_heads=4, n_kv_heads=2)
    x = torch.randn(1, 8, 32)
    torch.compile(layer, backend="eager")(x)
    from mixlab.ops import triton_available

    out = torch.compile(lambda t: t + float(triton_available()), backend="eager")(x)
    torch._dynamo.reset()
    assert torch.equal(out, x + float(triton_available()))
    assert not [w for w in recwarn if "lru_cache" in str(w.message)]
