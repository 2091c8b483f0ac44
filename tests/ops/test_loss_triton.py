"""The fused softmax-gradient kernel of the chunked LM loss against the plain path and F.cross_entropy.

CPU under ``TRITON_INTERPRET=1`` (set here before Triton is imported) at tiny shapes; on a GPU with
``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mixlab.ops.loss import linear_cross_entropy
from mixlab.ops.loss_triton import row_softmax_grad_

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def test_row_kernel_matches_softmax_minus_onehot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 37, generator=g) * 4
    logits[2, :5] = float("-inf")  # masked entries must give probability 0, not nan
    targets = torch.randint(5, 37, (7,), generator=g)
    scale = torch.rand(7, generator=g)
    scale[3] = 0.0
    logits, targets, scale = logits.to(DEVICE), targets.to(DEVICE), scale.to(DEVICE)
    ref_loss = F.cross_entropy(logits, targets, reduction="none") * (scale != 0)
    ref_grad = (torch.softmax(logits, -1) - F.one_hot(targets, 37).to(logits.dtype)) * scale[:, None]
    work = logits.clone()
    loss = row_softmax_grad_(work, targets, scale)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(work, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_fused_loss_matches_full_logits(chunk_rows):
    g = torch.Generator().manual_seed(1)
    n, d, v = 29, 8, 5000  # v > the kernel's block: the vocabulary loop runs more than once
    h = torch.randn(n, d, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).to(DEVICE).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    t[::4] = -100
    loss = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows, backend="triton")
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.t(), t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_bf16_loss_and_gradients_against_float64(request):
    """bf16 hidden states and head (the training case): each chunk's weight gradient accumulates in float32 (on a
    GPU in one float32-output GEMM); loss and gradients against float64 on the same bf16 values."""
    if DEVICE == "cpu":
        request.getfixturevalue("bf16_interpreter")
    g = torch.Generator().manual_seed(2)
    n, d, v = 96, 32, 3000
    h = torch.randn(n, d, generator=g).bfloat16().to(DEVICE).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5).bfloat16().to(DEVICE).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    t[::5] = -100
    loss = linear_cross_entropy(h, w, t, chunk_rows=16, backend="triton")  # 6 chunks accumulate into dW
    gh, gw = torch.autograd.grad(loss, (h, w))
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.t(), t)
    rh, rw = torch.autograd.grad(ref, (hd, wd))
    assert gh.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-3)
    for a, r in ((gh, rh), (gw, rw)):
        err = ((a.double() - r).abs().max() / r.abs().max()).item()
        assert err < 2e-2, err
