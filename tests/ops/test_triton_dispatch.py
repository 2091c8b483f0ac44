"""backend="triton" routes short inputs without gradients to the fused token-by-token kernels, and
everything else to the chunk kernels; both agree with the reference. CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops import delta_rule, ssd


def _delta_inputs(T, gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 2, 16, 16
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    gate = -torch.rand(B, T, H, generator=g) if gated else None
    h0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, beta, gate, h0


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_short_input_without_grad_uses_the_recurrent_kernel(gated, monkeypatch):
    from mixlab.ops.delta_rule import triton as tri

    calls = []
    real = tri.delta_rule_recurrent_triton
    monkeypatch.setattr(tri, "delta_rule_recurrent_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, beta, gate, h0 = _delta_inputs(5, gated)
    with torch.no_grad():
        o, s = delta_rule(q, k, v, beta, gate, initial_state=h0, output_final_state=True, backend="triton")
    ro, rs = delta_rule(q, k, v, beta, gate, initial_state=h0, output_final_state=True, backend="reference")
    assert calls == [1]
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-5)
    # With gradients the chunk kernel runs (the recurrent kernel has no backward).
    q.requires_grad_()
    o2, _ = delta_rule(q, k, v, beta, gate, initial_state=h0, backend="triton")
    assert calls == [1] and o2.requires_grad


def test_ssd_short_input_without_grad_uses_the_recurrent_kernel(monkeypatch):
    from mixlab.ops.ssd import triton as tri

    calls = []
    real = tri.ssd_recurrent_triton
    monkeypatch.setattr(tri, "ssd_recurrent_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    B, T, H, P, G, N = 2, 3, 4, 8, 2, 16
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.randn(B, T, H, generator=g)
    A = -torch.rand(H, generator=g) - 0.1
    Bm = torch.randn(B, T, G, N, generator=g)
    Cm = torch.randn(B, T, G, N, generator=g)
    kw = dict(
        D=torch.randn(H, generator=g), z=torch.randn(B, T, H, P, generator=g), dt_bias=torch.randn(H, generator=g)
    )
    kw.update(dt_softplus=True, initial_state=torch.randn(B, H, P, N, generator=g), output_final_state=True)
    with torch.no_grad():
        y, s = ssd(x, dt, A, Bm, Cm, backend="triton", **kw)
    ry, rs = ssd(x, dt, A, Bm, Cm, backend="reference", **kw)
    assert calls == [1]
    torch.testing.assert_close(y, ry, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-4)


def test_a_launch_beyond_shared_memory_runs_again_with_fewer_stages(monkeypatch):
    """``chunk._fit``: a launch that raises OutOfResources (float32 tiles at K = 256 on sm_90) is retried one
    pipeline stage lower, the stages that fit are kept for the next launch with the same arguments, and a kernel
    that does not fit at its floor raises."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from mixlab.ops._triton import chunk

    monkeypatch.setattr(chunk, "_STAGES_FITTED", {})
    calls = []

    class FakeKernel:
        __name__ = "fake"

        def __getitem__(self, grid):
            def run(*args, num_stages=3, **kw):
                calls.append(num_stages)
                if num_stages > 2 - kw.get("tight", 0):
                    raise OutOfResources(262144, 232448, "shared memory")
                return num_stages

            return run

    k = FakeKernel()
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="num_stages 2"):
        assert chunk._fit(k)[(1,)](x, num_warps=4, num_stages=3) == 2
    assert calls == [3, 2]
    assert chunk._fit(k)[(1,)](x, num_warps=4, num_stages=3) == 2  # remembered: no failing launch first
    assert calls == [3, 2, 2]
    # the sequential kernels go down to one stage in float32 only (one stage faulted in bf16 at K = 256)
    assert chunk._seq_floor(x) == 1 and chunk._seq_floor(x.bfloat16()) == 2
    with pytest.raises(RuntimeError, match=r"K=256, V=512 in torch\.float32 do not fit"), pytest.warns(UserWarning):
        chunk._fit(k, 2)[(1,)](x, num_warps=4, num_stages=3, tight=1, K=256, V=512)  # fits at one stage only
