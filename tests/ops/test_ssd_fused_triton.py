"""Fused SSD elementwise kernels (``mixlab::ssd_fused_fwd`` / ``_bwd``) vs the PyTorch autograd path
(``FUSED = False``) and the float64 chunked backend.

Every option: D absent / ``[H]`` / ``[H, P]``, z absent, dt_bias absent, no softplus, grouped B/C,
packed sequences, initial / final state, strided x (a split view), P not a power of two, several
token blocks per head (small tiles), softplus far in both tails. Outputs and every gradient.
CPU under ``TRITON_INTERPRET=1`` at tiny shapes.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops.ssd.chunked import ssd_chunked
from mixlab.ops.ssd.triton import fused, ssd_triton

ssd_tri = importlib.import_module("mixlab.ops.ssd.triton")  # (mixlab.ops.ssd is also a function's name)
DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"
NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16×P elements and 16-token dt blocks so that tiny inputs still span several token blocks
    (partial sums)."""
    monkeypatch.setattr(fused, "TILE", dict.fromkeys(fused.TILE, 256))
    monkeypatch.setattr(fused, "DT_TOKENS", 16)


def _inputs(seed, b, T, H=4, P=16, G=2, N=16, nseq=None, dtype=torch.float32, D="H", dt_shift=-1.0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    xs = {
        "x": rn(b, T, H, P),
        "dt": rn(b, T, H) * 2 + dt_shift,
        "A": -torch.exp(rn(H) * 0.5),
        "B": rn(b, T, G, N),
        "C": rn(b, T, G, N),
        "D": {"H": rn(H), "HP": rn(H, P), None: None}[D],
        "z": rn(b, T, H, P),
        "dt_bias": rn(H) * 0.3,
        "initial_state": rn(nseq or b, H, P, N) * 0.5,
    }
    low = {"x", "B", "C", "z"}
    return {k: v.to(device=DEVICE, dtype=dtype if k in low else torch.float32) if v is not None else None
            for k, v in xs.items()}  # fmt: skip


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run(fn, xs, *, softplus=True, final=True, cu_seqlens=None, strided_x=False, **extra):
    leaves = {k: v.detach().clone().requires_grad_() if v is not None else None for k, v in xs.items()}
    x = leaves["x"]
    if strided_x:  # x as a view into a wider per-token buffer, as Mamba2 splits the conv output
        b, T, H, P = x.shape
        wide = torch.cat([x.reshape(b, T, H * P), torch.zeros(b, T, 5, dtype=x.dtype, device=x.device)], -1)
        x = wide[..., : H * P].reshape(b, T, H, P)
        assert not x.is_contiguous()
    y, ht = fn(
        x, *(leaves[k] for k in NAMES[1:5]), D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"],
        dt_softplus=softplus, initial_state=leaves["initial_state"], output_final_state=final,
        cu_seqlens=cu_seqlens, **extra,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(99)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)).sum()
    if final:
        loss = loss + (ht.double() * torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)).sum()
    loss.backward()
    return y, ht, {k: v.grad for k, v in leaves.items() if v is not None and v.grad is not None}


def _unfused(*args, **kw):
    old = ssd_tri.FUSED
    ssd_tri.FUSED = False
    try:
        return ssd_triton(*args, **kw)
    finally:
        ssd_tri.FUSED = old


def _check(xs, tol_pt, tol_ref, **kw):
    """Fused vs the unfused PyTorch path (``tol_pt``) and vs float64 chunked SSD (``tol_ref``)."""
    y, ht, grads = _run(ssd_triton, xs, **kw)
    py, pht, pgrads = _run(_unfused, xs, **kw)
    kw.pop("strided_x", None)
    ry, rht, rgrads = _run(ssd_chunked, {k: v.double() if v is not None else None for k, v in xs.items()}, **kw)
    assert y.dtype == xs["x"].dtype
    assert set(grads) == set(rgrads) == {k for k in NAMES if xs[k] is not None}
    pairs = [("y", y, py, ry)] + ([("final_state", ht, pht, rht)] if kw.get("final", True) else [])
    pairs += [(f"d{k}", grads[k], pgrads[k], rgrads[k]) for k in grads]
    for name, a, p, r in pairs:
        assert a.dtype == p.dtype and a.shape == p.shape, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, p) < tol_pt, (name, "vs unfused", _rel(a, p))
        assert _rel(a, r) < tol_ref, (name, "vs chunked f64", _rel(a, r))


@pytest.mark.parametrize("D", ["H", "HP", None])
def test_all_options_float32(D):
    xs = _inputs(1, 2, 37, D=D)
    _check(xs, 1e-5, 1e-5)


@pytest.mark.parametrize("D", ["H", "HP"])
def test_state_pass_plus_output_kernels(D, monkeypatch):
    """The scaled values and the D skip through ``_fwd_h_kernel`` + ``_fwd_o_kernel`` (the forward for K > 128,
    where the fused state-and-output kernel is off), packed sequences and a 64-column V tile."""
    from mixlab.ops._triton import chunk

    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "enable": 0})
    cu = torch.tensor([0, 30, 75, 140], device=DEVICE)
    xs = _inputs(10, 1, 140, P=64, nseq=3, D=D)
    _check(xs, 3e-5, 3e-5, cu_seqlens=cu, strided_x=True)  # dA: float32 sums over 140 tokens


def test_fused_forward_prefetching_x(monkeypatch):
    """``CONFIG["fwd_ho"]["prefetch_v_xd"]``: the fused forward loading each chunk's x tile a chunk ahead (off by
    default for SSD), with strided x, packed sequences and a partial last chunk."""
    from mixlab.ops._triton import chunk

    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**chunk.CONFIG["fwd_ho"], "prefetch_v_xd": 1})
    cu = torch.tensor([0, 30, 75, 140], device=DEVICE)
    xs = _inputs(12, 1, 140, P=16, nseq=3, D="H")
    _check(xs, 3e-5, 3e-5, cu_seqlens=cu, strided_x=True)


@pytest.mark.parametrize(("prefetch", "cumsum"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gate_rows_loaded_a_chunk_ahead(prefetch, cumsum, monkeypatch):
    """``prefetch_g_xd`` / ``prefetch_g_gla``: the fused forward and the reverse pass of gated linear attention load
    the gate row a chunk ahead, or in its chunk; ``g_cumsum_gla``: the fused forward reads the gate's cumulative sum
    instead of scanning it; with packed sequences and partial chunks."""
    from mixlab.ops._triton import chunk

    fwd, dh = chunk.CONFIG["fwd_ho"], chunk.CONFIG["bwd_dh"]
    monkeypatch.setitem(chunk.CONFIG, "fwd_ho", {**fwd, "prefetch_g_xd": prefetch, "g_cumsum_gla": cumsum})
    monkeypatch.setitem(chunk.CONFIG, "bwd_dh", {**dh, "prefetch_g_gla": prefetch})
    cu = torch.tensor([0, 30, 75, 140], device=DEVICE)
    xs = _inputs(14, 1, 140, P=16, nseq=3, D="H")
    _check(xs, 3e-5, 3e-5, cu_seqlens=cu, strided_x=True)


def test_no_z_no_bias_no_softplus_one_group():
    xs = _inputs(2, 1, 70, G=1, D="HP", dt_shift=0.0)
    xs["dt"] = xs["dt"].abs() * 0.3  # without softplus dt must stay positive for a decaying state
    xs["z"] = xs["dt_bias"] = None
    _check(xs, 1e-5, 1e-5, softplus=False)


def test_no_d_no_z_is_the_bare_scan():
    xs = _inputs(3, 2, 20)
    xs["D"] = xs["z"] = None
    _check(xs, 1e-5, 1e-5, final=False)


def test_packed_sequences_and_odd_head_dim():
    cu = torch.tensor([0, 1, 40, 40, 75], device=DEVICE)
    xs = _inputs(4, 1, 75, P=12, nseq=4, D="HP")
    _check(xs, 1e-5, 1e-5, cu_seqlens=cu)


def test_strided_x_and_softplus_tails():
    xs = _inputs(5, 2, 33, dt_shift=0.0)
    xs["dt"][0, :5] = 25.0  # softplus(s) = s above the threshold 20
    xs["dt"][1, :5] = -30.0  # softplus(s) ≈ exp(s): log(1 + e) alone would round to 0
    _check(xs, 1e-4, 1e-4, strided_x=True)  # dA: float32 chunk kernels at decays of exp(25·A), either path


def test_float16():
    xs = _inputs(6, 1, 65, dtype=torch.float16, D="HP")
    _check(xs, 2e-3, 5e-3)


def test_softplus_tail_values():
    s = torch.tensor([[[-30.0, -15.0, -3.0, 0.0, 5.0, 19.9, 20.5, 40.0]]], dtype=torch.float32, device=DEVICE)
    x = torch.ones(1, 1, 8, 16, device=DEVICE)
    A = -torch.ones(8, device=DEVICE)
    k = torch.zeros(1, 1, 1, 16, device=DEVICE)
    _, _, d, g, _, _ = fused.ssd_fused_fwd(x, s, A, k, k, None, None, None, None, True, False, None)
    want = torch.nn.functional.softplus(s.double())
    rtol = 1e-6 if DEVICE == "cpu" else 5e-6  # the H100's float32 exp: 1.2e-6 at s = -30
    assert torch.allclose(d.double(), want, rtol=rtol, atol=0)
    assert torch.allclose(-g.double(), want, rtol=rtol, atol=0)


def test_only_the_final_state_needs_a_gradient():
    xs = _inputs(7, 1, 10)
    leaves = {k: v.clone().requires_grad_() for k, v in xs.items()}
    _, ht = ssd_triton(*(leaves[k] for k in NAMES[:5]), D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"],
                       dt_softplus=True, initial_state=leaves["initial_state"], output_final_state=True)  # fmt: skip
    ht.sum().backward()
    assert leaves["z"].grad.abs().max() == 0 and leaves["x"].grad.abs().max() > 0


def test_opcheck():
    xs = _inputs(8, 1, 9, D="H")
    q = xs["C"].contiguous()
    k = xs["B"].contiguous()
    h0 = xs["initial_state"].transpose(-1, -2).contiguous()
    args = (xs["x"], xs["dt"], xs["A"], q, k, xs["dt_bias"], xs["D"], xs["z"], h0, True, True, None)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    torch.library.opcheck(fused.ssd_fused_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                 "test_autograd_registration"))  # fmt: skip


def test_no_tokens():
    xs = _inputs(9, 2, 0, D="HP")
    y, ht, grads = _run(ssd_triton, xs)
    py, pht, pgrads = _run(_unfused, xs)
    assert y.shape == py.shape and torch.equal(ht, pht)
    assert torch.equal(grads["initial_state"], pgrads["initial_state"])
    assert all((grads[k] == 0).all() for k in grads if k != "initial_state")
