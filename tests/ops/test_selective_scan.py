"""Selective scan (Mamba): chunked vs the step-by-step reference, and mamba_ssm's semantics."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mixlab.ops.selective_scan import selective_scan
from mixlab.ops.selective_scan.chunked import selective_scan_chunked
from mixlab.ops.selective_scan.reference import selective_scan_reference

# the package re-exports a function named like the subpackage, so reach the module through importlib
chunked_module = importlib.import_module("mixlab.ops.selective_scan.chunked")

F64 = torch.float64


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (plus a float64 round-off floor)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale + 1e-13, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def make_inputs(gen, b, d, L, n, groups, *, init=True, dtype=F64):
    """Random inputs (raw delta: the op adds delta_bias and applies softplus), all requiring grad.
    ``groups`` = 0 gives B/C ``[b, n, L]``, else ``[b, groups, n, L]``."""

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale + shift).requires_grad_()

    bc = (b, n, L) if groups == 0 else (b, groups, n, L)
    return dict(
        u=r(b, d, L),
        delta=r(b, d, L, scale=0.7, shift=-0.5),
        A=(-torch.empty(d, n, dtype=dtype).uniform_(0.2, 4.0, generator=gen)).requires_grad_(),
        B=r(*bc),
        C=r(*bc),
        D=r(d),
        z=r(b, d, L),
        delta_bias=r(d, scale=0.5),
        initial_state=r(b, d, n) if init else None,
    )


def outputs_and_grads(fn, inp):
    y, last = fn(**{k: v for k, v in inp.items()}, delta_softplus=True, return_last_state=True)
    gen = torch.Generator().manual_seed(321)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum() + (
        last * torch.randn(last.shape, generator=gen, dtype=last.dtype)
    ).sum()
    names = [k for k, v in inp.items() if v is not None]
    return y, last, dict(zip(names, torch.autograd.grad(loss, [inp[k] for k in names])))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("block_elements", [None, 96])  # None: one block; 96: blocks of 4 steps, 2x2 sub-chunks
def test_chunked_matches_reference(T, init, groups, block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(chunked_module, "BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(T * 4 + init * 2 + groups)
    inp = make_inputs(gen, b=2, d=4, L=T, n=3, groups=groups, init=init)
    y_r, s_r, g_r = outputs_and_grads(selective_scan_reference, inp)
    y_c, s_c, g_c = outputs_and_grads(selective_scan_chunked, inp)
    assert_rel(y_c, y_r, what="y")
    assert_rel(s_c, s_r, what="last state")
    assert set(g_c) == set(g_r) == {k for k, v in inp.items() if v is not None}
    for k in g_r:
        assert_rel(g_c[k], g_r[k], what=f"grad {k}")


def test_block_geometry_covers_many_shapes(monkeypatch):
    """Odd block sizes (ragged sub-chunks, a padded last block) still give the reference's results."""
    gen = torch.Generator().manual_seed(9)
    inp = make_inputs(gen, b=1, d=6, L=77, n=5, groups=3)
    y_r, s_r, g_r = outputs_and_grads(selective_scan_reference, inp)
    for block_elements in (30, 30 * 7, 30 * 23):
        monkeypatch.setattr(chunked_module, "BLOCK_ELEMENTS", block_elements)
        y_c, s_c, g_c = outputs_and_grads(selective_scan_chunked, inp)
        assert_rel(y_c, y_r, what=f"y ({block_elements})")
        assert_rel(s_c, s_r, what=f"last state ({block_elements})")
        for k in g_r:
            assert_rel(g_c[k], g_r[k], what=f"grad {k} ({block_elements})")


@pytest.mark.parametrize("d, n, groups", [(3, 1, 3), (4, 2, 4), (2, 1, 0)])
def test_one_channel_per_group_or_one_state(d, n, groups):
    """Degenerate widths (a group per channel, a single state) where views of size 1 alias easily."""
    gen = torch.Generator().manual_seed(d * 10 + n)
    inp = make_inputs(gen, b=2, d=d, L=33, n=n, groups=groups)
    y_r, s_r, g_r = outputs_and_grads(selective_scan_reference, inp)
    y_c, s_c, g_c = outputs_and_grads(selective_scan_chunked, inp)
    assert_rel(y_c, y_r, what="y")
    assert_rel(s_c, s_r, what="last state")
    for k in g_r:
        assert_rel(g_c[k], g_r[k], what=f"grad {k}")


def selective_scan_ref_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's ``selective_scan_ref`` (real A, variable B/C), transcribed: precomputed
    ``deltaA = exp(delta A)``, ``deltaB_u = delta B u`` for all steps, then ``x = deltaA x + deltaB_u``."""
    dtype_in = u.dtype
    u, delta = u.double(), delta.double()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].double()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B, C = B.double(), C.double()
    x = A.new_zeros((batch, dim, dstate))
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)  # "B G N L -> B (G H) N L"
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, :, i]) if C.dim() == 3 else torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out.to(dtype_in), x


@pytest.mark.parametrize("fn", [selective_scan_reference, selective_scan_chunked])
@pytest.mark.parametrize("groups", [0, 2])
def test_semantics_match_mamba_ssm_selective_scan_ref(fn, groups):
    gen = torch.Generator().manual_seed(17 + groups)
    inp = {
        k: v.detach()
        for k, v in make_inputs(gen, b=2, d=4, L=37, n=6, groups=groups, init=False).items()
        if v is not None
    }
    y_m, last_m = selective_scan_ref_mamba_ssm(**inp, delta_softplus=True)
    y, last = fn(**inp, delta_softplus=True, return_last_state=True)
    assert_rel(y, y_m, rtol=1e-10, what="y")
    assert_rel(last, last_m, rtol=1e-10, what="last state")


def test_scalar_closed_form():
    """One channel, N = 1: h_t = exp(d_t a) h_{t-1} + d_t b_t u_t; y_t = (c_t h_t + D u_t) silu(z_t)."""
    us, raw, bs, cs, zs = [1.0, -2.0, 0.5], [0.1, 0.9, -1.5], [0.3, 2.0, -1.0], [1.5, -0.5, 2.5], [0.5, -1.0, 3.0]
    a, Dv, bias, h = -1.3, -0.4, 0.3, -0.6
    expected = []
    for u_t, r_t, b_t, c_t, z_t in zip(us, raw, bs, cs, zs):
        d_t = math.log1p(math.exp(r_t + bias))
        h = math.exp(d_t * a) * h + d_t * b_t * u_t
        expected.append((c_t * h + Dv * u_t) * z_t / (1 + math.exp(-z_t)))

    def t(v, *shape):
        return torch.tensor(v, dtype=F64).reshape(*shape)

    for fn in (selective_scan_reference, selective_scan_chunked):
        y, last = fn(
            t(us, 1, 1, 3),
            t(raw, 1, 1, 3),
            t([a], 1, 1),
            t(bs, 1, 1, 3),
            t(cs, 1, 1, 3),
            D=t([Dv], 1),
            z=t(zs, 1, 1, 3),
            delta_bias=t([bias], 1),
            delta_softplus=True,
            initial_state=t([-0.6], 1, 1, 1),
            return_last_state=True,
        )
        torch.testing.assert_close(y.flatten(), t(expected, 3), rtol=1e-12, atol=0)
        assert last.item() == pytest.approx(h, rel=1e-12)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_chunked_does_not_step_through_time():
    """The chunked scan issues far fewer tensor ops than there are time steps (forward and backward)."""
    gen = torch.Generator().manual_seed(0)
    T = 2048
    inp = make_inputs(gen, b=1, d=8, L=T, n=4, groups=0, init=True, dtype=torch.float32)
    with _CountOps() as counter:
        y = selective_scan_chunked(**inp, delta_softplus=True)
        y.sum().backward()
    assert counter.count < T // 2, f"{counter.count} tensor ops for {T} steps"


def test_dispatch_layouts_dtypes_and_errors():
    gen = torch.Generator().manual_seed(2)
    b, d, L, n = 2, 4, 9, 3
    # a transposed [B, L, D] input, as the Mamba layer passes it
    u = torch.randn(b, L, d, generator=gen, dtype=torch.bfloat16).transpose(1, 2)
    delta = torch.rand(b, d, L, generator=gen)
    A = -torch.rand(d, n, generator=gen)
    B = torch.randn(b, n, L, generator=gen)
    outs = []
    for backend in ("reference", "chunked"):
        y = selective_scan(u, delta, A, B, B, backend=backend)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == (b, d, L)
        y, last = selective_scan(u, delta, A, B, B, return_last_state=True, backend=backend)
        assert last.dtype == torch.float32 and last.shape == (b, d, n)
        outs.append(y.float())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="D % G"):
        selective_scan(u, delta, A, B.view(b, 1, n, L).expand(b, 3, n, L), B)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(u, delta, A, B, B, initial_state=torch.zeros(b, d, n + 1))
