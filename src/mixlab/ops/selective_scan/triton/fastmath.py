"""float32 math helpers shared by the v3 selective-scan kernels (``seq_fwd.py``, ``seq_bwd.py``).

``FAST`` (CUDA only) selects approximate PTX: ``ex2.approx.ftz`` (one MUFU.EX2; ``tl.exp2`` adds a denormal-range
fix-up, and decays below 2^-126 flush to 0 here) and ``rcp.approx.ftz`` (``tl.sigmoid`` divides in IEEE). The CPU
interpreter has no inline PTX and always takes the exact path.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_LOG2E = tl.constexpr(-1.4426950408889634)


@triton.jit
def exp2(x, FAST: tl.constexpr):
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def sigmoid(x, FAST: tl.constexpr):
    if FAST:  # ex2 and rcp: 4 instructions instead of ~11
        e = exp2(x * NEG_LOG2E, FAST)
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.sigmoid(x)


@triton.jit
def softplus_poly(x, FAST: tl.constexpr):
    """float32 softplus as ``max(x, 0) + log1p(e)``, ``e = exp(-|x|)`` in (0, 1], with log1p(e) = e P(e) and P a
    degree-8 fit of log1p(e) / e on [0, 1] (relative error 2.3e-7 in float32 Horner): one MUFU and ~11 FMA-pipe
    instructions instead of a logf and a division. Above x = 20 it rounds to x, as the thresholded form."""
    e = exp2(tl.abs(x) * NEG_LOG2E, FAST)
    p = 0.005232624243944883 * e - 0.029504956677556038
    p = p * e + 0.07822549343109131
    p = p * e - 0.1366320699453354
    p = p * e + 0.1910598874092102
    p = p * e - 0.2484297752380371
    p = p * e + 0.3331909477710724
    p = p * e - 0.4999949336051941
    p = p * e + 0.9999999403953552
    return tl.maximum(x, 0.0) + e * p
