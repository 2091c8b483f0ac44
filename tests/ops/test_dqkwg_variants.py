"""``_bwd_dqkwg_kernel`` variants (``CONFIG["dqkwg"]`` lean / maxnreg) against the default path.

Kernel level: the same random inputs through ``LEAN`` off and on give the same dq, dk, dw (bit for bit: the
same products in the same order) and dG up to summation order (Σ h⊙dh is reduced per V step). End to end:
gated and ungated delta rule with the variant keys, every gradient against float64, packed sequences.
CPU under ``TRITON_INTERPRET=1`` at tiny shapes (tests/conftest.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mixlab.ops._triton import chunk
from mixlab.ops.delta_rule.reference import delta_rule_reference
from mixlab.ops.delta_rule.triton import delta_rule_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def _kernel_outputs(lean, *, T=100, H=2, HK=2, K=32, V=64, BK=16, BV=16, cu=None, use_delta=True,
                    dtype=torch.float32, seed=0):  # fmt: skip
    """Run ``_bwd_dqkwg_kernel`` (gated) once on seeded random inputs; returns (dq, dk, dw, dG) in float32."""
    gen = torch.Generator().manual_seed(seed)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE) if cu is not None else None
    lay = chunk._Layout(1, T, cu_t, torch.device(DEVICE))

    def rn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=DEVICE, dtype=dtype)

    q, k = rn(1, T, HK, K), rn(1, T, HK, K)
    vn, do, dvn = rn(1, T, H, V), rn(1, T, H, V), rn(1, T, H, V)
    g = (F.logsigmoid(torch.randn(1, T, H, generator=gen)) / 4).to(DEVICE)
    h, dh = rn(lay.NC, H, K, V, s=0.5), rn(lay.NC, H, K, V, s=0.5)
    NK = -(-K // BK)
    dq, dk = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
    dw = torch.full((1, T, H, K), float("nan"), dtype=dtype, device=DEVICE)
    dG = torch.full((NK, T, H), float("nan"), dtype=torch.float32, device=DEVICE)
    chunk._bwd_dqkwg_kernel[(NK, lay.NC, HK)](
        q, k, vn, g, h, do, dh, dvn, dq, dk, dw, dG, lay.cu_seqlens, lay.chunk_indices, 0.3, lay.T, lay.NT, T,
        H=H, HK=HK, K=K, V=V, BT=chunk.BT, BK=BK, BV=BV, USE_G=True, USE_DELTA=use_delta, IS_VARLEN=lay.is_varlen,
        LEAN=lean, num_warps=8, num_stages=3, maxnreg=128 if lean else None,
    )  # fmt: skip
    return dq.float(), dk.float(), (dw.float() if use_delta else None), dG


def _assert_same(base, lean, dg_tol):
    for name, a, b in zip(("dq", "dk", "dw"), base[:3], lean[:3]):
        if a is None:
            continue
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        assert torch.equal(a, b), (name, float((a - b).abs().max()))
    dG0, dG1 = base[3], lean[3]
    assert torch.isfinite(dG0).all() and torch.isfinite(dG1).all()
    err = float((dG1 - dG0).norm() / dG0.norm())
    assert err < dg_tol, ("dG", err)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # delta rule, two K tiles, four V steps, partial last chunk
        {"BV": 32, "cu": [0, 1, 70, 70, 100]},  # packed sequences (length 1, across a chunk edge, empty, 30)
        {"BK": 32, "BV": 64},  # one K tile, one V step
        {"use_delta": False, "H": 4, "HK": 2},  # gated linear attention (SSD): two value heads per key head
        {"use_delta": False, "H": 4, "HK": 2, "cu": [0, 64, 100]},
    ],
)
def test_lean_kernel_matches_default(kw):
    base = _kernel_outputs(False, **kw)
    lean = _kernel_outputs(True, **kw)
    _assert_same(base, lean, 1e-6)


def test_lean_kernel_bf16(bf16_interpreter):
    """bf16 inputs (emulated tensor-core numerics): the reloaded q/k enter dG as the held copies did."""
    if DEVICE != "cpu":
        pytest.skip("the bf16 interpreter fixture is for TRITON_INTERPRET=1")
    kw = {"K": 64, "V": 64, "BK": 32, "BV": 32, "cu": [0, 37, 100], "dtype": torch.bfloat16}
    _assert_same(_kernel_outputs(False, **kw), _kernel_outputs(True, **kw), 1e-5)


def _inputs(seed, T, H, K, V, gated, N):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, K, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(1, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(1, T, H, V, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(1, T, H, generator=g, dtype=torch.float64))
    gate = F.logsigmoid(torch.randn(1, T, H, generator=g, dtype=torch.float64)) / 4 if gated else None
    h0 = torch.randn(N, H, K, V, generator=g, dtype=torch.float64) * 0.5
    return [q, k, v, beta, gate, h0]


def _dqkwg_config(monkeypatch, **cfg):
    """``CONFIG["dqkwg"]`` as the non-lean kernel (the comparison base), with ``cfg`` on top."""
    base = chunk.CONFIG["dqkwg"]
    monkeypatch.setitem(chunk.CONFIG, "dqkwg", {**base, "lean": 0, "maxnreg": 0, "num_stages_lean": 0, **cfg})


def _grads(fn, xs, dtype, cu):
    leaves = [x.to(DEVICE, dtype if i < 5 else torch.float32).clone().requires_grad_() if x is not None else None
              for i, x in enumerate(xs)]  # fmt: skip
    o, ht = fn(*leaves[:5], scale=0.25, initial_state=leaves[5], output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(9)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.device)
    ((o.double() * do).sum() + (ht.double() * dht).sum()).backward()
    return [x.grad.detach().double().cpu() if x is not None else None for x in leaves]


@pytest.mark.parametrize(
    "gated,cfg",
    [
        (True, {"lean": 1, "BV": 16}),
        (True, {"lean": 1, "maxnreg": 128, "BV": 32, "num_stages": 2}),
        (False, {"lean": 1, "maxnreg": 128}),  # ungated: the keys are ignored, results identical to the default
    ],
)
def test_lean_end_to_end(gated, cfg, monkeypatch):
    """dq, dk, dv, dβ, dg, dh0 with the variant keys: against float64, and against the default path."""
    cu = torch.tensor([0, 1, 70, 70, 100], device=DEVICE)
    xs = _inputs(61 + gated, 100, 2, 32, 64, gated, N=4)
    _dqkwg_config(monkeypatch)
    base = _grads(delta_rule_triton, xs, torch.float32, cu)
    _dqkwg_config(monkeypatch, **cfg)
    got = _grads(delta_rule_triton, xs, torch.float32, cu)
    ref = _grads(delta_rule_reference, xs, torch.float64, cu)
    for name, a, b, r in zip(["q", "k", "v", "beta", "g", "h0"], got, base, ref):
        if r is None:
            assert a is None and b is None
            continue
        assert torch.isfinite(a).all(), name
        assert float((a - r).norm() / r.norm()) < 1e-5, (f"d{name}", float((a - r).norm() / r.norm()))
        if not gated or name != "g":
            # only dg's Σ h⊙dh is summed in another order; BV changes the other sums' order too
            tol = 0 if not gated or "BV" not in cfg else 1e-6
            assert float((a - b).norm() / b.norm()) <= tol, (f"d{name} vs default", float((a - b).norm() / b.norm()))


@pytest.mark.parametrize("cfg", [{"lean": 1, "BV": 32}, {"lean": 1, "maxnreg": 128, "num_stages": 2}])
def test_lean_bf16_at_k128(cfg, bf16_interpreter, monkeypatch):
    """bf16 at the bench's K = V = 128 tiles (two K tiles, partial chunk): within the 1e-2 bar of
    ``mixlab bench kernels --check`` (≈ 4e-3 expected) and within 1e-4 of the default path (emulated: ≤ 1.3e-5)."""
    if DEVICE != "cpu":
        pytest.skip("the bf16 interpreter fixture is for TRITON_INTERPRET=1")
    xs = _inputs(71, 100, 1, 128, 128, True, N=1)
    _dqkwg_config(monkeypatch)
    base = _grads(delta_rule_triton, xs, torch.bfloat16, None)
    _dqkwg_config(monkeypatch, **cfg)
    got = _grads(delta_rule_triton, xs, torch.bfloat16, None)
    ref = _grads(delta_rule_reference, xs, torch.float64, None)
    for name, a, b, r in zip(["q", "k", "v", "beta", "g", "h0"], got, base, ref):
        assert torch.isfinite(a).all(), name
        assert float((a - r).norm() / r.norm()) < 1e-2, (f"d{name}", float((a - r).norm() / r.norm()))
        assert float((a - b).norm() / b.norm()) < 1e-4, (f"d{name} vs default", float((a - b).norm() / b.norm()))
