"""The lean Triton training path of DeltaNet / Gated DeltaNet (``DeltaNet.lean``): the same outputs and
gradients as the unfused ops, fewer bytes saved for backward (no conv / L2-norm / output-norm results).

The kernels run on the CPU under ``TRITON_INTERPRET=1`` (bf16 through ``patched_bf16`` of
tests/conftest.py); :func:`mixlab.bench.activations._force_triton` makes ``backend="auto"`` of the
conv and norm ops resolve to Triton as on CUDA, so both paths run the same kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util

import pytest
import torch

from mixlab.bench.activations import _force_triton, block_saved_bytes
from mixlab.layers.deltanet import DeltaNet, GatedDeltaNet

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (run on the CPU under TRITON_INTERPRET=1)",
)
KIB = 1024


def _layer(gated: bool, dtype=torch.float32) -> DeltaNet:
    torch.manual_seed(0)
    kw = dict(n_heads=2, head_dim=16, backend="triton", dtype=dtype)
    layer = GatedDeltaNet(24, **kw) if gated else DeltaNet(24, expand_v=1.5, use_output_gate=False, **kw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 and "conv" not in name:
                p.normal_(0, 0.2)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return layer


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, name: str = "") -> None:
    """``max |a - b| <= tol * max |b|`` (and equal dtypes)."""
    assert a.dtype == b.dtype, name
    err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} vs max {scale:.3g}"


def _run(layer: DeltaNet, lean: bool, x: torch.Tensor, dy: torch.Tensor, amp: torch.dtype | None):
    """Output and gradients (x and every parameter) of ``layer(x)`` with ``lean`` on or off; also the
    number of lean forward calls."""
    from mixlab.layers import deltanet as mod

    calls = []
    fwd = mod._lean_qkv_delta
    mod._lean_qkv_delta = lambda *a: calls.append(1) or fwd(*a)
    inner = getattr(layer, "_orig_mod", layer)  # a compiled module runs the same parameters
    inner.lean = lean
    inner.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    try:
        with _force_triton(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            y = layer(x)
        (y.float() * dy).sum().backward()
    finally:
        mod._lean_qkv_delta = fwd
    grads = {"x": x.grad, **{n: p.grad for n, p in inner.named_parameters()}}
    return y.detach(), grads, len(calls)


@pytest.mark.parametrize("gated", [True, False])
def test_lean_path_equals_the_unfused_ops_fp32(gated):
    layer = _layer(gated)
    x = torch.randn(1, 20, 24)
    dy = torch.randn(1, 20, 24)
    y0, g0, n0 = _run(layer, False, x, dy, None)
    y1, g1, n1 = _run(layer, True, x, dy, None)
    assert (n0, n1) == (0, 1)
    _close(y1, y0, 1e-5)  # the L2 norm's sum and rsqrt round differently in the fused kernel
    assert g1.keys() == g0.keys() and all(g is not None for g in g1.values())
    for name in g0:
        _close(g1[name], g0[name], 1e-5, name)


@pytest.mark.parametrize("gated", [True, False])
def test_lean_path_equals_the_unfused_ops_under_bf16_autocast(gated, bf16_interpreter):
    layer = _layer(gated)
    x = torch.randn(1, 20, 24)
    dy = torch.randn(1, 20, 24)
    y0, g0, _ = _run(layer, False, x, dy, torch.bfloat16)
    y1, g1, n1 = _run(layer, True, x, dy, torch.bfloat16)
    assert n1 == 1 and y1.dtype == y0.dtype == torch.bfloat16
    _close(y1, y0, 1e-2)  # a bf16 rounding of q or k may flip
    for name in g0:
        _close(g1[name], g0[name], 1e-2, name)


def test_cache_and_no_grad_keep_the_unfused_path():
    layer = _layer(True)
    x = torch.randn(1, 5, 24)
    with _force_triton():
        assert layer._lean_ok(x, None)
        assert not layer._lean_ok(x, layer.init_cache(1, 8))
        with torch.no_grad():
            assert not layer._lean_ok(x, None)
    assert not _layer(True, torch.float64)._lean_ok(x.double(), None)


@pytest.mark.parametrize(("preset", "budget_kib"), [("gated_deltanet-1.3b", 73), ("deltanet-1.3b", 66.5)])
def test_lean_layer_saves_no_conv_l2_or_norm_output(preset, budget_kib):
    """1.3b widths, the Triton ops' saves (fake tensors): the unfused path saved 90.7 / 82.3 KiB a token,
    of which the conv outputs, L2-norm outputs and the output norm's result (o_proj's input) ~18 / 16 KiB."""
    r = block_saved_bytes(preset, seq_lens=(64, 128))
    assert 0 < r.total <= budget_kib * KIB, r.by_site
    banned = ("ops/conv/", "l2_normalize", "ops/delta_rule/", "ops/norm_triton")
    assert not [s for s in r.by_site if any(b in s for b in banned)], r.by_site
    layer = {s: b for s, b in r.by_site.items() if s.startswith("layers/deltanet.py")}
    # x for the projections (4 KiB), qp/kp/vp + Tm/w/u, o and the gate z (+ rstd, beta, g)
    assert sum(layer.values()) <= (budget_kib - 30) * KIB, layer


def _saved_per_token(fn, layer: DeltaNet, seq_lens=(16, 32)) -> float:
    """Bytes per token that ``fn(x)`` saves for backward (distinct storages, parameters excluded)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    params = {StorageWeakRef(p.untyped_storage()) for p in layer.parameters()}
    totals = []
    for T in seq_lens:
        seen: dict = {}

        def pack(t, seen=seen):
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in params:
                seen[ref] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, T, layer.d_model, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _force_triton():
            fn(x)
        totals.append(sum(seen.values()))
    return (totals[1] - totals[0]) / (seq_lens[1] - seq_lens[0])


def test_compiled_lean_layer_saves_what_eager_saves_and_agrees():
    """``torch.compile`` (aot_eager: AOTAutograd's partitioner, no codegen) keeps the lean saving: the
    custom ops are opaque, so the partitioner cannot keep the recomputed conv / norm results instead."""
    layer = _layer(True)
    eager_lean = _saved_per_token(layer, layer)
    compiled = torch.compile(layer, backend="aot_eager")
    assert _saved_per_token(compiled, layer) <= eager_lean
    layer.lean = False
    # the unfused path saves the conv outputs of q, k, v and o_proj's input; the lean one its projection's b, a and
    # padding columns (64 here: as many as q, k and v together at these toy widths, 0.8% of them at 1.3b)
    assert _saved_per_token(layer, layer) >= eager_lean + 4 * (2 * 32 + 2 * 64) - 4 * 64
    layer.lean = True
    x, dy = torch.randn(1, 20, 24), torch.randn(1, 20, 24)
    y0, g0, _ = _run(layer, True, x, dy, None)
    y1, g1, _ = _run(compiled, True, x, dy, None)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)


def test_lean_layer_under_outer_activation_checkpointing():
    """A whole-block ``torch.utils.checkpoint`` around the lean ops (as train/parallel.py applies it,
    and compiled): the recomputed forward gives the same gradients."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(True)
    x, dy = torch.randn(1, 20, 24), torch.randn(1, 20, 24)
    y0, g0, _ = _run(layer, True, x, dy, None)
    ckpt = torch.nn.Module()
    ckpt.forward = lambda x: checkpoint(layer, x, use_reentrant=False)
    for fn in (ckpt.forward, torch.compile(ckpt.forward, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with _force_triton():
            y1 = fn(xx)
        (y1 * dy).sum().backward()
        torch.testing.assert_close(y1.detach(), y0, rtol=0, atol=0)
        torch.testing.assert_close(xx.grad, g0["x"], rtol=1e-6, atol=1e-6)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, g0[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("gated", [True, False])
def test_in_projection_is_the_separate_projections_padded(gated):
    """One GEMM for q, k, v, b (and a): their outputs side by side, then zeros up to a 16-byte-aligned width."""
    from mixlab.layers.deltanet import PROJ_ALIGN, _in_projection

    layer = _layer(gated)
    x = torch.randn(2, 5, 24)
    proj = _in_projection(layer, x)
    parts = [layer.q_proj, layer.k_proj, layer.v_proj, layer.b_proj] + ([layer.a_proj] if gated else [])
    ref = torch.cat([p(x) for p in parts], -1)
    assert proj.shape[-1] % PROJ_ALIGN == 0 and 0 <= proj.shape[-1] - ref.shape[-1] < PROJ_ALIGN
    torch.testing.assert_close(proj[..., : ref.shape[-1]], ref, rtol=1e-6, atol=1e-6)
    assert (proj[..., ref.shape[-1] :] == 0).all()


@pytest.mark.parametrize("gated", [True, False])
def test_lean_backward_writes_every_column_of_the_projection_gradient(gated, monkeypatch):
    """The lean backward allocates the projection's gradient uninitialised: with every fresh float tensor full of
    NaN, the gate and padding columns must still be written (a NaN left there reaches dx through the GEMM)."""
    layer = _layer(gated)
    x, dy = torch.randn(1, 20, 24), torch.randn(1, 20, 24)
    y0, g0, _ = _run(layer, True, x, dy, None)
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    y1, g1, _ = _run(layer, True, x, dy, None)
    monkeypatch.undo()
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)


def test_kept_states_skip_the_recompute_and_change_nothing(monkeypatch):
    """``DeltaNet.keep_states``: the lean op's forward keeps h and V_new, its backward runs no state pass of its
    own (one ``_chunk_h`` call per step instead of two), outputs and gradients are bit-identical, and the saved
    bytes grow by :meth:`DeltaNet.kept_state_bytes_per_token` (float32 here: 4-byte elements)."""
    from mixlab.ops._triton import chunk

    calls = []
    real = chunk._chunk_h
    monkeypatch.setattr(chunk, "_chunk_h", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": 0})  # both sides unfused
    layer = _layer(True)
    x, dy = torch.randn(2, 70, 24), torch.randn(2, 70, 24)  # two chunks of 64 and a partial one
    y0, g0, _ = _run(layer, True, x, dy, None)
    assert len(calls) == 2
    layer.keep_states = True
    y1, g1, _ = _run(layer, True, x, dy, None)
    assert len(calls) == 3
    assert torch.equal(y1, y0)
    for name in g0:
        assert torch.equal(g1[name], g0[name]), name
    saved = {}
    for keep in (False, True):
        layer.keep_states = keep
        saved[keep] = _saved_per_token(layer, layer, seq_lens=(64, 128))
    assert saved[True] - saved[False] == layer.kept_state_bytes_per_token(4)


def test_kept_states_decide_the_compiled_graph(monkeypatch):
    """The decision is an argument of the custom op, so a compiled layer follows the attribute (a guard
    recompiles it), each graph's fake shapes match what its kernels return, and the kept graph skips the
    backward's state pass."""
    from mixlab.ops._triton import chunk

    calls = []
    real = chunk._chunk_h
    monkeypatch.setattr(chunk, "_chunk_h", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": 0})  # the state pass apart
    layer = _layer(True)
    compiled = torch.compile(layer, backend="aot_eager")
    x, dy = torch.randn(1, 70, 24), torch.randn(1, 70, 24)
    y0, g0, _ = _run(layer, True, x, dy, None)
    for keep in (True, False):
        layer.keep_states = keep
        calls.clear()
        y1, g1, _ = _run(compiled, True, x, dy, None)
        assert len(calls) == (1 if keep else 2)
        torch.testing.assert_close(y1, y0, rtol=0, atol=0)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)
