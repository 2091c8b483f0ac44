"""Mamba2's lean training op ``mixlab::mamba2_mix_fwd``: same values and gradients as the separate ops,
and only the in_proj output and the SSD output kept for backward (eager and under ``torch.compile``).

The Triton kernels run on the CPU under ``TRITON_INTERPRET=1``; bf16 through tests/conftest.py's
:func:`patched_bf16` (the interpreter's raw bf16 arithmetic is garbage otherwise).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import mixlab.layers.mamba2 as m2
from mixlab.bench.activations import _force_triton, block_saved_bytes

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (run on the CPU under TRITON_INTERPRET=1)",
)
KIB = 1024


def _layer(ngroups=1, bias=False, norm_before_gate=False):
    torch.manual_seed(0)
    layer = m2.Mamba2(
        32, d_state=8, headdim=16, ngroups=ngroups, bias=bias, norm_before_gate=norm_before_gate, backend="triton"
    )
    with torch.no_grad():  # away from the init's ones so that their gradients are tested
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.D.uniform_(0.5, 1.5)
    return layer


def _run(layer, x, lean, amp=None, fn=None):
    """Output and gradients of ``x`` and every parameter; asserts which path ran."""
    old = m2.LEAN_MIX
    m2.LEAN_MIX = lean
    try:
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            y = (layer if fn is None else fn)(x)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        grads = torch.autograd.grad((y.float() * w).sum(), [x, *layer.parameters()])
    finally:
        m2.LEAN_MIX = old
    return [y, *grads]


def _names(layer):
    return ["y", "x"] + [n for n, _ in layer.named_parameters()]


@needs_triton
@pytest.mark.parametrize(
    ("ngroups", "bias", "norm_before_gate", "fold"),
    [(1, False, False, True), (2, True, True, True), (1, True, False, False)],
)
def test_lean_mix_equals_the_separate_ops_float32(ngroups, bias, norm_before_gate, fold, monkeypatch):
    """fold: the x channels' conv backward forms their gradient from SSD's values gradient (else a values pass)."""
    monkeypatch.setattr(m2, "FOLD_VALUES_INTO_CONV", fold)
    layer = _layer(ngroups, bias, norm_before_gate)
    x = torch.randn(2, 24, 32, requires_grad=True)
    calls = []
    real = m2.mamba2_mix_fwd
    monkeypatch.setattr(m2, "mamba2_mix_fwd", lambda *a: calls.append(1) or real(*a))
    ref = _run(layer, x, lean=False)
    assert not calls
    new = _run(layer, x, lean=True)
    assert calls
    with torch.no_grad():  # inference keeps the separate ops (and the recurrent SSD kernel for short inputs)
        layer(x)
    assert len(calls) == 1
    for n, a, b in zip(_names(layer), ref, new):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item(), msg=n)


@needs_triton
def test_lean_mix_equals_the_separate_ops_bf16_autocast(bf16_interpreter, monkeypatch):
    """The separate ops on their Triton kernels too (on the CPU "auto" picks the plain conv and norm). Without the
    values fold both paths run the same kernels (the D skip inside the SSD kernels), so the forward and every
    gradient are bit-identical. With it the conv output's gradient stays float32 instead of being stored in bf16:
    the forward is identical and every gradient is at least as close to the float32 layer's."""
    layer = _layer(ngroups=1)
    x = torch.randn(1, 40, 32, requires_grad=True)
    ref32 = _run(layer, x, lean=False)
    with _force_triton():
        ref = _run(layer, x, lean=False, amp=torch.bfloat16)
        monkeypatch.setattr(m2, "FOLD_VALUES_INTO_CONV", False)
        new = _run(layer, x, lean=True, amp=torch.bfloat16)
        monkeypatch.setattr(m2, "FOLD_VALUES_INTO_CONV", True)
        fold = _run(layer, x, lean=True, amp=torch.bfloat16)
    for n, a, b, f, r in zip(_names(layer), ref, new, fold, ref32):
        assert a.dtype == b.dtype == f.dtype and torch.isfinite(f).all(), n
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
        err_fold, err = ((t.float() - r).norm().item() / r.norm().item() for t in (f, a))
        assert err_fold <= 1.05 * err + 1e-6, (n, err_fold, err)
    assert torch.equal(fold[0], ref[0])


def _saved_storages(layer, x, fn=None):
    """Sorted nbytes of the storages saved for backward by ``fn(x)`` under bf16 autocast, leaving out
    parameters and their autocast copies (any tensor shaped as a parameter, transposed or not)."""
    params = {StorageWeakRef(p.untyped_storage()) for p in layer.parameters()}
    shapes = {tuple(sorted(p.shape)) for p in layer.parameters()}
    seen = {}

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in params and tuple(sorted(t.shape)) not in shapes:
            seen[ref] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        (layer if fn is None else fn)(x)
    return sorted(seen.values(), reverse=True)


@needs_triton
def test_lean_mix_keeps_only_the_in_proj_input_and_output_and_the_ssd_output():
    layer = _layer()
    B, T = 2, 24
    x = torch.randn(B, T, 32, requires_grad=True)
    saved = _saved_storages(layer, x)
    # bf16 in_proj input, in_proj output (z, xBC, dt) and SSD output y; nothing else above a few bytes a
    # token: no conv output, no v = x·dt, no z copy, no norm output
    width = 2 * layer.d_inner + 2 * layer.d_state + layer.nheads
    expect = sorted([B * T * width * 2, B * T * layer.d_inner * 2, B * T * 32 * 2], reverse=True)
    assert [b for b in saved if b >= B * T * 4] == expect, saved


def test_1_3b_mamba2_block_saves_at_most_33_kib_per_token():
    r = block_saved_bytes("mamba2-1.3b", seq_lens=(64, 128))
    assert 0 < r.total <= 33 * KIB, r.by_site
    sites = " ".join(r.by_site)
    for gone in ("conv", "norm_triton", "ssd"):
        assert gone not in sites, r.by_site


@needs_triton
def test_lean_mix_under_compile_aot_eager_same_grads_and_saved_bytes():
    layer = _layer(ngroups=2, bias=True)
    x = torch.randn(2, 24, 32, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    ref = _run(layer, x, lean=True)
    new = _run(layer, x, lean=True, fn=compiled)
    for n, a, b in zip(_names(layer), ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    assert _saved_storages(layer, x, fn=compiled) == _saved_storages(layer, x)


@needs_triton
def test_lean_mix_under_whole_block_checkpoint():
    layer = _layer()
    x = torch.randn(2, 24, 32, requires_grad=True)
    ref = _run(layer, x, lean=True)
    new = _run(layer, x, lean=True, fn=lambda t: torch.utils.checkpoint.checkpoint(layer, t, use_reentrant=False))
    for n, a, b in zip(_names(layer), ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
