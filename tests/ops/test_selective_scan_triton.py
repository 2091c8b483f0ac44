"""Triton selective scan vs the plain recurrence: outputs, states and every gradient.

Runs on the CPU under ``TRITON_INTERPRET=1`` (set here before Triton is imported) at tiny shapes;
set ``TRITON_INTERPRET=0`` on a CUDA machine to run the same checks on the GPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from mixlab.ops.selective_scan.triton import selective_scan_triton, selective_state_update_triton

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" or not torch.cuda.is_available() else "cuda"


def _recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """The definition, step by step in float64: returns (y, last_state)."""
    u, delta, A = u.double(), delta.double(), A.double()
    bsz, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    B = B.double().repeat_interleave(dim // B.shape[1], dim=1)
    C = C.double().repeat_interleave(dim // C.shape[1], dim=1)
    h = initial_state.double() if initial_state is not None else u.new_zeros(bsz, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def _reference(*args, **kwargs):
    """mixlab's own reference when it exists, else the recurrence above (both float64)."""
    try:
        from mixlab.ops.selective_scan.reference import selective_scan_reference
    except ImportError:
        return _recurrence(*args, **kwargs)
    dbl = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return selective_scan_reference(*dbl, **kw, return_last_state=True)


def _inputs(bsz, dim, length, n, groups, dtype, seed, *, grouped=True, full=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    bc_shape = (bsz, groups, n, length) if grouped else (bsz, n, length)
    ins = {
        "u": r(bsz, dim, length),
        "delta": r(bsz, dim, length, scale=0.5),
        "A": -torch.rand(dim, n, generator=g, dtype=torch.float64).to(DEVICE) * 2 - 0.1,
        "B": r(*bc_shape),
        "C": r(*bc_shape),
    }
    if full:
        ins |= {"D": r(dim), "z": r(bsz, dim, length), "delta_bias": r(dim, scale=0.5), "initial_state": r(bsz, dim, n)}
    return {k: v.to(dtype if k != "A" else torch.float32 if dtype != torch.float64 else dtype) for k, v in ins.items()}


def _check(ins, softplus, atol, rtol, **cfg):
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
    y, last = selective_scan_triton(**leaves, delta_softplus=softplus, return_last_state=True, **cfg)
    ref_leaves = {k: v.detach().clone().double().requires_grad_() for k, v in ins.items()}
    y_ref, last_ref = _reference(**ref_leaves, delta_softplus=softplus)
    assert y.dtype == ins["u"].dtype and y.shape == ins["u"].shape
    assert last.dtype == (torch.float64 if ins["u"].dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(last.double(), last_ref, atol=atol, rtol=rtol)
    g = torch.Generator().manual_seed(123)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEVICE)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(DEVICE)
    names = list(leaves)
    grads = torch.autograd.grad((y.double() * gy).sum() + (last.double() * gl).sum(), [leaves[k] for k in names])
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (last_ref * gl).sum(), [ref_leaves[k] for k in names])
    for k, a, b in zip(names, grads, grads_ref):
        assert a.dtype == ins[k].dtype, k
        torch.testing.assert_close(a.double(), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol, msg=k)


def _cfg(block_l, block_d):
    """Launch config (see ``default_config``): the same block for forward and backward."""
    return [block_l, block_d, 4, block_d, 4]


def test_all_features_float64_multi_chunk():
    # grouped B/C (2 groups of 2 channels), D, z, bias + softplus, initial and last state,
    # L=19 over chunks of 8 (the last one partial); N=3 is padded to 4 inside the kernels
    ins = _inputs(2, 4, 19, 3, 2, torch.float64, seed=0)
    _check(ins, softplus=True, atol=1e-10, rtol=1e-10, config=_cfg(8, 2))


def test_plain_float64_ungrouped():
    ins = _inputs(1, 4, 13, 4, 1, torch.float64, seed=1, grouped=False, full=False)
    _check(ins, softplus=False, atol=1e-10, rtol=1e-10, config=_cfg(8, 4))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_inputs(dtype, atol):
    ins = _inputs(1, 4, 12, 2, 1, dtype, seed=2)
    _check(ins, softplus=True, atol=atol, rtol=atol)


def test_last_state_continues_the_sequence():
    # scanning [0, L) equals scanning [0, k) and then [k, L) from the returned state
    ins = _inputs(1, 4, 10, 3, 1, torch.float64, seed=3, full=False)
    cfg = _cfg(8, 4)
    y_full, h_full = selective_scan_triton(**ins, return_last_state=True, config=cfg)
    k = 6
    first = {k2: (v[..., :k] if v.dim() >= 3 else v) for k2, v in ins.items()}
    second = {k2: (v[..., k:] if v.dim() >= 3 else v) for k2, v in ins.items()}
    y1, h1 = selective_scan_triton(**first, return_last_state=True, config=cfg)
    y2, h2 = selective_scan_triton(**second, initial_state=h1, return_last_state=True, config=cfg)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h2, h_full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_decode_step_matches_scan(groups):
    ins = _inputs(2, 4, 3, 3, groups, torch.float64, seed=4)
    y_ref, h_ref = _recurrence(**ins, delta_softplus=True)
    state = ins["initial_state"].clone()
    ys = []
    for t in range(3):
        ys.append(
            selective_state_update_triton(
                state,
                ins["u"][..., t],
                ins["delta"][..., t],
                ins["A"],
                ins["B"][..., t],
                ins["C"][..., t],
                ins["D"],
                ins["z"][..., t],
                ins["delta_bias"],
                dt_softplus=True,
            )
        )
    torch.testing.assert_close(torch.stack(ys, -1), y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, h_ref, atol=1e-12, rtol=1e-12)


def test_bad_block_config_is_rejected():
    ins = _inputs(1, 6, 4, 2, 2, torch.float64, seed=5, full=False)  # 3 channels per group
    with pytest.raises(ValueError, match="block_d"):
        selective_scan_triton(**ins, config=_cfg(8, 2))


def test_custom_op_traces_under_compile():
    ins = _inputs(1, 4, 6, 2, 1, torch.float64, seed=6, full=False)
    torch.library.opcheck(
        torch.ops.mixlab.selective_scan_fwd.default,
        (
            ins["u"],
            ins["delta"],
            ins["A"],
            ins["B"].unsqueeze(1),
            ins["C"].unsqueeze(1),
            None,
            None,
            None,
            None,
            False,
            _cfg(8, 4),
        ),
        test_utils=("test_schema", "test_faketensor"),
    )

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(u, delta, A, B, C):
        return selective_scan_triton(u, delta, A, B, C) * 2

    u = ins["u"].clone().requires_grad_()
    y = f(u, ins["delta"], ins["A"], ins["B"], ins["C"])
    torch.testing.assert_close(y, 2 * _recurrence(**ins)[0], atol=1e-12, rtol=1e-12)
    y.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@pytest.mark.parametrize(
    "ns,red,maxnreg,fold",
    [(2, 0, 0, 0), (1, 1, 0, 0), (1, 2, 0, 0), (2, 1, 0, 0), (1, 1, 128, 0), (1, 0, 0, 1), (2, 1, 0, 1)],
)
def test_backward_variants_float64(ns, red, maxnreg, fold):
    # every backward variant of the launch config (two states per iteration; dB/dC tile atomics) against the
    # reference: all ten gradients and the last state, grouped B/C, L=19 over chunks of 8, N=4 (even, for ns=2)
    ins = _inputs(2, 4, 19, 4, 2, torch.float64, seed=7)
    _check(ins, softplus=True, atol=1e-10, rtol=1e-10, config=[*_cfg(8, 2), ns, red, maxnreg, fold])


def test_two_states_with_odd_n_falls_back():
    ins = _inputs(1, 4, 11, 3, 1, torch.float64, seed=8)
    _check(ins, softplus=True, atol=1e-10, rtol=1e-10, config=[*_cfg(8, 4), 2, 0])


def test_bad_variant_is_rejected():
    ins = _inputs(1, 4, 4, 2, 1, torch.float64, seed=9, full=False)
    with pytest.raises(ValueError, match="bwd_states"):
        selective_scan_triton(**ins, config=[*_cfg(8, 4), 3, 0])
    with pytest.raises(ValueError, match="5, 7, 8 or 9"):
        selective_scan_triton(**ins, config=[8, 4, 4, 4])
    with pytest.raises(ValueError, match="bwd_maxnreg"):
        selective_scan_triton(**ins, config=[*_cfg(8, 4), 1, 0, 300])
    with pytest.raises(ValueError, match="fold must"):
        selective_scan_triton(**ins, config=[*_cfg(8, 4), 1, 0, 0, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_op_fake_matches_real_layouts(dtype):
    """The backward op's fake implementation gives every gradient the real one's shape, dtype and strides
    (inductor asserts them: dA was a transposed view, dB/dC contiguous while the fake copied B's strides)."""
    ins = _inputs(2, 4, 6, 2, 1, dtype, seed=7)
    B = ins["B"].transpose(-1, -2).contiguous().transpose(-1, -2)  # [bsz, groups, n, L] with L-major strides
    C = ins["C"]
    fwd = torch.ops.mixlab.selective_scan_fwd.default
    args = (ins["u"], ins["delta"], ins["A"], B, C, ins["D"], ins["z"], ins["delta_bias"], ins["initial_state"])
    out = fwd(*args, True, _cfg(8, 4))
    dout = torch.randn_like(ins["u"])
    dlast = torch.randn_like(out[1])
    torch.library.opcheck(
        torch.ops.mixlab.selective_scan_bwd.default,
        (*args[:8], out[2], dout, dlast, True, _cfg(8, 4)),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_launch_config_takes_v3_up_to_16_states():
    from mixlab.ops.selective_scan.triton.op import launch_config, v3_config

    cfg = v3_config(launch_config(4096, 2048, 1, 16, torch.bfloat16))
    assert cfg is not None and (cfg["fwd_bt"], cfg["fwd_bd"], cfg["bwd_bt"], cfg["bwd_bd"]) == (8, 32, 8, 64)
    assert (cfg["block_l"], cfg["bwd_warps"], cfg["bwd_prefetch"]) == (16, 2, 2)
    assert v3_config(launch_config(4096, 2048, 1, 16, torch.float32))["fwd_bt"] == 4  # 16 bytes of u a thread
    assert v3_config(launch_config(12, 64, 3, 4, torch.float64))["fwd_bd"] == 4  # a block within a group of 4
    assert v3_config(launch_config(4096, 2048, 1, 32, torch.bfloat16)) is None  # v2 above 16 states
    assert v3_config(launch_config(2048, 65536, 1, 16, torch.bfloat16, batch=1)) is None  # v2: too few channels
    assert v3_config(launch_config(4096, 65536, 1, 16, torch.bfloat16, batch=1)) is not None


@pytest.mark.parametrize(
    "cfg",
    [
        [3, 8, 4, 2, 1, 4, 2, 1],  # chunks of 8 steps, 4 a thread, 2 channels a program (within a group)
        [3, 16, 2, 2, 1, 8, 2, 1, 0, 0, 0, 1, 0, 0, 0],  # forward / backward with other tiles and knobs off
        [3, 8, 4, 2, 1, 4, 2, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 2, 2],  # forward and backward in 2 time segments
    ],
)
def test_v3_configs_through_the_op_float64(cfg):
    # grouped B/C (2 groups of 2 channels), D, z, bias + softplus, initial and last state, L = 19: partial chunks
    ins = _inputs(2, 4, 19, 3, 2, torch.float64, seed=0)
    _check(ins, softplus=True, atol=1e-10, rtol=1e-10, config=cfg)


def test_bad_v3_config_is_rejected():
    ins = _inputs(1, 6, 4, 2, 2, torch.float64, seed=5, full=False)  # 3 channels per group
    with pytest.raises(ValueError, match="fwd_bd=2 must divide"):
        selective_scan_triton(**ins, config=[3, 8, 4, 2, 1, 4, 1, 1])
    with pytest.raises(ValueError, match="multiple of bwd_bt"):
        selective_scan_triton(**ins, config=[3, 8, 4, 1, 1, 16, 1, 1])
    with pytest.raises(ValueError, match="v3 config has 8 to"):
        selective_scan_triton(**ins, config=[3, 8, 4, 1, 1])


def test_unused_outputs_get_no_zero_filled_gradients(monkeypatch):
    # the states buffer (an output saved for the backward) and an unused last state must reach the backward as None:
    # materialized, autograd would zero-fill the [B, n_chunks + 1, N, D] buffer on every step
    from mixlab.ops.selective_scan.triton import op

    seen = []

    def spy(*args):
        seen.append(args[10])  # dlast
        return real(*args)

    real = op.selective_scan_bwd
    monkeypatch.setattr(op, "selective_scan_bwd", spy)
    leaves = {k: v.requires_grad_() for k, v in _inputs(1, 4, 6, 2, 1, torch.float64, seed=3).items()}
    selective_scan_triton(**leaves, delta_softplus=True).sum().backward()
    assert seen == [None]


def test_gradients_through_the_last_state_alone():
    ins = _inputs(2, 4, 9, 3, 2, torch.float64, seed=4)
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
    ref_leaves = {k: v.clone().requires_grad_() for k, v in ins.items()}
    _, last = selective_scan_triton(**leaves, delta_softplus=True, return_last_state=True)
    _, last_ref = _reference(**ref_leaves, delta_softplus=True)
    names = list(leaves)
    grads = torch.autograd.grad(last.sum(), [leaves[k] for k in names], allow_unused=True)
    grads_ref = torch.autograd.grad(last_ref.sum(), [ref_leaves[k] for k in names], allow_unused=True)
    for k, a, b in zip(names, grads, grads_ref):
        if b is None:  # C and z do not reach the last state
            assert a is None or not a.abs().any(), k
        else:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=k)


def test_segments_of_the_v3_backward():
    from mixlab.ops.selective_scan.triton.op import V3_FWD_SPLIT, v3_segments

    cpu = torch.device("cpu")  # taken as 132 SMs: 528 two-warp program slots
    assert v3_segments(2048, 128, cpu) == 1  # B32 D4096 in 64-channel programs: several waves
    assert v3_segments(512, 512, cpu) == 1  # about one wave
    assert v3_segments(256, 1024, cpu) == 8  # B4 T16384: to about four waves
    assert v3_segments(128, 2048, cpu) == 16
    assert v3_segments(64, 16, cpu) == 4  # at least 4 blocks a segment
    # the forward (one-warp programs, 8 an SM: 1056 slots) splits only well under half a wave, to one wave
    assert v3_segments(512, 1024, cpu, **V3_FWD_SPLIT) == 1  # B4 D4096
    assert v3_segments(256, 2048, cpu, **V3_FWD_SPLIT) == 4  # B2 T32768
    assert v3_segments(128, 4096, cpu, **V3_FWD_SPLIT) == 8  # B1 T65536
