"""``torch.library`` custom ops around the selective-scan kernels, with autograd and fake tensors.

``mixlab::selective_scan_fwd`` returns ``(out, last_state, states)``; the buffer of chunk-boundary
states is saved for ``mixlab::selective_scan_bwd``. ``mixlab::selective_state_update`` is the decode step and
updates its ``state`` argument in place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .kernels import selective_scan_bwd_kernel, selective_scan_fwd_kernel, selective_state_update_kernel

Tensor = torch.Tensor


def state_dtype(u: Tensor) -> torch.dtype:
    """The scan's state dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


#: the largest state size the v3 kernels take by default (the v3 forward keeps every state of a channel in
#: registers: at N = 32 it spills on sm_90)
V3_MAX_N = 16


#: v3 runs one warp per (sequence, 32 channels) and splits the time axis when that leaves SMs idle
#: (``v3_segments``); v2 below this many warps. H100, D4096 N16 bf16: B1 T65536 (128 warps) forward 4.24 ms in 8
#: segments and backward 11.0 in 32, against v2's 5.40 and 26.9 forward+backward
V3_MIN_WARPS = 128


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def v3_segments(
    programs: int, n_blocks: int, device: torch.device, *, per_sm: int = 4, fill: float = 0.9, waves: int = 4
) -> int:
    """How many segments of the time axis a v3 kernel runs in parallel: 1 when its ``programs`` (sequence,
    channel-block) fill ``fill`` of a wave (``per_sm`` programs an SM), else the power of two that brings them to
    about ``waves`` waves, with at least 4 blocks a segment. Each split costs a light pass over all segments but
    one. The defaults are the backward's (two-warp programs at 255 registers). H100, D4096 N16 bf16, backward ms
    (kernel + carry pass): B8 T8192 10.0 unsplit (10.6 in 2 or 4); B4 T16384 15.7 -> 10.8 in 8; B2 T32768 11.0 in
    16 (v2: 18.2); B1 T65536 11.0 in 32. The forward's rule: ``V3_FWD_SPLIT``."""
    slots = per_sm * _sm_count(device)
    if programs >= fill * slots:
        return 1
    seg = 1
    while programs * seg * 2 <= waves * slots and n_blocks // (seg * 2) >= 4:
        seg *= 2
    return seg


#: ``v3_segments`` arguments for the forward (one-warp programs, 8 an SM): its carry pass costs about half a forward
#: per element, so it splits only when the programs fill well under half a wave, and to one wave. H100, D4096 N16
#: bf16, forward ms: B4 T16384 3.04 unsplit (3.76-3.93 in 2-8); B2 T32768 5.36 -> 4.18 in 4 (v2 5.31); B1 T65536
#: 10.45 -> 4.24 in 8 (v2 5.40)
V3_FWD_SPLIT = {"per_sm": 8, "fill": 0.4, "waves": 1}


def launch_config(
    dim: int, length: int, groups: int, n: int, dtype: torch.dtype, batch: int | None = None
) -> list[int]:
    """The launch configuration ``selective_scan_triton`` uses: v3 (:func:`v3_config`; channels across lanes,
    time in-thread) for N <= 16 and at least :data:`V3_MIN_WARPS` (sequence, 32 channels) warps (``batch`` None:
    assume enough), else v2
    (:func:`default_config`, which also splits the time axis into parallel chunks).

    v3: ``bt`` time steps a thread = 16 bytes of the input (8 for bf16 / fp16), one channel a lane; the forward
    with 32-channel one-warp programs, the backward with 64-channel two-warp programs (fewer channels with one
    warp when a group of B / C has fewer); a saved state every 16 steps, which lets the backward keep a whole
    block of h and of the adjoint in registers (``seq_bwd``'s state-outer kernel), its state operands loaded a
    state ahead. Measured on an H100 (bf16, D4096 N16 with z and D, 65,536 tokens, B32 T2048): forward 2.50 ms,
    forward + backward 11.69 ms (v2: 4.69 and 21.5; benchmarks/NOTES-mamba-kernels.md §9-10)."""
    if n > V3_MAX_N or (batch is not None and batch * dim < 32 * V3_MIN_WARPS):
        return default_config(dim, length, groups)
    bt = max(1, 16 // (torch.finfo(dtype).bits // 8))
    per_group = dim // groups
    bd = 32
    while per_group % bd:
        bd //= 2
    bwd_bd, bwd_warps = (64, 2) if per_group % 64 == 0 else (bd, 1)
    # [tag, block_l, fwd (bt, bd, warps), bwd (bt, bd, warps), fwd a_reg, bc_pack, prefetch, emu, bwd reduce, prefetch]
    return [V3, 16, bt, bd, 1, min(bt, 8), bwd_bd, bwd_warps, 1, 1, 1, 0, 1, 2]


def default_config(dim: int, length: int, groups: int) -> list[int]:
    """v2's launch configuration ``[block_l, fwd_block_d, fwd_warps, bwd_block_d, bwd_warps, bwd_states, bwd_red,
    bwd_maxnreg, fold]`` (the default sets all nine).

    The last four are optional in a given config (5, 7, 8 or 9 entries; see ``bwd_variant``): ``bwd_states``
    (states per iteration of the backward's state loop: 1, or 2 for two interleaved independent scans), ``bwd_red``
    (0: dB/dC summed over the block's channels before the atomics; 1: both added as [block_d, block_l]
    tiles with atomics; 2: dC only as a tile), ``bwd_maxnreg`` (a register cap for the backward, 0 = none) and
    ``fold`` (both passes; 1: the carried state / adjoint enters the scans as an input term, so their product
    outputs and the multiply-adds after them are dead code).

    block_l: time steps per chunk (shared by both passes: the saved chunk states depend on it); each
    [block_d, block_l] tile holds 8 elements a thread, so that Triton keeps 8 consecutive steps in a
    thread. block_d: channels per program, a power of two dividing D/G so that a block never straddles
    two groups of B/C. Measured on an H100 (bf16, D4096 N16, 65,536 tokens; benchmarks/NOTES-mamba-kernels.md):
    the forward is fastest with 4 warps, the register-heavy backward with 1 warp (no cross-warp reductions).
    """
    bl = min(128, max(16, triton.next_power_of_2(length)))
    bd_f, bd_b = 1024 // bl, 256 // bl
    while (dim // groups) % bd_f:
        bd_f //= 2
    while (dim // groups) % bd_b:
        bd_b //= 2
    # fold on in both passes, one state per iteration, channel sums before the atomics, no register cap:
    # the fastest of the H100 sweep (21.5 ms fwd+bwd at D4096 N16 B32 T2048 vs 25.4 ms for v2.1's
    # [64, 16, 4, 4, 1] and [128, 8, 4, 2, 1] without fold)
    return [bl, bd_f, 4 if bd_f * bl >= 1024 else 1, bd_b, 1, 1, 0, 0, 1]


def bwd_variant(cfg: list[int], n: int) -> tuple[int, int, int, int]:
    """``(NS, RED_TILE, maxnreg, FOLD)`` of the backward from a 5-, 7-, 8- or 9-entry config; NS = 2 needs an even N."""
    ns, red = (cfg[5], cfg[6]) if len(cfg) >= 7 else (1, 0)
    maxnreg = cfg[7] if len(cfg) >= 8 else 0
    fold = cfg[8] if len(cfg) >= 9 else 0
    if fold not in (0, 1):
        raise ValueError(f"selective_scan_triton: fold must be 0 or 1, got {fold}")
    if ns not in (1, 2) or red not in (0, 1, 2):
        raise ValueError(f"selective_scan_triton: bwd_states must be 1 or 2 and bwd_red 0, 1 or 2, got {ns}, {red}")
    if maxnreg and not 24 <= maxnreg <= 255:
        raise ValueError(f"selective_scan_triton: bwd_maxnreg must be 0 or in [24, 255], got {maxnreg}")
    return (ns if n % ns == 0 else 1), red, maxnreg, fold


#: first entry of a v3 ("sequential time") launch config
V3 = 3
#: v3 config entries after the tag, with the defaults of the optional ones (from ``fwd_a_reg`` on)
V3_FIELDS = (
    ("block_l", None), ("fwd_bt", None), ("fwd_bd", None), ("fwd_warps", None), ("bwd_bt", None), ("bwd_bd", None),
    ("bwd_warps", None), ("fwd_a_reg", 1), ("fwd_bc_pack", 1), ("fwd_prefetch", 1), ("fwd_emu", 0),
    ("bwd_reduce", 1), ("bwd_prefetch", 1), ("bwd_maxnreg", 0), ("bwd_bc_f32", 0), ("bwd_pf_next", 0),
    ("fwd_col_store", 1), ("bwd_segments", 0), ("fwd_segments", 0),
)  # fmt: skip


def v3_config(cfg: list[int]) -> dict[str, int] | None:
    """The fields of a v3 launch config ``[3, block_l, fwd_bt, fwd_bd, fwd_warps, bwd_bt, bwd_bd, bwd_warps,
    (fwd_a_reg, fwd_bc_pack, fwd_prefetch, fwd_emu, bwd_reduce, bwd_prefetch, bwd_maxnreg, bwd_bc_f32,
    bwd_pf_next, fwd_col_store, bwd_segments, fwd_segments)]``, or None for a v2 config (``seq_fwd`` / ``seq_bwd`` describe the optional knobs).

    v3 (``seq_fwd.py`` / ``seq_bwd.py``) puts channels across lanes and ``bt`` consecutive time steps inside each
    thread, so the scans over time are sequential in-thread; v2 (``kernels.py``) scans across lanes."""
    if not cfg or cfg[0] != V3:
        return None
    if not 8 <= len(cfg) <= 1 + len(V3_FIELDS):
        raise ValueError(f"selective_scan_triton: a v3 config has 8 to {1 + len(V3_FIELDS)} entries, got {len(cfg)}")
    out = {name: default for name, default in V3_FIELDS}
    out.update(zip([name for name, _ in V3_FIELDS], cfg[1:]))
    return out  # type: ignore[return-value]


def block_len(cfg: list[int]) -> int:
    """Time steps between the saved chunk states (both versions)."""
    v3 = v3_config(cfg)
    return v3["block_l"] if v3 else cfg[0]


def _n_chunks(length: int, block_l: int) -> int:
    return triton.cdiv(length, block_l)


def new_states(u: Tensor, initial_state: Tensor | None, n_chunks: int, n: int) -> Tensor:
    """The forward's states buffer ``[B, n_chunks + 1, N, D]`` (both versions): slot 0 holds the initial state
    (zeros without one); the kernels write the others."""
    bsz, dim, _ = u.shape
    states = torch.empty(bsz, n_chunks + 1, n, dim, device=u.device, dtype=state_dtype(u))
    states[:, 0] = initial_state.transpose(1, 2) if initial_state is not None else 0
    return states


class BwdBuffers(NamedTuple):
    """What both backward kernels write: full-size gradients, float32 sums over channels (dB, dC: atomics) and
    per-(batch, channel) partials (dA ``[B, N, D]``, dD, d(delta_bias) ``[B, D]``)."""

    du: Tensor
    ddelta: Tensor
    dz: Tensor
    dB: Tensor
    dC: Tensor
    dA_part: Tensor
    dD_part: Tensor
    dbias_part: Tensor


def bwd_buffers(
    u: Tensor, delta: Tensor, z: Tensor | None, B: Tensor, C: Tensor, n: int, segments: int = 1
) -> BwdBuffers:
    """``segments``: the per-(batch, channel) partials get one row per (segment, batch): ``[S B, N, D]``, ``[S B, D]``."""
    bsz, dim, _ = u.shape
    sd = state_dtype(u)
    bsz = bsz * segments
    return BwdBuffers(
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(z) if z is not None else u.new_empty(0),
        torch.zeros(B.shape, device=u.device, dtype=sd),
        torch.zeros(C.shape, device=u.device, dtype=sd),
        torch.zeros(bsz, n, dim, device=u.device, dtype=sd),
        torch.empty(bsz, dim, device=u.device, dtype=sd),
        torch.empty(bsz, dim, device=u.device, dtype=sd),
    )


def bwd_launch_args(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
    delta_bias: Tensor | None, states: Tensor, carried: Tensor, dout: Tensor, buf: BwdBuffers,
) -> tuple:  # fmt: skip
    """The positional arguments both backward kernels (v2's and v3's) take, in their order: inputs (u in place of
    absent ones), states, the carried adjoint, dout, the buffers, sizes and the strides of B, C, dB, dC."""
    _bsz, dim, length = u.shape
    n = A.shape[1]
    dummy = u
    return (
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else dummy, delta_bias if delta_bias is not None else dummy,
        states, carried, dout,
        buf.du, buf.ddelta, buf.dz if z is not None else dummy, buf.dB, buf.dC, buf.dA_part, buf.dD_part, buf.dbias_part,
        dim, length, n, states.shape[1] - 1, dim // B.shape[1],
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        buf.dB.stride(0), buf.dB.stride(1), buf.dB.stride(2), buf.dC.stride(0), buf.dC.stride(1), buf.dC.stride(2),
    )  # fmt: skip


def bwd_outputs(
    buf: BwdBuffers, u: Tensor, A: Tensor, B_dtype: torch.dtype, C_dtype: torch.dtype, D: Tensor | None,
    delta_bias: Tensor | None, dh0: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``selective_scan_bwd``'s nine gradients from the kernels' buffers (partials summed, inputs' dtypes)."""
    dA = buf.dA_part.sum(0).t().to(A.dtype).contiguous()
    dD = buf.dD_part.sum(0).to(D.dtype) if D is not None else u.new_empty(0)
    dbias = buf.dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else u.new_empty(0)
    return buf.du, buf.ddelta, dA, buf.dB.to(B_dtype), buf.dC.to(C_dtype), dD, buf.dz, dbias, dh0


@torch.library.custom_op("mixlab::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    delta_softplus: bool,
    cfg: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """u, delta, z ``[B, D, L]`` contiguous; A ``[D, N]``; B, C ``[B, G, N, L]`` (L contiguous).

    Returns ``out [B, D, L]`` (u's dtype), ``last_state [B, D, N]`` and the state buffer
    ``[B, n_chunks + 1, N, D]`` (slot c: the states entering chunk c; the last slot: the final states).
    """
    v3 = v3_config(cfg)
    if v3:
        from .seq_fwd import seq_fwd  # imports this module (state_dtype)

        return seq_fwd(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
            v3["block_l"], v3["fwd_bt"], v3["fwd_bd"], v3["fwd_warps"],
            a_reg=v3["fwd_a_reg"], bc_pack=v3["fwd_bc_pack"], prefetch=v3["fwd_prefetch"], emu=v3["fwd_emu"],
            col_store=v3["fwd_col_store"],
            segments=v3["fwd_segments"] or v3_segments(
                u.shape[0] * (u.shape[1] // v3["fwd_bd"]), _n_chunks(u.shape[2], v3["block_l"]), u.device,
                **V3_FWD_SPLIT,
            ),
        )  # fmt: skip
    bsz, dim, length = u.shape
    n = A.shape[1]
    groups = B.shape[1]
    block_l, block_d, num_warps = cfg[:3]
    fold = bwd_variant(cfg, n)[3]
    nc = _n_chunks(length, block_l)
    out = torch.empty_like(u)
    states = new_states(u, initial_state, nc, n)
    dummy = u
    selective_scan_fwd_kernel[(dim // block_d, bsz)](
        u,
        delta,
        A,
        B,
        C,
        D if D is not None else dummy,
        z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy,
        states,
        out,
        dim,
        length,
        n,
        nc,
        dim // groups,
        B.stride(0),
        B.stride(1),
        B.stride(2),
        C.stride(0),
        C.stride(1),
        C.stride(2),
        BD=block_d,
        BL=block_l,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        FP64=states.dtype == torch.float64,
        FOLD=fold,
        num_warps=num_warps,
    )
    # a copy, never a view of the states buffer (at N = 1 .contiguous() would return one: custom ops forbid aliases)
    return out, states[:, nc].transpose(1, 2).clone(memory_format=torch.contiguous_format), states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, cfg):
    bsz, dim, length = u.shape
    n = A.shape[1]
    sd = state_dtype(u)
    return (
        torch.empty_like(u),
        u.new_empty(bsz, dim, n, dtype=sd),
        u.new_empty(bsz, _n_chunks(length, block_len(cfg)) + 1, n, dim, dtype=sd),
    )


@torch.library.custom_op("mixlab::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    states: Tensor,
    dout: Tensor,
    dlast: Tensor | None,
    delta_softplus: bool,
    cfg: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state)``; those of absent
    optional inputs come back as empty tensors. ``states`` is the forward's state buffer."""
    v3 = v3_config(cfg)
    if v3:
        from .seq_bwd import seq_bwd

        return seq_bwd(
            u, delta, A, B, C, D, z, delta_bias, states, dout, dlast, delta_softplus,
            v3["block_l"], v3["bwd_bt"], v3["bwd_bd"], v3["bwd_warps"],
            reduce_mode=v3["bwd_reduce"], prefetch=v3["bwd_prefetch"], maxnreg=v3["bwd_maxnreg"],
            bc_f32=v3["bwd_bc_f32"], pf_next=v3["bwd_pf_next"],
            segments=v3["bwd_segments"]
            or v3_segments(u.shape[0] * (u.shape[1] // v3["bwd_bd"]), states.shape[1] - 1, u.device),
        )  # fmt: skip
    bsz, dim, _ = u.shape
    n = A.shape[1]
    sd = state_dtype(u)
    nc = states.shape[1] - 1
    block_l, block_d, num_warps = cfg[0], *cfg[3:5]
    ns, red_tile, maxnreg, fold = bwd_variant(cfg, n)
    # a register cap trades spills for resident warps (the backward is latency-bound); not a CPU option
    extra = {"maxnreg": maxnreg} if maxnreg and u.is_cuda else {}
    dout = dout.contiguous()
    buf = bwd_buffers(u, delta, z, B, C, n)
    # adjoint carried between chunks, two slots used in turn; the last chunk reads d(last_state)
    gbuf = torch.zeros(bsz, 2, n, dim, device=u.device, dtype=sd)
    if dlast is not None:
        gbuf[:, (nc - 1) % 2] = dlast.transpose(1, 2)
    selective_scan_bwd_kernel[(dim // block_d, bsz)](
        *bwd_launch_args(u, delta, A, B, C, D, z, delta_bias, states, gbuf, dout, buf),
        BD=block_d,
        BL=block_l,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        FP64=sd == torch.float64,
        NS=ns,
        RED_TILE=red_tile,
        FOLD=fold,
        num_warps=num_warps,
        **extra,
    )
    # d(initial state) = a_0 * g_0, with g_0 (the adjoint at t = 0) left in slot 1 by the first chunk
    dl0 = delta[:, :, 0].to(sd)
    if delta_bias is not None:
        dl0 = dl0 + delta_bias.to(sd)
    if delta_softplus:
        dl0 = torch.nn.functional.softplus(dl0)
    # every gradient contiguous, as the fake implementation states (compiled graphs assert the strides)
    dh0 = (torch.exp(dl0[..., None] * A.to(sd)) * gbuf[:, 1].transpose(1, 2)).contiguous()
    return bwd_outputs(buf, u, A, B.dtype, C.dtype, D, delta_bias, dh0)


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, states, dout, dlast, delta_softplus, cfg):
    bsz, dim, _ = u.shape
    n = A.shape[1]
    sd = state_dtype(u)

    def dense(t: Tensor) -> Tensor:  # contiguous, whatever the input's strides (as the real op allocates)
        return t.new_empty(t.shape)

    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        dense(A),
        dense(B),
        dense(C),
        torch.empty_like(D) if D is not None else u.new_empty(0),
        torch.empty_like(z) if z is not None else u.new_empty(0),
        torch.empty_like(delta_bias) if delta_bias is not None else u.new_empty(0),
        u.new_empty(bsz, dim, n, dtype=sd),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, cfg = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.cfg = (delta_softplus, cfg)
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
    # the states buffer is only saved for the backward, and the last state often unused: without this autograd would
    # pass zero-filled gradients for both (the states' is [B, n_chunks + 1, N, D] float32: 1.1 GB at B32 T2048 D4096)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, _dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    delta_softplus, cfg = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, states, dout, dlast, delta_softplus, cfg
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        dh0.to(ctx.h0_dtype) if ctx.h0_dtype is not None else None,
        None,
        None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mixlab::selective_state_update", mutates_args=("state",))
def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """state ``[B, D, N]`` (updated in place); x, dt, z ``[B, D]``; A ``[D, N]``; B, C ``[B, G, N]``. Returns y ``[B, D]``."""
    bsz, dim, n = state.shape
    groups = B.shape[1]
    out = torch.empty_like(x)
    bd = 32
    grid = (triton.cdiv(dim, bd), bsz)
    selective_state_update_kernel[grid](
        state,
        x,
        dt,
        A,
        B,
        C,
        D if D is not None else x,
        z if z is not None else x,
        dt_bias if dt_bias is not None else x,
        out,
        dim,
        n,
        dim // groups,
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        NP=triton.next_power_of_2(n),
        BD=bd,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus,
        FP64=x.dtype == torch.float64 or state.dtype == torch.float64,
        num_warps=4,
    )
    return out


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x)
