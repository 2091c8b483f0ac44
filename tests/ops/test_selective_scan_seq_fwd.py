"""v3 selective-scan forward (``seq_fwd``) vs v2's forward op and the float64 reference.

Runs on the CPU under ``TRITON_INTERPRET=1`` (set here before Triton is imported) at tiny shapes; set
``TRITON_INTERPRET=0`` on a CUDA machine to run the same checks on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

from mixlab.ops.selective_scan.triton.op import selective_scan_fwd
from mixlab.ops.selective_scan.triton.seq_fwd import _exp2_fma, seq_fwd

from .test_selective_scan_triton import _inputs, _reference


@triton.jit
def _exp2_fma_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _exp2_fma(tl.load(x_ptr + offs)))


ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _run(ins, softplus, block_l, bt, bd, **kw):
    """(out, last_state, states) of v3 and of v2's forward op (cfg [block_l, bd, 1, bd, 1])."""
    ins = dict(ins)
    for k in ("B", "C"):
        if ins[k].dim() == 3:
            ins[k] = ins[k].unsqueeze(1)
    args = [ins.get(k) for k in ARGS]
    v3 = seq_fwd(*args, softplus, block_l, bt, bd, 1, **kw)
    # v2's op rejects N = 1 (its last state aliases its state buffer there)
    v2 = selective_scan_fwd(*args, softplus, [block_l, bd, 1, bd, 1]) if ins["A"].shape[1] > 1 else None
    return v3, v2


def _check(ins, softplus, block_l, bt, bd, atol, **kw):
    (y, last, states), v2 = _run(ins, softplus, block_l, bt, bd, **kw)
    assert y.dtype == ins["u"].dtype and y.shape == ins["u"].shape
    assert last.is_contiguous() and last.data_ptr() != states.data_ptr()
    if v2 is not None:
        y2, last2, states2 = v2
        assert states.shape == states2.shape and states.dtype == states2.dtype
        assert last.shape == last2.shape and last.dtype == last2.dtype
        torch.testing.assert_close(states, states2, atol=atol, rtol=atol)
        torch.testing.assert_close(last, last2, atol=atol, rtol=atol)
        torch.testing.assert_close(y.double(), y2.double(), atol=atol, rtol=atol)
    ref_in = {k: v for k, v in ins.items()}
    y_ref, last_ref = _reference(**ref_in, delta_softplus=softplus)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=atol)
    torch.testing.assert_close(last.double(), last_ref, atol=atol, rtol=atol)


def test_all_features_float64_grouped_partial():
    # 2 groups of 4 channels, z, D, bias + softplus, initial state; L = 21 is not a multiple of bt 4 nor block_l 8;
    # N = 3 is padded to 4 in the state tile
    ins = _inputs(2, 8, 21, 3, 2, torch.float64, seed=0)
    _check(ins, True, 8, 4, 4, 1e-10)


@pytest.mark.parametrize("n", [4, 1])
def test_plain_float64_no_optional_inputs(n):
    # no z / D / bias / softplus / initial state; ungrouped B/C [B, N, L]
    ins = _inputs(1, 4, 13, n, 1, torch.float64, seed=1, grouped=False, full=False)
    _check(ins, False, 4, 4, 4, 1e-10)


@pytest.mark.parametrize("a_reg,bc_pack,prefetch", [(0, 0, 0), (1, 0, 1), (0, 1, 0)])
def test_variants_float64(a_reg, bc_pack, prefetch):
    # A loaded per state, B/C read in place (unpacked, masked in the last chunk), no prefetch; two chunks of bt 8
    ins = _inputs(1, 8, 17, 2, 2, torch.float64, seed=5)
    _check(ins, True, 16, 8, 4, 1e-10, a_reg=a_reg, bc_pack=bc_pack, prefetch=prefetch)


@pytest.mark.parametrize("col_store", [0, 1])
def test_state_slots_stored_as_a_tile_or_by_column(col_store):
    # several state slots (block_l 8 over L = 37), N = 3 padded to 4: only the real state columns are written
    ins = _inputs(2, 4, 37, 3, 2, torch.float64, seed=8)
    _check(ins, True, 8, 4, 2, 1e-10, col_store=col_store)


@pytest.mark.parametrize("length", [5, 16])
def test_shorter_than_a_chunk_and_exact_blocks(length):
    # L < bt (only the masked chunk runs) and L a multiple of block_l (the last full chunk writes the final slot)
    ins = _inputs(1, 4, length, 2, 1, torch.float64, seed=6)
    _check(ins, True, 8, 8, 4, 1e-10)


@pytest.mark.parametrize("emu", [0, 2])
def test_float32_polynomial_softplus_and_fma_exp2(emu):
    # the GPU's softplus (degree-8 log1p fit) and, for the last emu states, the FMA-pipe exp2, float32 vs float64
    ins = _inputs(1, 4, 12, 3, 1, torch.float32, seed=7)
    _check(ins, True, 8, 4, 4, 2e-5, softplus_poly=1, emu=emu)


def test_fma_exp2_accuracy():
    # _exp2_fma over [-130, 0] (clamped at 2^-125) against exp2 in float64: relative error <= 3e-7
    x = torch.linspace(-130.0, 0.0, 4096, dtype=torch.float32)
    y = torch.empty_like(x)
    _exp2_fma_kernel[(4,)](x, y, BLOCK=1024)
    ref = torch.exp2(x.double().clamp(min=-125.0))
    assert ((y.double() - ref).abs() / ref).max().item() <= 3e-7


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_inputs(dtype, atol):
    ins = _inputs(1, 4, 12, 2, 1, dtype, seed=2)
    _check(ins, True, 8, 8, 4, atol)


@pytest.mark.parametrize(
    "length,segments",
    [
        (37, 2),  # 5 blocks of 8: segments of 3 and 2, the last with the partial block
        (37, 3),  # 2, 2, 1
        (32, 4),  # L a multiple of block_l: the last segment's last chunk writes the final slot
        (48, 4),  # 6 blocks: segments of 2 (cdiv(6, 4)), so 3 of them
    ],
)
def test_time_segments_float64(length, segments):
    # the sequence split into segments run in parallel: the carry pass's end states and decays, the chain into the
    # states buffer, then every segment from its entering state; grouped B/C, z, D, bias + softplus, initial state
    ins = _inputs(2, 8, length, 3, 2, torch.float64, seed=40 + segments)
    _check(ins, True, 8, 4, 4, 1e-10, segments=segments)


def test_time_segments_bf16():
    ins = _inputs(1, 32, 64, 2, 1, torch.bfloat16, seed=9)
    _check(ins, True, 16, 8, 32, 3e-2, segments=4)
