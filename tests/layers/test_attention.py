"""Attention layer: float64 definition, and full forward == prefill + decoding (full and ring-buffer caches)."""

from __future__ import annotations

import pytest
import torch

from mixlab.layers import Attention

F64 = torch.float64


def _layer(window=None, n_heads=4, n_kv_heads=2, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = Attention(32, n_heads=n_heads, n_kv_heads=n_kv_heads, window=window, dtype=dtype, **kw)
    with torch.no_grad():  # default nn.Linear init is fine, but make biases nonzero when present
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_()
    return layer


def naive_layer(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The layer's definition, written out: projections, complex RoPE, per-position softmax over the window."""
    b, t, _ = x.shape
    h, hkv, d = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(b, t, h, d)
    k = layer.k_proj(x).view(b, t, hkv, d)
    v = layer.v_proj(x).view(b, t, hkv, d)
    freqs = torch.tensor([layer.rope_theta ** (-2 * i / d) for i in range(d // 2)], dtype=F64)
    rot = torch.polar(torch.ones(t, d // 2, dtype=F64), torch.arange(t, dtype=F64)[:, None] * freqs)

    def rope(z):
        c = torch.complex(z[..., : d // 2], z[..., d // 2 :]) * rot[None, :, None, :]
        return torch.cat([c.real, c.imag], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.zeros(b, t, h, d, dtype=x.dtype)
    for i in range(t):
        lo = 0 if layer.window is None else max(0, i - layer.window + 1)
        for head in range(h):
            kv = head // (h // hkv)
            s = torch.einsum("bd,bjd->bj", q[:, i, head], k[:, lo : i + 1, kv]) / d**0.5
            out[:, i, head] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, lo : i + 1, kv])
    return layer.o_proj(out.reshape(b, t, h * d))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_attention_layer_matches_definition_float64(window, backend):
    layer = _layer(window=window, dtype=F64, qkv_bias=True, backend=backend)
    x = torch.randn(2, 9, 32, dtype=F64, requires_grad=True)
    y = layer(x)
    ref = naive_layer(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    params = [x, *layer.parameters()]
    for a, r in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def _decode(layer, x, splits, max_len):
    """Run x through the layer with a cache: a prefill of splits[0] tokens, then chunks of splits[1:]... (1 = steps)."""
    cache = layer.init_cache(x.shape[0], max_len)
    outs, pos = [], 0
    sizes = list(splits)
    while pos < x.shape[1]:
        n = sizes.pop(0) if sizes else 1
        outs.append(layer(x[:, pos : pos + n], cache=cache))
        pos += n
    assert cache.pos == x.shape[1]
    return torch.cat(outs, dim=1), cache


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("splits", [[0], [1], [5], [13], [20], [4, 3, 2], [8, 8, 4]])
@pytest.mark.parametrize("window", [None, 6])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(window, splits):
    """Full caches (window None) and ring buffers (window 6 < max_len): prompts shorter and longer
    than the window, one-token steps and multi-token chunks after the ring has wrapped."""
    layer = _layer(window=window)
    x = torch.randn(2, 20, 32)
    full = layer(x)
    y, cache = _decode(layer, x, [s for s in splits if s > 0] or [1], max_len=24)
    assert _rel_err(y, full) < 1e-5
    if window is not None:
        assert cache.ring and cache.k.shape[1] == window  # memory independent of the context length


@torch.no_grad()
def test_ring_buffer_memory_is_constant_and_continues_past_max_len():
    layer = _layer(window=4, n_kv_heads=1)
    x = torch.randn(1, 40, 32)
    full = layer(x)
    cache = layer.init_cache(1, max_len=1000)
    assert cache.k.shape == (1, 4, 1, layer.head_dim)
    y = torch.cat([layer(x[:, :11], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(11, 40)], 1)
    assert _rel_err(y, full) < 1e-5


@torch.no_grad()
def test_window_not_smaller_than_max_len_uses_a_plain_cache():
    layer = _layer(window=50)
    x = torch.randn(2, 12, 32)
    y, cache = _decode(layer, x, [5], max_len=12)
    assert not cache.ring and cache.k.shape[1] == 12
    assert _rel_err(y, layer(x)) < 1e-5


@torch.no_grad()
def test_cache_errors_name_the_fix():
    layer = _layer()
    cache = layer.init_cache(2, 4)
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(2, 5, 32), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        layer(torch.randn(3, 1, 32), cache=cache)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divide"):
        Attention(32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(30, n_heads=4)
    with pytest.raises(ValueError, match="even"):
        Attention(32, n_heads=4, head_dim=5)


def test_explicit_head_dim_and_cache_dtype():
    layer = Attention(32, n_heads=2, head_dim=24)
    assert layer.q_proj.out_features == 48 and layer.o_proj.in_features == 48
    cache = layer.init_cache(1, 8, dtype=torch.float64)
    assert cache.k.dtype == torch.float64 and cache.k.shape == (1, 8, 2, 24)
    assert layer.residual_out_proj == ("o_proj",)
