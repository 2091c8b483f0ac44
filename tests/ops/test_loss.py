import pytest
import torch
import torch.nn.functional as F

from mixlab.ops.loss import linear_cross_entropy


def _inputs(n=37, d=16, v=50, dtype=torch.float64, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return h, w, t


@pytest.mark.parametrize("compact", [None, True, False])  # None: compacts at 0.9 only
@pytest.mark.parametrize("ignore_frac", [0.2, 0.9])  # 0.9: only the scored rows meet the LM head
@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_full_logits_loss_and_grads(chunk_rows, reduction, ignore_frac, compact):
    h, w, t = _inputs(ignore_frac=ignore_frac)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, chunk_rows=chunk_rows, compact=compact)
    gh, gw = torch.autograd.grad(loss * 1.7, (h, w))
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100, reduction=reduction)
    rh, rw = torch.autograd.grad(ref * 1.7, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, rh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


def test_frozen_weight_and_3d_hidden():
    h, w, t = _inputs(n=24)
    w = w.detach()
    h3 = h.reshape(4, 6, -1)
    loss = linear_cross_entropy(h3, w, t.reshape(4, 6), chunk_rows=7)
    (gh,) = torch.autograd.grad(loss, (h,))
    ref = F.cross_entropy(h @ w.t(), t)
    (rh,) = torch.autograd.grad(ref, (h,))
    torch.testing.assert_close(gh, rh)


def test_no_grad_and_all_ignored():
    h, w, t = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t).detach(), rtol=1e-12, atol=0)
    t_all = torch.full_like(t, -100)
    loss0 = linear_cross_entropy(h, w, t_all)
    assert loss0.item() == 0.0
    (gh,) = torch.autograd.grad(loss0, (h,))
    assert torch.count_nonzero(gh) == 0


def test_bad_shapes_are_named():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :3], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")


def test_low_precision_inputs_accumulate_in_float32():
    h, w, t = _inputs(dtype=torch.float32)
    hb = h.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, w, t, chunk_rows=8)
    assert loss.dtype == torch.float32
    (gh,) = torch.autograd.grad(loss, (hb,))
    assert gh.dtype == torch.bfloat16
    ref = F.cross_entropy(hb.float() @ w.detach().bfloat16().float().t(), t)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-2)


def test_compact_false_never_counts_on_the_host(monkeypatch):
    """``compact=False`` (the trainer on token streams) keeps the denominator on the device: no ``int(tensor)``
    (a device synchronisation on CUDA), still the exact mean over the scored targets."""
    h, w, t = _inputs(ignore_frac=0.3)

    def no_host_count(self):
        raise AssertionError("host-side count of the scored targets")

    monkeypatch.setattr(torch.Tensor, "__int__", no_host_count)
    loss = linear_cross_entropy(h, w, t, chunk_rows=5, compact=False)
    with pytest.raises(AssertionError, match="host-side count"):
        linear_cross_entropy(h, w, t, chunk_rows=5)
    monkeypatch.undo()
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t(), t), rtol=1e-12, atol=0)
