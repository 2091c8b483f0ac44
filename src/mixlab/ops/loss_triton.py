"""Triton kernel for the chunked LM loss: per-row log-sum-exp, loss and d(loss)/d(logits) in place.

For one chunk of logits ``[rows, V]`` (bf16/fp16/fp32) this reads each row twice and writes it once:
pass 1 is an online max/sum for the log-sum-exp, pass 2 overwrites the row with
``scale_r · (softmax(row) − onehot(target_r))`` in the logits' dtype. The plain-PyTorch path of
:mod:`mixlab.ops.loss` needs about ten float32 passes over the same chunk for this.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_softmax_grad_kernel(
    logits_ptr,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    V,
    stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    scale = tl.load(scale_ptr + row)
    cols = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # Lanes that have seen only -inf keep s = 0 (avoid exp(-inf - -inf) = nan).
        s = tl.where(m_new == float("-inf"), 0.0, s * tl.exp(m - m_new) + tl.exp(x - m_new))
        m = m_new
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - m_row)), axis=0)
    lse = m_row + tl.log(s_row)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, (lse - picked) * (scale != 0.0))
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(start + cols == target, p - 1.0, p) * scale
        tl.store(base + start + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)


def row_softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: ``logits [R, V]`` becomes ``scale[:, None] * (softmax(logits) - onehot(targets))``.

    Args:
        logits: ``[R, V]``, contiguous in the last dim; overwritten with the gradient.
        targets: ``[R]`` int64 class ids (any valid id where ``scale`` is 0).
        scale: ``[R]`` float32 row weights (``1/n_valid`` for a mean, 0 for ignored rows).

    Returns:
        ``[R]`` float32 per-row losses ``lse - logit[target]`` (0 where ``scale`` is 0).
    """
    if logits.stride(-1) != 1:
        raise ValueError("row_softmax_grad_: logits must be contiguous in the vocabulary dim")
    R, V = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R == 0:
        return loss
    block = min(4096, triton.next_power_of_2(V))
    _row_softmax_grad_kernel[(R,)](
        logits, targets.contiguous(), scale.contiguous(), loss, V, logits.stride(0), BLOCK=block, num_warps=8
    )
    return loss
