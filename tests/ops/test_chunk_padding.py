"""Small head dims run zero-padded (``chunk.MIN_HEAD_DIM_16BIT``, for 16-bit inputs on a GPU): the padded path
gives the unpadded one's outputs, final states and every gradient, for the delta rule (gated, packed
sequences, initial states) and SSD (scaled values, per-channel D). On the CPU the padding is forced by
patching ``chunk._padded_dims``; CPU under ``TRITON_INTERPRET=1`` at tiny shapes."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mixlab.ops._triton import chunk
from mixlab.ops.delta_rule.triton import delta_rule_triton
from mixlab.ops.ssd.triton import ssd_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def _grads(fn, leaves_in, **kw):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in leaves_in]
    out, ht = fn(*leaves, **kw)
    gen = torch.Generator().manual_seed(5)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)).sum()
    loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)).sum()
    loss.backward()
    return [out, ht] + [x.grad for x in leaves if x is not None]


def _padded(monkeypatch, K, V):
    seen = []

    def pad_to(q, k_dim, v_dim):
        seen.append((k_dim, v_dim))
        return K, V

    monkeypatch.setattr(chunk, "_padded_dims", pad_to)
    return seen


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_delta_rule_padded_equals_unpadded(monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 75, 2, 16, 8
    q = torch.randn(B, T, H, K, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g))
    gate = F.logsigmoid(torch.randn(B, T, H, generator=g)) / 4
    h0 = torch.randn(2, H, K, V, generator=g)
    cu = torch.tensor([0, 30, 75], device=DEVICE)
    xs = [t.to(DEVICE) for t in (q, k, v, beta, gate)]
    kw = dict(scale=0.25, initial_state=h0.to(DEVICE), output_final_state=True, cu_seqlens=cu)
    ref = _grads(lambda *a, initial_state, **k2: delta_rule_triton(*a, initial_state=initial_state, **k2), xs, **kw)
    seen = _padded(monkeypatch, 32, 24)
    new = _grads(lambda *a, initial_state, **k2: delta_rule_triton(*a, initial_state=initial_state, **k2), xs, **kw)
    assert seen  # the padded path ran
    for i, (a, b) in enumerate(zip(new, ref)):
        assert a.shape == b.shape and a.is_contiguous(), i
        assert _rel(a, b) < 1e-6, (i, _rel(a, b))


def test_ssd_padded_equals_unpadded(monkeypatch):
    g = torch.Generator().manual_seed(1)
    B, T, H, P, G, N = 2, 40, 4, 8, 1, 16
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.randn(B, T, H, generator=g) - 1
    A = -torch.rand(H, generator=g) - 0.5
    Bm, Cm = torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)
    D = torch.randn(H, P, generator=g)
    h0 = torch.randn(B, H, P, N, generator=g)
    leaves = [t.to(DEVICE) for t in (x, dt, A, Bm, Cm, D, h0)]

    def run(x, dt, A, Bm, Cm, D, h0):
        return ssd_triton(x, dt, A, Bm, Cm, D=D, dt_softplus=True, initial_state=h0, output_final_state=True)

    ref = _grads(run, leaves)
    seen = _padded(monkeypatch, 32, 16)
    new = _grads(run, leaves)
    assert seen
    for i, (a, b) in enumerate(zip(new, ref)):
        assert a.shape == b.shape, i
        # dA (index 4) sums over every token with cancellation: 1.1e-6 apart on the H100 in float32
        assert _rel(a, b) < (1e-5 if i == 4 else 1e-6), (i, _rel(a, b))


def test_padding_rule():
    """Only 16-bit inputs on a GPU are padded, and only the dims below the minimum (V's depends on K)."""
    cpu16 = torch.empty(1, dtype=torch.bfloat16)
    assert chunk._padded_dims(cpu16, 16, 16) == (16, 16)
    if torch.cuda.is_available():
        for dt in (torch.float16, torch.bfloat16):
            q = torch.empty(1, dtype=dt, device="cuda")
            assert chunk._padded_dims(q, 16, 128) == (32, 128)
            assert chunk._padded_dims(q, 32, 16) == (32, 32)
            assert chunk._padded_dims(q, 128, 32) == (128, 64)
            assert chunk._padded_dims(q, 128, 128) == (128, 128)
        assert chunk._padded_dims(torch.empty(1, device="cuda"), 16, 16) == (16, 16)
