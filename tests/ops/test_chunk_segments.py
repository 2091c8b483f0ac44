"""The backward's state recompute in parallel segments (``chunk.recompute_segment_chunks``).

With few long sequences the forward stores the float32 state entering every segment (``SAVE_SEG``) and the
backward's ``_fwd_h_kernel`` runs each segment from it (``FROM_SEG``). Checked here: which shapes segment, the
stored states against the per-chunk states of a run that keeps them, and every gradient against the unsegmented
backward and the float64 references, for the delta rule (gated or not, fused or split forward), SSD with scaled
values, and the lean layer ops of Mamba2 and (Gated) DeltaNet that carry the states from forward to backward.
CPU under ``TRITON_INTERPRET=1`` at tiny shapes; ``seg_min_chunks`` 1 lets a few chunks make several segments.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mixlab.ops._triton import chunk
from mixlab.ops.delta_rule.reference import delta_rule_reference
from mixlab.ops.delta_rule.triton import delta_rule_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"
fused = importlib.import_module("mixlab.ops.ssd.triton.fused")
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the layer ops' CPU paths need TRITON_INTERPRET=1"
)


def _segments(monkeypatch, on: bool) -> None:
    """Segment whenever a sequence has two chunks or more (on), or never (off)."""
    cfg = {**chunk.CONFIG["fwd_h"], "seg_state_elems": 1 << 60 if on else 0, "seg_min_chunks": 1}
    monkeypatch.setitem(chunk.CONFIG, "fwd_h", cfg)


class _Grids:
    """Records the launch grids of ``_fwd_h_kernel``."""

    def __init__(self, monkeypatch):
        self.grids: list[tuple[int, ...]] = []
        real = chunk._fwd_h_kernel

        class Spy:
            def __getitem__(_, grid):
                self.grids.append(tuple(grid))
                return real[grid]

        monkeypatch.setattr(chunk, "_fwd_h_kernel", Spy())


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _delta_inputs(seed, B, T, H, K, V, gated):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xs = [rn(B, T, H, K), F.normalize(rn(B, T, H, K), dim=-1), rn(B, T, H, V), torch.sigmoid(rn(B, T, H)),
          F.logsigmoid(rn(B, T, H)) / 8 if gated else None, rn(B, H, K, V) * 0.5]  # fmt: skip
    return [x.to(DEVICE, torch.float32) if x is not None else None for x in xs]


def _delta_run(fn, xs, scale=0.3):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
    o, ht = fn(*leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return [o, ht] + [x.grad for x in leaves if x is not None]


def test_which_shapes_segment(monkeypatch):
    """Defaults: segments only below ``seg_state_elems`` state values in parallel, in powers of two, never for
    packed sequences or sequences of fewer than 2·``seg_min_chunks`` chunks."""
    cfg = chunk.CONFIG["fwd_h"]
    monkeypatch.setitem(chunk.CONFIG, "fwd_h", {**cfg, "seg_state_elems": 1 << 21, "seg_min_chunks": 16})

    def seg(B, T, H, K, V, cu=None):
        lay = chunk._Layout(B, T, torch.tensor(cu) if cu else None, torch.device("cpu"))
        return chunk.recompute_segment_chunks(lay, H, K, V)

    assert seg(32, 2048, 16, 128, 128) == 0  # 8M state values: enough
    assert seg(8, 8192, 16, 128, 128) == 0  # 2M
    assert seg(4, 16384, 16, 128, 128) == 128  # 1M: two segments of 128 chunks
    assert seg(2, 32768, 16, 128, 128) == 128  # 512K: four
    assert seg(2, 32768, 64, 128, 64) == 256  # SSD H64 P64 N128: 1M, two
    assert seg(2, 16384, 6, 256, 512) == 0  # K 256 (the 1.3b Gated DeltaNet shape): never
    assert seg(1, 1984, 1, 128, 128) == 0  # 31 chunks: too few to halve
    assert seg(1, 2048, 1, 128, 128) == 16  # 32 chunks: halved once (segments keep 16 chunks)
    assert seg(1, 65536, 1, 128, 128, cu=[0, 65536]) == 0  # packed: never
    lay = chunk._Layout(2, 300, None, torch.device("cpu"))
    assert lay.segments(2) == (3, 6)  # 5 chunks a sequence: segments of 2, 2 and 1


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("fused_fwd", [1, 0])
def test_delta_rule_segmented_recompute(gated, fused_fwd, monkeypatch):
    """Same values and gradients as the unsegmented backward, and as float64; the recompute ran segmented."""
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": fused_fwd})
    xs = _delta_inputs(3, 2, 300, 2, 16, 16, gated)  # 5 chunks a sequence: 4 -> segments of 2, 2, 1
    _segments(monkeypatch, False)
    base = _delta_run(delta_rule_triton, xs)
    _segments(monkeypatch, True)
    spy = _Grids(monkeypatch)
    seg = _delta_run(delta_rule_triton, xs)
    assert spy.grids[-1] == (1, 4, 3), spy.grids  # (V tiles, sequences x heads, segments)
    ref = _delta_run(delta_rule_reference, [x.double() if x is not None else None for x in xs])
    names = ["o", "ht", "dq", "dk", "dv", "dbeta"] + (["dg"] if gated else []) + ["dh0"]
    assert len(names) == len(seg)
    for name, a, b, r in zip(names, seg, base, ref):
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
        assert _rel(a, r) < 1e-5, (name, _rel(a, r))
    assert seg[names.index("dh0")].abs().max() > 0.1


@pytest.mark.parametrize("fused_fwd", [1, 0])
def test_stored_segment_states_are_the_chunk_states(fused_fwd, monkeypatch):
    """``hs`` holds, per sequence and segment, the state entering its first chunk, as the forward that keeps every
    chunk's state has it (the initial state for the first segment)."""
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": fused_fwd})
    q, k, v, beta, g, h0 = _delta_inputs(5, 2, 300, 2, 16, 16, gated=True)
    args = (q, k, v, beta, g, 0.3, h0, True, None, True)
    _segments(monkeypatch, True)
    o, ht, *_, h, _, hs = chunk.chunk_fwd(*args)
    assert h is None and hs.shape == (6, 2, 16, 16) and hs.dtype == torch.float32
    o_keep, ht_keep, *_, h_keep, _, hs_keep = chunk.chunk_fwd(*args, keep_states=True)
    assert hs_keep is None  # kept states need no segments
    starts = [n * 5 + c for n in range(2) for c in (0, 2, 4)]  # chunk index of each segment's start
    assert _rel(hs, h_keep[starts]) < 1e-6
    assert torch.equal(hs[0], h0[0]) and torch.equal(hs[3], h0[1])
    assert _rel(o, o_keep) < 1e-6 and _rel(ht, ht_keep) < 1e-6


def test_segment_states_of_a_foreign_layout_are_refused(monkeypatch):
    q, k, v, beta, g, h0 = _delta_inputs(6, 2, 300, 2, 16, 16, gated=True)
    _segments(monkeypatch, True)
    o, _, Tm, w, u, _, _, hs = chunk.chunk_fwd(q, k, v, beta, g, 0.3, h0, True, None, True)
    do = torch.randn_like(o)
    with pytest.raises(ValueError, match="segment states"):
        chunk.chunk_bwd(q, k, v, beta, g, 0.3, h0, None, Tm, w, u, do, None, True, hs=hs[:3])


@pytest.mark.parametrize("fused_fwd", [1, 0])
def test_ssd_segmented_recompute(fused_fwd, monkeypatch):
    """SSD with scaled values (x·dt formed on load, D skip, z gate), the state kernels with and without the fused
    forward: same values and gradients as unsegmented."""
    from mixlab.ops.ssd.triton import ssd_triton

    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": fused_fwd})
    g = torch.Generator().manual_seed(11)
    b, T, H, P, G, N = 2, 200, 4, 16, 2, 16  # 4 chunks a sequence: segments of 1

    def rn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    xs = [rn(b, T, H, P), rn(b, T, H) - 1, -torch.exp(rn(H) * 0.5), rn(b, T, G, N), rn(b, T, G, N)]
    extra = {"D": rn(H), "z": rn(b, T, H, P), "dt_bias": rn(H) * 0.3, "initial_state": rn(b, H, P, N) * 0.5}

    def run():
        leaves = [x.clone().requires_grad_() for x in xs]
        kw = {k: v.clone().requires_grad_() for k, v in extra.items()}
        y, ht = ssd_triton(*leaves, dt_softplus=True, output_final_state=True, **kw)
        w = torch.linspace(-1, 1, y.numel()).view_as(y).to(y.device)
        ((y * w).sum() + ht.square().sum()).backward()
        return [y, ht] + [x.grad for x in leaves] + [v.grad for v in kw.values()]

    _segments(monkeypatch, False)
    base = run()
    _segments(monkeypatch, True)
    spy = _Grids(monkeypatch)
    seg = run()
    assert spy.grids[-1][1:] == (b * H, 4), spy.grids
    for i, (a, r) in enumerate(zip(seg, base)):
        assert _rel(a, r) < 1e-6, (i, _rel(a, r))


@pytest.mark.parametrize("target", ["chunk", "ssd"])
def test_fake_shapes_match_with_segments(target, monkeypatch):
    """The custom ops' fake implementations give ``hs`` the real shape (torch.compile allocates from them)."""
    _segments(monkeypatch, True)
    gen = torch.Generator().manual_seed(2)
    if target == "chunk":
        q, k, v, beta, g, h0 = _delta_inputs(8, 2, 150, 1, 16, 16, gated=True)
        args = (q, k, v, beta, g, 0.25, h0, True, None, True)
        op = torch.ops.mixlab.chunk_gated_delta_fwd.default
    else:
        x = torch.randn(2, 150, 2, 16, generator=gen).to(DEVICE)
        dt = torch.randn(2, 150, 2, generator=gen).to(DEVICE)
        A = -torch.rand(2, generator=gen).to(DEVICE) - 0.5
        bc = torch.randn(2, 150, 1, 16, generator=gen).to(DEVICE)
        args = (x, dt, A, bc, bc.clone(), None, None, None, None, True, False, None)
        op = fused.ssd_fused_fwd
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    assert op(*args)[-1].shape[0] == 2 * 2  # 3 chunks a sequence: segments of 2 and 1
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _layer_segmented_equals_unsegmented(layer, x, monkeypatch, context=contextlib.nullcontext):
    """Output and every gradient of ``layer(x)`` with the recompute segmented equal those without; the segmented
    recompute ran (a 3-D grid of two segments)."""

    def run():
        with context():
            y = layer(x)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        return [y, *torch.autograd.grad((y * w).sum(), [x, *layer.parameters()])]

    _segments(monkeypatch, False)
    base = run()
    _segments(monkeypatch, True)
    spy = _Grids(monkeypatch)
    seg = run()
    assert any(len(grid) == 3 and grid[2] == 2 for grid in spy.grids), spy.grids
    for a, b in zip(seg, base):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@needs_interpreter
def test_mamba2_lean_op_carries_the_segment_states(monkeypatch):
    """Mamba2's lean mixer op saves the SSD's segment states for its backward: same gradients as unsegmented."""
    import mixlab.layers.mamba2 as m2

    torch.manual_seed(0)
    layer = m2.Mamba2(32, d_state=8, headdim=16, backend="triton")
    monkeypatch.setattr(m2, "LEAN_MIX", True)
    x = torch.randn(2, 100, 32, requires_grad=True)  # 2 chunks a sequence: two segments
    _layer_segmented_equals_unsegmented(layer, x, monkeypatch)


@needs_interpreter
@pytest.mark.parametrize("gated", [True, False])
def test_deltanet_lean_op_carries_the_segment_states(gated, monkeypatch):
    """(Gated) DeltaNet's lean op saves the delta op's segment states for its backward."""
    from mixlab.bench.activations import _force_triton
    from mixlab.layers.deltanet import DeltaNet, GatedDeltaNet

    torch.manual_seed(0)
    kw = dict(n_heads=2, head_dim=16, backend="triton")
    layer = GatedDeltaNet(24, **kw) if gated else DeltaNet(24, use_output_gate=False, **kw)
    layer.lean = True
    x = torch.randn(1, 100, 24, requires_grad=True)
    _layer_segmented_equals_unsegmented(layer, x, monkeypatch, _force_triton)


def test_config_overrides_get_their_own_compile_cache():
    """An override of the launch table (which may change output shapes) compiles into its own inductor cache."""
    import subprocess
    import sys

    code = "import os, mixlab.ops._triton.chunk as c; print(c.CONFIG['fwd_h']['seg_state_elems'], os.environ.get('TORCHINDUCTOR_CACHE_DIR'))"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    outs = []
    for cfg in ('{"fwd_h": {"seg_state_elems": 0}}', '{"fwd_h": {"seg_state_elems": 4}}'):
        run = subprocess.run([sys.executable, "-c", code], env={**env, "MIXLAB_TRITON_CHUNK_CONFIG": cfg},
                             capture_output=True, text=True, check=True)  # fmt: skip
        outs.append(run.stdout.split())
    assert [o[0] for o in outs] == ["0", "4"]
    assert outs[0][1] != outs[1][1] and all("mixlab-config-" in o[1] for o in outs)


def test_compile_with_dynamic_lengths(monkeypatch):
    """torch.compile with dynamic shapes traces the segment states' shape symbolically (the fake implementation's
    rule on symbolic T): values and gradients equal eager at three lengths of 3, 4 and 5 chunks."""
    _segments(monkeypatch, True)
    torch._dynamo.reset()

    def f(q, k, v, beta, g):
        o, ht = delta_rule_triton(q, k, v, beta, g, output_final_state=True)
        return (o * o).sum() + ht.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (150, 200, 260):
        xs = [x.requires_grad_() for x in _delta_inputs(T, 2, T, 2, 16, 16, gated=True)[:5]]
        assert chunk.segment_states_shape(2, T, 2, 16, 16, packed=False)[0] > 2  # segmented
        a = compiled(*xs)
        grads = torch.autograd.grad(a, xs)
        b = f(*xs)
        for x, y in zip(grads, torch.autograd.grad(b, xs)):
            assert torch.equal(x, y)
        assert torch.equal(a, b)
    torch._dynamo.reset()
