"""delta_rule: chunked vs the step-by-step reference (float64, every gradient), packed sequences,
semantic properties of the delta rule, and the dispatcher's input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixlab.ops import delta_rule
from mixlab.ops.delta_rule.chunked import delta_rule_chunked, unit_lower_solve

F64 = torch.float64


def _inputs(B, T, H, K, V, *, gated, init, N=None, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=dtype) if gated else None
    s0 = torch.randn(N or B, H, K, V, generator=gen, dtype=dtype) if init else None
    return q, k, v, beta, g, s0


def _run(backend, q, k, v, beta, g, s0, cu_seqlens=None, **kw):
    """Forward with every input requiring grad; returns (o, final_state, {name: grad}) for a random loss."""
    named = {"q": q, "k": k, "v": v, "beta": beta, "g": g, "initial_state": s0}
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in named.items() if x is not None}
    o, s = delta_rule(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["beta"],
        leaves.get("g"),
        scale=0.7,
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        backend=backend,
        **kw,
    )
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o, s, dict(zip(leaves, grads))


def _assert_rel(actual, expected, tol, what):
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _assert_same_run(a, b, tol, tag=""):
    _assert_rel(a[0], b[0], tol, f"{tag} output")
    _assert_rel(a[1], b[1], tol, f"{tag} final state")
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        _assert_rel(a[2][name], b[2][name], tol, f"{tag} grad {name}")


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_reference(T, gated, init):
    x = _inputs(2, T, 2, 8, 6, gated=gated, init=init, seed=T)
    ref = _run("reference", *x)
    chk = _run("chunked", *x)
    assert chk[0].dtype == F64 and chk[1].dtype == F64
    _assert_same_run(chk, ref, 1e-8, f"T={T} gated={gated} init={init}")


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_chunk_size_does_not_change_result(chunk_size):
    x = _inputs(1, 50, 2, 4, 3, gated=True, init=True, seed=3)
    ref = _run("reference", *x)
    named = dict(zip(["q", "k", "v", "beta", "g"], x[:5]))
    o, s = delta_rule_chunked(**named, scale=0.7, initial_state=x[5], output_final_state=True, chunk_size=chunk_size)
    _assert_rel(o, ref[0], 1e-10, "output")
    _assert_rel(s, ref[1], 1e-10, "final state")


def test_strong_decay_values_keep_gradients_finite():
    # g of -60 per step makes exp(G_i - G_j) for i < j overflow: it must be masked before exp.
    q, k, v, beta, g, s0 = _inputs(1, 70, 2, 4, 3, gated=True, init=True, seed=5)
    g = torch.full_like(g, -60.0)
    ref = _run("reference", q, k, v, beta, g, s0)
    chk = _run("chunked", q, k, v, beta, g, s0)
    for name, grad in chk[2].items():
        assert torch.isfinite(grad).all(), name
    _assert_same_run(chk, ref, 1e-8)


@pytest.mark.parametrize("C", [1, 7, 16, 37, 64])
@pytest.mark.parametrize("repeated_keys", [False, True])
def test_unit_lower_solve_matches_solve_triangular(C, repeated_keys):
    """The blocked solve equals torch.linalg.solve_triangular (float64, value and both gradients), never
    reads A on or above the diagonal, and stays exact when one key repeats (its Neumann series would
    have terms ~1e16 there: a power-series inverse would lose every digit)."""
    gen = torch.Generator().manual_seed(C)
    k = F.normalize(torch.randn(3, 2, C, 8, generator=gen, dtype=F64), dim=-1)
    if repeated_keys:
        k = k[:, :, :1].expand_as(k)
    beta = 0.1 + 0.9 * torch.rand(3, 2, C, 1, generator=gen, dtype=F64)
    A = ((k * beta) @ k.transpose(-1, -2)).tril(-1).requires_grad_(True)
    R = torch.randn(3, 2, C, 5, generator=gen, dtype=F64, requires_grad=True)
    G = torch.randn(3, 2, C, 5, generator=gen, dtype=F64)
    X_ref = torch.linalg.solve_triangular(A, R, upper=False, unitriangular=True)
    gA_ref, gR_ref = torch.autograd.grad(X_ref, (A, R), G)
    upper = torch.ones(C, C, dtype=torch.bool).triu()
    garbage = torch.randn(3, 2, C, C, generator=gen, dtype=F64).masked_fill(~upper, 0.0)
    X = unit_lower_solve(A + garbage, R)
    gA, gR = torch.autograd.grad(X, (A, R), G)
    _assert_rel(X, X_ref, 1e-12, "X")
    _assert_rel(gR, gR_ref, 1e-12, "grad R")
    _assert_rel(gA, gA_ref.tril(-1), 1e-12, "grad A")
    assert not gA.masked_select(upper).any(), "the gradient of A must be strictly lower"


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("gated", [False, True])
def test_packed_sequences_equal_each_alone(backend, gated):
    lens = [5, 0, 70, 1, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    T, H, K, V = sum(lens), 2, 4, 3
    q, k, v, beta, g, s0 = _inputs(1, T, H, K, V, gated=gated, init=True, N=len(lens), seed=11)
    packed = _run(backend, q, k, v, beta, g, s0, cu_seqlens=cu)
    assert packed[1].shape == (len(lens), H, K, V)
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        sl = slice(a, b)
        o_n, s_n = delta_rule(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            beta[:, sl],
            g[:, sl] if gated else None,
            scale=0.7,
            initial_state=s0[n : n + 1],
            output_final_state=True,
            backend=backend,
        )
        if b > a:
            _assert_rel(packed[0][:, sl], o_n, 1e-12, f"seq {n} output")
        _assert_rel(packed[1][n : n + 1], s_n, 1e-12, f"seq {n} final state")
    # Gradients: a loss that only touches one sequence must give the same gradients as that sequence alone.
    n, (a, b) = 2, (cu[2].item(), cu[3].item())
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, beta)]
    o, s = delta_rule(*leaves, g, scale=0.7, initial_state=s0, output_final_state=True, cu_seqlens=cu, backend=backend)
    (o[:, a:b].square().sum() + s[n].square().sum()).backward()
    alone = [x[:, a:b].clone().requires_grad_(True) for x in (q, k, v, beta)]
    o1, s1 = delta_rule(
        *alone,
        g[:, a:b] if gated else None,
        scale=0.7,
        initial_state=s0[n : n + 1],
        output_final_state=True,
        backend=backend,
    )
    (o1.square().sum() + s1.square().sum()).backward()
    for full, part in zip(leaves, alone):
        _assert_rel(full.grad[:, a:b], part.grad, 1e-12, "packed gradient")
        assert full.grad[:, :a].abs().max() == 0 and full.grad[:, b:].abs().max() == 0


def test_packed_chunked_matches_packed_reference():
    cu = torch.tensor([0, 30, 100, 131])
    x = _inputs(1, 131, 2, 4, 5, gated=True, init=True, N=3, seed=2)
    _assert_same_run(_run("chunked", *x, cu_seqlens=cu), _run("reference", *x, cu_seqlens=cu), 1e-8)


# ---- semantics: properties a wrong algorithm would fail --------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_orthonormal_keys_are_retrieved_exactly(backend):
    """beta = 1 with orthonormal keys writes each v_j at k_j (overwriting, not adding); q = k_j reads v_j * scale."""
    K, V, scale = 8, 5, 0.5
    gen = torch.Generator().manual_seed(0)
    keys = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=F64))[0].T  # rows orthonormal
    vals = torch.randn(K, V, generator=gen, dtype=F64)
    new_vals = torch.randn(2, V, generator=gen, dtype=F64)
    # Steps: write all K pairs; overwrite keys 0 and 1 with new values; then query every key with beta = 0.
    k = torch.cat([keys, keys[:2], keys])
    v = torch.cat([vals, new_vals, torch.zeros(K, V, dtype=F64)])
    beta = torch.cat([torch.ones(K + 2, dtype=F64), torch.zeros(K, dtype=F64)])
    q = k.clone()
    o, s = delta_rule(
        q[None, :, None],
        k[None, :, None],
        v[None, :, None],
        beta[None, :, None],
        scale=scale,
        output_final_state=True,
        backend=backend,
    )
    read = o[0, K + 2 :, 0]
    expected = torch.cat([new_vals, vals[2:]]) * scale
    torch.testing.assert_close(read, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[0, 0], keys.T @ torch.cat([new_vals, vals[2:]]), rtol=1e-12, atol=1e-12)
    # Each write step reads back its own value right after writing it (read after write).
    torch.testing.assert_close(o[0, :K, 0], vals * scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_two_steps_closed_form(backend):
    """Decay before the update, beta on the error, scale on the query: two steps by hand."""
    q, k, v, beta, g, s0 = _inputs(1, 2, 1, 3, 2, gated=True, init=True, seed=9)
    o, s = delta_rule(q, k, v, beta, g, scale=0.3, initial_state=s0, output_final_state=True, backend=backend)
    S = s0[0, 0]
    for t in range(2):
        kt, vt, qt, bt, gt = k[0, t, 0], v[0, t, 0], q[0, t, 0], beta[0, t, 0], g[0, t, 0]
        S = torch.exp(gt) * S
        S = S + torch.outer(kt, bt * (vt - S.T @ kt))
        torch.testing.assert_close(o[0, t, 0], 0.3 * S.T @ qt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[0, 0], S, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_strong_decay_forgets_the_past(backend):
    """A step with g = -80 wipes the state: what follows equals a fresh run from that step."""
    q, k, v, beta, g, s0 = _inputs(1, 90, 2, 4, 3, gated=True, init=True, seed=4)
    t0 = 37
    g = g.clone()
    g[:, t0] = -80.0
    o, s = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend=backend)
    sl = slice(t0, None)
    o2, s2 = delta_rule(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], output_final_state=True, backend=backend)
    torch.testing.assert_close(o[:, sl], o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s2, rtol=1e-12, atol=1e-12)
    # ... while without the strong decay the past does matter.
    g[:, t0] = 0.0
    o3, _ = delta_rule(q, k, v, beta, g, initial_state=s0, backend=backend)
    assert (o3[:, sl] - o2).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_dtypes_and_default_scale(backend):
    q, k, v, beta, g, s0 = _inputs(1, 20, 2, 16, 3, gated=True, init=True, seed=1, dtype=torch.float32)
    o, s = delta_rule(q, k, v, beta, g, initial_state=s0, output_final_state=True, backend=backend)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    o_explicit, _ = delta_rule(q, k, v, beta, g, scale=16**-0.5, initial_state=s0, backend=backend)
    torch.testing.assert_close(o, o_explicit, rtol=0, atol=0)
    ob, sb = delta_rule(
        q.bfloat16(),
        k.bfloat16(),
        v.bfloat16(),
        beta.bfloat16(),
        g.bfloat16(),
        output_final_state=True,
        backend=backend,
    )
    assert ob.dtype == torch.bfloat16 and sb.dtype == torch.float32
    # float32 chunked agrees with the float64 reference at float32 precision.
    ref64, _ = delta_rule(*(x.double() for x in (q, k, v, beta, g)), initial_state=s0.double(), backend="reference")
    _assert_rel(o.double(), ref64, 1e-5, "float32 output")


# ---- dispatcher input checks ---------------------------------------------------------------------------------------


def test_dispatcher_rejects_wrong_shapes():
    q, k, v, beta, g, s0 = _inputs(2, 5, 3, 4, 6, gated=True, init=True, dtype=torch.float32)
    with pytest.raises(ValueError, match="q and k must be"):
        delta_rule(q, k[..., :3], v, beta)
    with pytest.raises(ValueError, match="q and k must be"):
        delta_rule(q[0], k[0], v, beta)
    with pytest.raises(ValueError, match="v must be"):
        delta_rule(q, k, v[:, :4], beta)
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="g must be"):
        delta_rule(q, k, v, beta, g[:, :, :2])
    with pytest.raises(ValueError, match="initial_state must be"):
        delta_rule(q, k, v, beta, initial_state=s0.transpose(-1, -2))
    with pytest.raises(ValueError, match="packed into B=1"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 5]))
    one = [x[:1] for x in (q, k, v, beta)]
    with pytest.raises(ValueError, match="end at T=5"):
        delta_rule(*one, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="initial_state must be"):
        delta_rule(*one, cu_seqlens=torch.tensor([0, 3, 5]), initial_state=s0[:1])
    with pytest.raises(ValueError, match="backend="):
        delta_rule(q, k, v, beta, backend="fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        delta_rule_chunked(q, k, v, beta, chunk_size=0)
