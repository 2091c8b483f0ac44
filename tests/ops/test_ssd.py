"""SSD (Mamba2): chunked vs the step-by-step reference, packed sequences, and mamba_ssm's semantics."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixlab.ops.ssd import ssd
from mixlab.ops.ssd.chunked import ssd_chunked
from mixlab.ops.ssd.reference import ssd_reference

F64 = torch.float64


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-8, what: str = "") -> None:
    """max |actual - expected| <= rtol * max |expected| (plus a float64 round-off floor)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.numel() == 0:
        return
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale + 1e-13, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


def make_inputs(gen, b, T, H, P, G, N, *, n_seq=None, init=True, D_shape="H", dtype=F64):
    """Random SSD inputs (raw dt: the op applies dt_bias and softplus), all requiring grad."""

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale + shift).requires_grad_()

    n_seq = b if n_seq is None else n_seq
    return dict(
        x=r(b, T, H, P),
        dt=r(b, T, H, scale=0.7, shift=-0.5),
        A=(-torch.empty(H, dtype=dtype).uniform_(0.3, 3.0, generator=gen)).requires_grad_(),
        B=r(b, T, G, N),
        C=r(b, T, G, N),
        D=r(H) if D_shape == "H" else r(H, P),
        z=r(b, T, H, P),
        dt_bias=r(H, scale=0.5),
        initial_state=r(n_seq, H, P, N) if init else None,
    )


def run(fn, inp, **kw):
    return fn(
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        D=inp["D"],
        z=inp["z"],
        dt_bias=inp["dt_bias"],
        dt_softplus=True,
        initial_state=inp["initial_state"],
        output_final_state=True,
        **kw,
    )


def outputs_and_grads(fn, inp, **kw):
    y, final = run(fn, inp, **kw)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum() + (
        final * torch.randn(final.shape, generator=gen, dtype=final.dtype)
    ).sum()
    names = [k for k, v in inp.items() if v is not None]
    grads = torch.autograd.grad(loss, [inp[k] for k in names])
    return y, final, dict(zip(names, grads))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_reference(T, init):
    gen = torch.Generator().manual_seed(T * 2 + init)
    inp = make_inputs(gen, b=2, T=T, H=4, P=3, G=2, N=5, init=init, D_shape="HP" if init else "H")
    y_r, f_r, g_r = outputs_and_grads(ssd_reference, inp)
    y_c, f_c, g_c = outputs_and_grads(ssd_chunked, inp, chunk_size=64)
    assert_rel(y_c, y_r, what="y")
    assert_rel(f_c, f_r, what="final state")
    assert set(g_c) == set(g_r) == {k for k, v in inp.items() if v is not None}
    for k in g_r:
        assert_rel(g_c[k], g_r[k], what=f"grad {k}")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 256])
def test_chunk_size_does_not_change_the_result(chunk_size):
    gen = torch.Generator().manual_seed(7)
    inp = make_inputs(gen, b=1, T=37, H=2, P=2, G=1, N=3)
    y_r, f_r, g_r = outputs_and_grads(ssd_reference, inp)
    y_c, f_c, g_c = outputs_and_grads(ssd_chunked, inp, chunk_size=chunk_size)
    assert_rel(y_c, y_r, what="y")
    assert_rel(f_c, f_r, what="final")
    for k in g_r:
        assert_rel(g_c[k], g_r[k], what=f"grad {k}")


def test_short_inputs_are_not_padded_and_chunks_are_capped():
    """A decode step (T = 1) or a short prefill costs the same matmul FLOPs whatever chunk_size is: the
    chunk shrinks to T instead of padding T up to chunk_size (O(chunk^2) work per step). A long input
    runs in chunks of at most MAX_CHUNK, where the CPU path is fastest, even when asked for more."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixlab.ops.ssd.chunked import MAX_CHUNK

    gen = torch.Generator().manual_seed(11)
    for T, small in ((1, 1), (3, 3), (3 * MAX_CHUNK, MAX_CHUNK)):
        inp = {k: (v.detach() if v is not None else None) for k, v in make_inputs(gen, 2, T, 4, 8, 2, 16).items()}
        flops = []
        for chunk_size in (small, 4 * MAX_CHUNK):
            with FlopCounterMode(display=False) as counter:
                run(ssd_chunked, inp, chunk_size=chunk_size)
            flops.append(counter.get_total_flops())
        assert flops[0] == flops[1] > 0, f"T={T}: {flops[1]} FLOPs with chunk_size={4 * MAX_CHUNK} vs {flops[0]}"


@pytest.mark.parametrize("with_init", [False, True])
def test_packed_sequences_equal_separate_runs(with_init):
    gen = torch.Generator().manual_seed(11)
    lens = [5, 0, 70, 1, 24]
    offs = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    T = int(offs[-1])
    inp = make_inputs(gen, b=1, T=T, H=4, P=2, G=2, N=3, n_seq=len(lens), init=with_init)
    y_r, f_r, g_r = outputs_and_grads(ssd_reference, inp, cu_seqlens=offs)
    y_c, f_c, g_c = outputs_and_grads(ssd_chunked, inp, cu_seqlens=offs, chunk_size=16)
    assert_rel(y_c, y_r, what="y")
    assert_rel(f_c, f_r, what="final")
    for k in g_r:
        assert_rel(g_c[k], g_r[k], what=f"grad {k}")
    # each packed sequence equals an unpacked run of that sequence alone: states never cross boundaries
    with torch.no_grad():
        for i, (s, e) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist())):
            one = {k: v for k, v in inp.items()}
            for k in ("x", "dt", "B", "C", "z"):
                one[k] = inp[k][:, s:e]
            one["initial_state"] = inp["initial_state"][i : i + 1] if with_init else None
            y_i, f_i = run(ssd_chunked, one, chunk_size=16)
            assert_rel(y_c[:, s:e], y_i, what=f"sequence {i} y")
            assert_rel(f_c[i : i + 1], f_i, what=f"sequence {i} final")


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """The paper's Listing 1 (mamba_ssm's ``ssd_minimal_discrete``), transcribed with plain torch ops.

    X ``[b, T, H, P]`` (already times dt), A ``[b, T, H]`` (already times dt), B/C ``[b, T, 1, N]``."""

    def segsum(x):
        T = x.size(-1)
        x = x[..., None].expand(*x.shape, T)
        x = x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1), 0)
        x = torch.cumsum(x, dim=-2)
        return x.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=0), -torch.inf)

    b, T, H, P = X.shape
    nc = T // block_len
    X, A, B, C = (t.reshape(b, nc, block_len, *t.shape[2:]) for t in (X, A, B, C))
    A = A.permute(0, 3, 1, 2)  # b h c l
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclgn,bcsgn,bhcls,bcshp->bclhp", C, B, L, X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclgn,bhcl,bclhp->bcghpn", B, decay_states, X)
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bcghpn->bzghpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclgn,bcghpn,bhcl->bclhp", C, states, state_decay_out)
    return (Y_diag + Y_off).reshape(b, T, H, P), final_state


@pytest.mark.parametrize("fn", [ssd_reference, ssd_chunked])
@pytest.mark.parametrize("init", [False, True])
def test_semantics_match_ssd_minimal_discrete(fn, init):
    gen = torch.Generator().manual_seed(3 + init)
    b, T, H, P, N, block = 2, 32, 3, 4, 5, 8
    x = torch.randn(b, T, H, P, generator=gen, dtype=F64)
    dt = F.softplus(torch.randn(b, T, H, generator=gen, dtype=F64) - 1)
    A = -torch.rand(H, generator=gen, dtype=F64) - 0.2
    B = torch.randn(b, T, 1, N, generator=gen, dtype=F64)
    C = torch.randn(b, T, 1, N, generator=gen, dtype=F64)
    h0 = torch.randn(b, H, P, N, generator=gen, dtype=F64) if init else None
    y_min, final_min = ssd_minimal_discrete(
        x * dt[..., None], A * dt, B, C, block, None if h0 is None else h0[:, None, None]
    )
    y, final = fn(x, dt, A, B, C, initial_state=h0, output_final_state=True)
    assert_rel(y, y_min, rtol=1e-10, what="y")
    assert_rel(final, final_min[:, 0], rtol=1e-10, what="final state")


def test_scalar_closed_form():
    """One head, P = N = 1: h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t; y_t = (c_t h_t + D x_t) silu(z_t)."""
    xs, raw_dt, bs, cs, zs = [0.5, -1.0, 2.0], [0.3, -0.2, 1.1], [1.5, -0.5, 0.25], [2.0, 1.0, -3.0], [0.1, 1.0, -2]
    a, Dv, bias, h = -0.8, 0.7, 0.2, 0.4
    expected = []
    for x_t, d_t, b_t, c_t, z_t in zip(xs, raw_dt, bs, cs, zs):
        dt = math.log1p(math.exp(d_t + bias))
        h = math.exp(dt * a) * h + dt * x_t * b_t
        expected.append((c_t * h + Dv * x_t) * z_t / (1 + math.exp(-z_t)))

    def t(v, *shape):
        return torch.tensor(v, dtype=F64).reshape(*shape)

    for fn in (ssd_reference, ssd_chunked):
        y, final = fn(
            t(xs, 1, 3, 1, 1),
            t(raw_dt, 1, 3, 1),
            t([a], 1),
            t(bs, 1, 3, 1, 1),
            t(cs, 1, 3, 1, 1),
            D=t([Dv], 1),
            z=t(zs, 1, 3, 1, 1),
            dt_bias=t([bias], 1),
            dt_softplus=True,
            initial_state=t([0.4], 1, 1, 1, 1),
            output_final_state=True,
        )
        torch.testing.assert_close(y.flatten(), t(expected, 3), rtol=1e-12, atol=0)
        assert final.item() == pytest.approx(h, rel=1e-12)


def test_heads_share_groups_contiguously():
    """With G groups, head h reads B/C of group h // (H/G): equal to expanding B/C per head."""
    gen = torch.Generator().manual_seed(5)
    b, T, H, P, G, N = 1, 9, 6, 2, 3, 4
    x = torch.randn(b, T, H, P, generator=gen, dtype=F64)
    dt = torch.rand(b, T, H, generator=gen, dtype=F64)
    A = -torch.rand(H, generator=gen, dtype=F64)
    B = torch.randn(b, T, G, N, generator=gen, dtype=F64)
    C = torch.randn(b, T, G, N, generator=gen, dtype=F64)
    y_g, _ = ssd_chunked(x, dt, A, B, C)
    y_h, _ = ssd_reference(x, dt, A, B.repeat_interleave(2, dim=2), C.repeat_interleave(2, dim=2))
    assert_rel(y_g, y_h)


def test_dispatch_dtypes_and_errors():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, 4, 3, generator=gen, dtype=torch.bfloat16)
    dt = torch.rand(2, 10, 4, generator=gen)
    A = -torch.rand(4, generator=gen)
    B = torch.randn(2, 10, 2, 5, generator=gen)
    for backend in ("reference", "chunked", "auto"):
        y, final = ssd(x, dt, A, B, B, output_final_state=True, backend=backend)
        assert y.dtype == torch.bfloat16 and final.dtype == torch.float32 and final.shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match="multiple of the groups"):
        ssd(x, dt, A, B[:, :, :1].expand(2, 10, 3, 5), B[:, :, :1].expand(2, 10, 3, 5))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd(x[:1], dt[:1], A, B[:1], B[:1], cu_seqlens=torch.tensor([0, 4, 9]), backend="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, B, chunk_size=0, backend="chunked")
