"""The compiled mode of :mod:`mixlab.bench.activations`: what inductor's partition of a block saves."""

from __future__ import annotations

import torch
from torch import nn

from mixlab.bench.activations import measure_saved
from mixlab.layers.mlp import SwiGLU
from mixlab.layers.norm import RMSNorm

D, H = 32, 64


class _Chain(nn.Module):
    """``x + l2(l1(x))``, or with ``gate`` ``x + l2(l1(x)) * l3(x)`` (saves two more tensors)."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)
        self.l3 = nn.Linear(D, D, bias=False) if gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.l2(self.l1(x))
        return x + (y * self.l3(x) if self.l3 is not None else y)


def _compiled(build, amp=None) -> float:
    return measure_saved(build, D, seq_lens=(64, 128), amp=amp, compiled=True, triton=False).total


def test_compiled_counts_the_saved_inputs_of_each_matmul():
    # float32, no autocast: l1 keeps x [D], l2 keeps l1(x) [H]
    assert _compiled(lambda: _Chain(False)) == (D + H) * 4


def test_compiled_sees_a_block_that_saves_more():
    assert _compiled(lambda: _Chain(True)) >= _compiled(lambda: _Chain(False)) + 2 * D * 4


def test_compiled_swiglu_keeps_only_its_input_and_both_projections():
    # bf16: x for the two weight gradients, g and u; not silu(g) * u (recomputed in backward)
    assert _compiled(lambda: SwiGLU(D, H), amp=torch.bfloat16) == (D + 2 * H) * 2


def test_compiled_rms_norm_keeps_a_bf16_copy_of_a_float32_input():
    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = RMSNorm(D)
            self.proj = nn.Linear(D, D, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(self.norm(x, out_dtype=torch.bfloat16)).float()

    # the norm's bf16 copy of x, the projection's bf16 input, rstd
    assert _compiled(Norm, amp=torch.bfloat16) == D * 2 + D * 2 + 4
