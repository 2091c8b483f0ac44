"""Selective-scan backward v3 (``seq_bwd``) vs the float64 reference and vs v2's backward: all nine gradients.

The states buffer comes from v2's forward custom op. Runs on the CPU under ``TRITON_INTERPRET=1`` at tiny shapes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from mixlab.ops.selective_scan.reference import selective_scan_reference
from mixlab.ops.selective_scan.triton.op import selective_scan_bwd, selective_scan_fwd
from mixlab.ops.selective_scan.triton.seq_bwd import seq_bwd

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(bsz, dim, length, n, groups, dtype, seed, *, z=True, D=True, bias=True, h0=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    ins = {
        "u": r(bsz, dim, length),
        "delta": r(bsz, dim, length, scale=0.5),
        "A": -torch.rand(dim, n, generator=g, dtype=torch.float64).to(DEVICE) * 2 - 0.1,
        "B": r(bsz, groups, n, length),
        "C": r(bsz, groups, n, length),
        "D": r(dim) if D else None,
        "z": r(bsz, dim, length) if z else None,
        "delta_bias": r(dim, scale=0.5) if bias else None,
        "initial_state": r(bsz, dim, n) if h0 else None,
    }
    low = torch.float32 if dtype != torch.float64 else dtype
    return {k: (v.to(low if k in ("A", "initial_state") else dtype) if v is not None else None) for k, v in ins.items()}


def _states(ins, softplus, block_l):
    """(last state [B, D, N], states [B, nc + 1, N, D]) by the float64 recurrence, in the state dtype."""
    u, delta, A = ins["u"].double(), ins["delta"].double(), ins["A"].double()
    bsz, dim, length = u.shape
    if ins["delta_bias"] is not None:
        delta = delta + ins["delta_bias"].double()[:, None]
    if softplus:
        delta = torch.nn.functional.softplus(delta)
    B = ins["B"].double().repeat_interleave(dim // ins["B"].shape[1], dim=1)
    h = ins["initial_state"].double() if ins["initial_state"] is not None else u.new_zeros(bsz, dim, A.shape[1])
    slots = []
    for t in range(length):
        if t % block_l == 0:
            slots.append(h)
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
    slots.append(h)
    sd = torch.float64 if ins["u"].dtype == torch.float64 else torch.float32
    return h.to(sd), torch.stack(slots, 1).transpose(2, 3).contiguous().to(sd)


def _reference_grads(ins, softplus, dout, dlast):
    leaves = {k: v.detach().double().requires_grad_() for k, v in ins.items() if v is not None}
    kw = {k: leaves.get(k) for k in NAMES}
    y, last = selective_scan_reference(**kw, delta_softplus=softplus, return_last_state=True)
    loss = (y * dout.double()).sum() + (last * dlast.double()).sum() if dlast is not None else (y * dout.double()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return dict(zip(leaves, grads))


def _run(ins, softplus, block_l, bt, bd, num_warps=1, seed=7, with_dlast=True, rows=None, reduce_mode=1, prefetch=1,
         keep_gz=0, bc_f32=0, segments=1):  # fmt: skip
    """Returns (v3 grads, v2 grads, reference grads, dout, dlast) as dicts keyed by NAMES (present inputs only)."""
    bsz, dim, length = ins["u"].shape
    n = ins["A"].shape[1]
    cfg = [block_l, bd, 1, bd, 1, 1, 0, 0, 1]
    args = [ins[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    if n > 1:
        _, last, states = selective_scan_fwd(*args, ins["initial_state"], softplus, cfg)
    else:  # v2's op rejects N = 1 (its last_state is then a view of the states buffer): build the buffer here
        last, states = _states(ins, softplus, block_l)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(bsz, dim, length, generator=g, dtype=torch.float64).to(ins["u"].dtype).to(DEVICE)
    dlast = torch.randn(bsz, dim, n, generator=g, dtype=torch.float64).to(last.dtype).to(DEVICE) if with_dlast else None
    v3 = seq_bwd(
        *args,
        states,
        dout,
        dlast,
        softplus,
        block_l,
        bt,
        bd,
        num_warps,
        rows_per_thread=rows,
        reduce_mode=reduce_mode,
        prefetch=prefetch,
        keep_gz=keep_gz,
        bc_f32=bc_f32,
        segments=segments,
    )
    v2 = selective_scan_bwd(*args, states, dout, dlast, softplus, cfg)
    ref = _reference_grads(ins, softplus, dout, dlast)
    keys = NAMES
    return dict(zip(keys, v3)), dict(zip(keys, v2)), ref


def _check(ins, softplus, block_l, bt, bd, tol, **kw):
    v3, v2, ref = _run(ins, softplus, block_l, bt, bd, **kw)
    for k in NAMES:
        if ins[k] is None:
            if k != "initial_state":  # dinitial_state always comes back (zeros-start adjoint)
                assert v3[k].numel() == 0, k
            continue
        exp_dtype = ins[k].dtype if k != "initial_state" else v2[k].dtype
        assert v3[k].dtype == exp_dtype and v3[k].shape == v2[k].shape, k
        assert v3[k].is_contiguous(), k
        scale = max(1.0, ref[k].abs().max().item())
        torch.testing.assert_close(v3[k].double(), ref[k], atol=tol * scale, rtol=tol, msg=k)
        torch.testing.assert_close(v3[k].double(), v2[k].double(), atol=tol * scale, rtol=tol, msg=k)
    # without an initial state the reference has no gradient for it: compare with v2 only
    if ins["initial_state"] is None:
        torch.testing.assert_close(v3["initial_state"], v2["initial_state"], atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "length,block_l,bt,rows",
    [
        (19, 8, 4, 2),  # partial last block, two sub-tiles per block, 2 channel rows a thread (permuted channels)
        (21, 16, 4, 1),  # four sub-tiles, last block mostly masked
        (13, 8, 8, 4),  # one sub-tile per block
        (11, 8, 2, 1),  # L not a multiple of bt
        (9, 4, 1, 2),  # one step a thread
    ],
)
def test_all_features_float64(length, block_l, bt, rows):
    # grouped B/C (2 groups of 4 channels), D, z, bias + softplus, initial state and d(last state)
    ins = _inputs(2, 8, length, 3, 2, torch.float64, seed=length)
    _check(ins, True, block_l, bt, 4, 1e-10, rows=rows)


@pytest.mark.parametrize(
    "dim,bd,rows,bt,reduce_mode",
    [(64, 64, 2, 4, 1), (64, 64, 2, 4, 0), (64, 64, 1, 4, 1), (32, 32, 1, 8, 1), (32, 32, 1, 2, 1), (64, 32, 1, 1, 1)],
)
def test_channel_sums_by_halving(dim, bd, rows, bt, reduce_mode):
    # dB / dC summed over 32-lane warps of channels by recursive halving (emulated shuffles; bd 64 with one row a
    # thread = two warps), 2 groups where a group holds two blocks
    ins = _inputs(1, dim, 11, 2, 2 if dim // 2 >= bd else 1, torch.float64, seed=bt)
    _check(ins, True, 8, bt, bd, 1e-10, rows=rows, reduce_mode=reduce_mode)


@pytest.mark.parametrize("prefetch", [1, 0, 2])  # 2: only the [BD] rows come a state ahead
def test_plain_float64_one_group(prefetch):
    ins = _inputs(1, 4, 10, 4, 1, torch.float64, seed=1, z=False, D=False, bias=False, h0=False)
    _check(ins, False, 8, 4, 4, 1e-10, with_dlast=False, prefetch=prefetch)


@pytest.mark.parametrize("n", [1, 5])
def test_state_counts(n):
    ins = _inputs(1, 4, 7, n, 1, torch.float64, seed=10 + n)
    _check(ins, True, 4, 2, 4, 1e-10)


def test_single_step_and_block_per_thread():
    ins = _inputs(1, 4, 1, 2, 1, torch.float64, seed=2)
    _check(ins, True, 4, 4, 2, 1e-10)


@pytest.mark.parametrize("bd,bt,keep_gz,bc_f32", [(8, 4, 1, 0), (32, 8, 0, 0), (32, 8, 0, 1)])
def test_bf16(bd, bt, keep_gz, bc_f32):
    # bc_f32: float32 copies of B / C go to the kernel; dB / dC still come back in bf16
    ins = _inputs(1, 32, 12, 2, 1, torch.bfloat16, seed=3)
    _check(ins, True, 8, bt, bd, 3e-2, keep_gz=keep_gz, bc_f32=bc_f32)


def test_keep_gz_float64():
    # dout silu'(z) kept live across the state loop instead of dout and z reloaded after it (the default)
    ins = _inputs(1, 4, 10, 2, 1, torch.float64, seed=5)
    _check(ins, True, 8, 4, 4, 1e-10, keep_gz=1)


def test_bad_config_rejected():
    ins = _inputs(1, 4, 8, 2, 1, torch.float64, seed=4)
    with pytest.raises(ValueError, match="multiple"):
        _run(ins, True, 8, 3, 4)


def test_gpu_default_layout_float64():
    # the GPU's default shape of the state-outer kernel: 16-step blocks of two bt-8 sub-tiles, 32 channels (one
    # warp, dB / dC by halving), two groups of 32 channels, partial last block, 3 states
    ins = _inputs(1, 64, 37, 3, 2, torch.float64, seed=21)
    _check(ins, True, 16, 8, 32, 1e-10)


@pytest.mark.parametrize(
    "length,block_l,bt,segments",
    [
        (37, 8, 4, 2),  # 5 blocks: segments of 3 and 2 (the last block partial)
        (37, 8, 4, 3),  # segments of 2, 2, 1
        (45, 4, 2, 4),  # 12 blocks, 4 segments of 3
    ],
)
def test_time_segments_float64(length, block_l, bt, segments):
    # the blocks split into segments that run in parallel, each from the adjoint carried in from the segment after
    # it (the carry pass over segments 1 .. S - 1, then the chain); initial state, d(last state), grouped B/C
    ins = _inputs(2, 8, length, 3, 2, torch.float64, seed=30 + segments)
    _check(ins, True, block_l, bt, 4, 1e-10, segments=segments)


def test_time_segments_bf16_without_optional_inputs():
    ins = _inputs(1, 32, 40, 2, 1, torch.bfloat16, seed=8, z=False, bias=False, h0=False)
    _check(ins, True, 8, 8, 32, 3e-2, segments=4, with_dlast=False)
