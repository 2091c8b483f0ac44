"""Memory-lean language-model loss: the LM head and cross-entropy computed in chunks of tokens.

``linear_cross_entropy(hidden, weight, targets)`` equals
``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)`` but never holds the full
``[tokens, vocab]`` logits: each chunk's logits are formed, reduced to its loss, turned into its
gradients at once (softmax minus one-hot) and dropped. The gradients are kept for backward, which
only scales them by the incoming gradient. Peak extra memory is one chunk of logits plus the
gradients of ``hidden`` and ``weight`` (which training needs anyway).

The three matmuls per chunk (logits, d hidden, d weight) run on tensor cores through PyTorch. What is
left — log-sum-exp, loss and softmax-minus-one-hot — is one Triton kernel on CUDA
(:mod:`mixlab.ops.loss_triton`: two reads and one in-place write of the chunk in its own dtype),
and plain PyTorch elsewhere (about ten float32 passes over the chunk, fine on a CPU).
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend

#: Default number of logit elements per chunk (rows x vocab) of the plain path, which holds the chunk's logits in
#: float32 and a few temporaries of its size: 2^26 floats = 256 MiB each.
DEFAULT_CHUNK_ELEMENTS = 1 << 26
#: The same for the fused path, which holds one chunk of logits in the input dtype and overwrites it with their
#: gradient: 2^28 bf16 = 512 MiB. Each chunk adds its weight gradient into the float32 ``[V, d]`` one (a read and
#: a write of it), so fewer, larger chunks move fewer bytes: see benchmarks/NOTES-kernels.md (v15).
FUSED_CHUNK_ELEMENTS = 1 << 28
#: Default chunks are a multiple of this many rows (whole GEMM tiles) when they hold at least as many.
CHUNK_ROW_MULTIPLE = 128


def default_chunk_rows(vocab: int, fused: bool) -> int:
    """Tokens per chunk for a vocabulary of ``vocab``: about ``FUSED_CHUNK_ELEMENTS`` (fused path) or
    ``DEFAULT_CHUNK_ELEMENTS`` logits, rounded down to a multiple of ``CHUNK_ROW_MULTIPLE`` rows."""
    rows = max(1, (FUSED_CHUNK_ELEMENTS if fused else DEFAULT_CHUNK_ELEMENTS) // vocab)
    return rows - rows % CHUNK_ROW_MULTIPLE if rows >= CHUNK_ROW_MULTIPLE else rows


def _add_weight_grad_(grad_w: torch.Tensor, d_logits: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_w += d_logits.T @ h`` for one chunk: grad_w ``[V, d]`` float32 (float64), d_logits ``[rows, V]``, h
    ``[rows, d]``. With bf16/fp16 factors on CUDA one GEMM accumulates into grad_w in float32 (``addmm`` with
    ``out_dtype``): no product rounded to 16 bits, and no cast and add passes over ``[V, d]`` per chunk."""
    low = h.dtype in (torch.bfloat16, torch.float16) and grad_w.dtype == torch.float32
    if low and grad_w.is_cuda and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.ops.aten.addmm.dtype_out(grad_w, d_logits.t(), h, torch.float32, out=grad_w)
    else:
        grad_w += (d_logits.t() @ h).to(grad_w.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk_rows, with_grads, fused, compact):  # type: ignore[override]
        n, _ = hidden.shape
        need_dh = with_grads and ctx.needs_input_grad[0]
        need_dw = with_grads and ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        valid = targets != ignore_index
        rows, full_shape = None, hidden.shape
        denom: float | torch.Tensor = 1
        if compact is False:  # no host-side count: the denominator stays on the device, every row runs
            if reduction == "mean":
                denom = valid.sum().clamp(min=1).to(acc)
        else:
            n_valid = int(valid.sum())  # a device synchronisation
            denom = max(n_valid, 1) if reduction == "mean" else 1
            if compact or n_valid < n // 2:  # mostly unscored rows (synthetic tasks): only scored ones meet the head
                rows = valid.nonzero().squeeze(1)
                hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
                valid, n = valid.index_select(0, rows), n_valid
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_dh else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h = hidden[start : start + chunk_rows]
                t = targets[start : start + chunk_rows]
                m = valid[start : start + chunk_rows]
                safe_t = torch.where(m, t, torch.zeros_like(t))
                if fused:
                    from .loss_triton import row_softmax_grad_

                    d_logits = h @ w.t()  # [rows, V], overwritten with d loss / d logits
                    row_loss = row_softmax_grad_(d_logits, safe_t, m.to(torch.float32) / denom)
                    total += row_loss.sum()
                    if need_dh:
                        grad_h[start : start + chunk_rows] = d_logits @ w
                    if need_dw:
                        _add_weight_grad_(grad_w, d_logits, h)
                    del d_logits
                    continue
                logits = (h @ w.t()).to(acc)  # [rows, V]
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += ((lse - picked) * m).sum()
                if need_dh or need_dw:
                    # d loss / d logits = (softmax - onehot) / denom on valid rows, 0 elsewhere.
                    probs = torch.exp(logits - lse[:, None])
                    probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(picked)[:, None])
                    probs *= (m.to(acc) / denom)[:, None]
                    d_logits = probs.to(hidden.dtype)
                    if need_dh:
                        grad_h[start : start + chunk_rows] = d_logits @ w
                    if need_dw:
                        _add_weight_grad_(grad_w, d_logits, h)
                del logits
        if need_dh and rows is not None:
            grad_h = torch.zeros(full_shape, dtype=grad_h.dtype, device=grad_h.device).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(grad_h if need_dh else torch.empty(0), grad_w if need_dw else torch.empty(0))
        ctx.need = (need_dh, need_dw)
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        need_dh, need_dw = ctx.need
        dh = grad_h * grad_out.to(grad_h.dtype) if need_dh else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if need_dw else None
        return dh, dw, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    backend: str = "auto",
    compact: bool | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` without materialising the logits.

    Args:
        hidden: ``[N, d]`` (or ``[..., d]``, flattened) final hidden states.
        weight: ``[V, d]`` LM-head weight.
        targets: ``[N]`` (or ``[...]``) int64 token ids; ``ignore_index`` entries are skipped.
        reduction: ``"mean"`` over non-ignored targets, or ``"sum"``.
        chunk_rows: tokens per chunk; default :func:`default_chunk_rows` (a chunk's logits near 2^28 elements on
            the fused path, 2^26 on the plain one).
        backend: ``auto`` (fused Triton softmax-gradient kernel on CUDA, plain PyTorch elsewhere),
            ``triton``, or ``chunked``/``reference`` (plain PyTorch).
        compact: ``None`` (default): count the scored targets on the host (one device synchronisation) and,
            when fewer than half are scored, run only their rows through the LM head (synthetic tasks);
            ``True``: always run only the scored rows; ``False``: no count, no synchronisation, every row runs
            (language modelling, where every target is scored: the host can keep queueing the backward while
            the device still runs the forward).

    Returns:
        A float32 scalar (float64 for float64 inputs).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"linear_cross_entropy: weight must be [V, {d}], got {list(weight.shape)}")
    hidden = hidden.reshape(-1, d)
    targets = targets.reshape(-1)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: {targets.numel()} targets for {hidden.shape[0]} hidden rows; they must match"
        )
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # The fused kernel computes in float32: float64 inputs keep the exact plain path.
    fused = resolve_backend(backend, hidden) == "triton" and hidden.dtype != torch.float64
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], fused)
    return _LinearCrossEntropy.apply(
        hidden, weight, targets, ignore_index, reduction, int(chunk_rows), with_grads, fused, compact
    )


__all__ = ["linear_cross_entropy"]
