import pytest
import torch

from mixlab.ops.conv import causal_conv1d


def naive_conv(x, w, b, act, init):
    """Per-position sum written out: y[t] = b + sum_i w[:, i] * xpad[t + i]."""
    B, T, C = x.shape
    W = w.shape[1]
    prev = torch.zeros(B, W - 1, C, dtype=x.dtype) if init is None else init.transpose(1, 2)
    xp = torch.cat([prev, x], dim=1)
    y = torch.stack([(xp[:, t : t + W, :] * w.t()).sum(1) for t in range(T)], dim=1)
    if b is not None:
        y = y + b
    return torch.nn.functional.silu(y) if act else y


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_naive_and_grads(W, T, with_state):
    g = torch.Generator().manual_seed(W * 100 + T)
    B, C = 2, 6
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, W, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, C, W - 1, generator=g, dtype=torch.float64, requires_grad=True) if with_state else None
    y, _ = causal_conv1d(x, w, b, activation="silu", initial_state=s)
    ref = naive_conv(x, w, b, True, s)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    inputs = (x, w, b) + ((s,) if with_state else ())
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, inputs, gy)
    g2 = torch.autograd.grad(ref, inputs, gy)
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_state_continues_sequence_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 5, generator=g)
    w = torch.randn(5, 1, 4, generator=g)  # nn.Conv1d layout accepted
    full, full_state = causal_conv1d(x, w, None, "silu", output_final_state=True)
    y1, s = causal_conv1d(x[:, :6], w, None, "silu", output_final_state=True)
    outs = [y1]
    for t in range(6, 11):  # one-token decode steps
        yt, s = causal_conv1d(x[:, t : t + 1], w, None, "silu", initial_state=s, output_final_state=True)
        outs.append(yt)
    torch.testing.assert_close(torch.cat(outs, 1), full)
    torch.testing.assert_close(s, full_state)
    torch.testing.assert_close(full_state, x[:, -3:].transpose(1, 2))


def test_short_sequence_state_keeps_older_inputs():
    x = torch.arange(1.0, 3.0).reshape(1, 2, 1)
    init = torch.tensor([[[-1.0, -2.0, -3.0]]])
    _, s = causal_conv1d(x, torch.ones(1, 4), initial_state=init, output_final_state=True)
    assert s.flatten().tolist() == [-3.0, 1.0, 2.0]


def test_errors_name_the_problem():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, torch.randn(3, 4), initial_state=torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(3, 4), activation="relu")
