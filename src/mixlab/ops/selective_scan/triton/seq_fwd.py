"""Selective scan forward, v3: channels across lanes, time inside each thread.

One program owns (batch b, a block of ``BD`` channels) and walks the sequence in chunks of ``BT`` steps. The
``[BD, BT]`` tiles of u, delta, z hold ``BT`` consecutive steps of one channel in one thread (L is contiguous),
so the scan over time is sequential inside the thread: ``tl.associative_scan`` along axis 1 lowers to ``BT - 1``
in-thread combines, no shuffles. The state loop is unrolled (``tl.static_range``, N is a constexpr) and the
states carried across chunks live in a register tile ``h [BD, NP]`` whose N columns sit in the thread owning
the channel: column n is read and written with ``where(nn == n, ...)`` selects, which fold to register moves.
The carried state enters the scan folded into its first input (``b_0 += a_0 h_in``), so the scan's product
output is dead code and the recurrence costs one FFMA per (t, d, n) element.

The B and C rows of a chunk (``[BT]`` per state, the same for every channel of the group) are loaded as ``[BT]``
vectors, which Triton keeps whole in every thread: one broadcast load per state and chunk, no layout conversion.

The states entering every ``block_l`` steps go to v2's buffer ``states [B, n_chunks + 1, N, D]``
(``n_chunks = cdiv(L, block_l)``, slot 0 = initial state written by the launcher, slot n_chunks = final state),
so both backwards (v2's and v3's) can read it.
"""

# ruff: noqa: RUF005  (tuples of states are built by concatenation: the Triton frontend has no starred unpacking)
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fastmath import exp2, sigmoid, softplus_poly
from .kernels import _scan_combine, _softplus
from .op import new_states, state_dtype

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _col(x, idx, k):
    """Column k of ``x [R, K]`` as ``[R]`` (idx = arange(K)); the -0.0 fill makes the sum exact (x + -0.0 == x),
    so with K inside the thread it folds to picking one register."""
    return tl.sum(tl.where(idx[None, :] == k, x, -0.0), 1)


@triton.jit
def _exp2_fma(x):
    """2^x for float32 x <= 0 on the FMA pipe (no MUFU): round x to j (1.5 * 2^23 trick), 2^f on [-0.5, 0.5] by a
    degree-5 fit, j added to the exponent bits; relative error 2.3e-7, clamped at 2^-125. Moves some of the
    decays off the MUFU pipe (16 exps / clk / SM), which bounds the loop, onto the FMA pipe, which has slack."""
    x = tl.maximum(x, -125.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = 0.0013276468962430954 * f + 0.009675540961325169
    p = p * f + 0.05550713464617729
    p = p * f + 0.24022120237350464
    p = p * f + 0.6931469440460205
    p = p * f + 1.0000001192092896
    # j = bits(t) - bits(1.5 * 2^23); (bits(1.5 * 2^23) << 23) wraps to 0, so j << 23 == bits(t) << 23
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _chunk(
    h, A2, u, dl, zz, Dv, bias, t, tmask, offs, d, tt, nn, bc_ptr, B_row, C_row, stride_bn, stride_cn, A_ptr, out_ptr,
    N: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FP64: tl.constexpr, FAST: tl.constexpr, A_REG: tl.constexpr,
    BC_PACK: tl.constexpr, SP_POLY: tl.constexpr, EMU: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One chunk of BT steps: u, dl (raw delta), zz are its [BD, BT] tiles as loaded; returns the carried states
    ``h [BD, NP]`` after it. MASKED: the chunk runs past L (padded steps: decay 1, input 0)."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    u = u.to(CT)
    dl = dl.to(CT)
    if HAS_BIAS:
        dl = dl + bias[:, None]
    if SOFTPLUS:
        if SP_POLY:
            dl = softplus_poly(dl, FAST)
        else:
            dl = _softplus(dl)
    if MASKED:
        dl = tl.where(tmask[None, :], dl, 0.0)
    du = dl * u
    if HAS_D:
        y = Dv[:, None] * u
    else:
        y = tl.zeros([BD, BT], dtype=CT)
    for n in tl.static_range(N):
        if A_REG:
            a_n = _col(A2, nn, n)
        else:
            a_n = tl.load(A_ptr + d * N + n).to(CT)
            if not FP64:
                a_n = a_n * LOG2E
        if BC_PACK:
            # chunk-major [.., N, 2, BT] rows, zero-padded past L: constant offsets, no mask
            Bn = tl.load(bc_ptr + (2 * n) * BT + tt)
            Cn = tl.load(bc_ptr + (2 * n + 1) * BT + tt)
        elif MASKED:
            Bn = tl.load(B_row + n * stride_bn + t, mask=tmask, other=0.0).to(CT)
            Cn = tl.load(C_row + n * stride_cn + t, mask=tmask, other=0.0).to(CT)
        else:
            Bn = tl.load(B_row + n * stride_bn + t).to(CT)
            Cn = tl.load(C_row + n * stride_cn + t).to(CT)
        if FP64:
            a = tl.exp(dl * a_n[:, None])
        elif n >= N - EMU:
            a = _exp2_fma(dl * a_n[:, None])
        else:
            a = exp2(dl * a_n[:, None], FAST)
        h_in = _col(h, nn, n)
        # fold: the carried state enters as a_0 h_in added to b_0 (-0.0 elsewhere: bb + -0.0 folds away)
        bb = du * Bn[None, :] + tl.where(tt[None, :] == 0, a * h_in[:, None], -0.0)
        _, hs = tl.associative_scan((a, bb), 1, _scan_combine)
        y += hs * Cn[None, :]
        h = tl.where(nn[None, :] == n, _col(hs, tt, BT - 1)[:, None], h)
    if HAS_Z:
        zc = zz.to(CT)
        y = y * zc * sigmoid(zc, FAST)
    if MASKED:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=tmask[None, :])
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty))
    return h


@triton.jit
def selective_scan_seq_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    states_ptr,
    out_ptr,
    bc_ptr,
    DIM,
    L,
    N_CHUNKS,
    CH_PER_GROUP,
    G,
    stride_bb,
    stride_bg,
    stride_bn,
    stride_cb,
    stride_cg,
    stride_cn,
    N: tl.constexpr,
    NP: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    FAST: tl.constexpr,
    A_REG: tl.constexpr,
    BC_PACK: tl.constexpr,
    PREFETCH: tl.constexpr,
    SP_POLY: tl.constexpr,
    EMU: tl.constexpr,
    PF_BC: tl.constexpr,
    COL_STORE: tl.constexpr = 1,
    SEG_BLOCKS=0,
    SEGMENTED: tl.constexpr = 0,
):
    """Grid (DIM // BD, batch). u, delta, z, out ``[B, DIM, L]``; A ``[DIM, N]``; B, C ``[B, G, N, L]`` by strides,
    or (BC_PACK) bc ``[B, G, cdiv(L, BT), N, 2, BT]`` (B and C rows of each chunk, zero-padded); states
    ``[B, N_CHUNKS + 1, N, DIM]`` (slot 0 read, slots 1.. written). A_REG: A's row as a register tile (1) or loaded
    per state and chunk (0). PREFETCH: the next chunk's u, delta, z are loaded before this chunk's states.
    SP_POLY: softplus by ``_softplus_poly`` (float32 only) instead of v2's logf form. EMU: the last EMU states'
    decays by ``_exp2_fma`` (float32). PF_BC: prefetch the next chunk's packed B/C block into L1 (GPU only).
    SEGMENTED: grid axis 2 splits the sequence into segments of SEG_BLOCKS blocks run in parallel, segment s starting
    from the state in slot s SEG_BLOCKS (written beforehand by ``seq_fwd``'s chain); it leaves the slot at its end,
    already written, alone."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    PF_LINES: tl.constexpr = max(1, 2 * N * BT // 32)
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = pid_d * BD + tl.arange(0, BD)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BT)
    nn = tl.arange(0, NP)
    row = (b * DIM + d).to(tl.int64) * L  # [BD] start of each channel's sequence
    B_row = B_ptr + b * stride_bb + grp * stride_bg
    C_row = C_ptr + b * stride_cb + grp * stride_cg
    n_steps = tl.cdiv(L, BT)
    bc_base = bc_ptr + (b * G + grp) * n_steps * (2 * N * BT)
    st_ptrs = states_ptr + b * (N_CHUNKS + 1) * N * DIM + nn[None, :] * DIM + d[:, None]  # [BD, NP], slot 0
    st_col = states_ptr + b * (N_CHUNKS + 1) * N * DIM + d  # [BD], slot 0, state 0
    st_mask = (nn[None, :] < N) & (d[:, None] < DIM)
    n_full = L // BT
    if SEGMENTED:
        seg = tl.program_id(2)
        last = seg == tl.num_programs(2) - 1
        k_lo = seg * (SEG_BLOCKS * BLOCK_L // BT)
        k_hi = tl.minimum(k_lo + SEG_BLOCKS * BLOCK_L // BT, n_full)
        # the next segment's entering state, already in the buffer: not stored again (the last segment stores its end)
        slot_end = tl.where(last, N_CHUNKS + 1, (seg + 1) * SEG_BLOCKS)
        h = tl.load(st_ptrs + (b * 0 + seg * SEG_BLOCKS) * N * DIM, mask=st_mask, other=0.0).to(CT)
    else:
        last = True
        k_lo = 0
        k_hi = n_full
        slot_end = N_CHUNKS + 1
        h = tl.load(st_ptrs, mask=st_mask, other=0.0).to(CT)
    A2 = h  # placeholder when A_REG = 0
    if A_REG:
        A2 = tl.load(A_ptr + d[:, None] * N + nn[None, :], mask=st_mask, other=0.0).to(CT)
        if not FP64:
            A2 = A2 * LOG2E
    Dv = d.to(CT)  # placeholders when absent
    bias = Dv
    if HAS_D:
        Dv = tl.load(D_ptr + d).to(CT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(CT)
    # full chunks: no masks
    offs = row[:, None] + (k_lo * BT + tt)[None, :]
    if PREFETCH:
        m0 = (k_lo * BT + tt < n_full * BT)[None, :]  # the first chunk if it is a full one
        u_nx = tl.load(u_ptr + offs, mask=m0, other=0.0)
        dl_nx = tl.load(delta_ptr + offs, mask=m0, other=0.0)
        z_nx = u_nx
        if HAS_Z:
            z_nx = tl.load(z_ptr + offs, mask=m0, other=0.0)
    for k in range(k_lo, k_hi):
        t = k * BT + tt
        offs = row[:, None] + t[None, :]
        if PREFETCH:
            u, dl, zz = u_nx, dl_nx, z_nx
            offs_nx = row[:, None] + (tl.minimum(k + 1, n_full - 1) * BT + tt)[None, :]
            u_nx = tl.load(u_ptr + offs_nx)
            dl_nx = tl.load(delta_ptr + offs_nx)
            if HAS_Z:
                z_nx = tl.load(z_ptr + offs_nx)
        else:
            u = tl.load(u_ptr + offs)
            dl = tl.load(delta_ptr + offs)
            zz = u
            if HAS_Z:
                zz = tl.load(z_ptr + offs)
        if PF_BC:
            # one 128-byte line per lane of the next chunk's B/C block (2 N BT floats), no registers held
            nx = bc_base + tl.minimum(k + 1, n_steps - 1) * (2 * N * BT) + (tl.arange(0, BD) % PF_LINES) * 32
            tl.inline_asm_elementwise(
                "prefetch.global.L1 [$1];\n mov.u32 $0, 0;", "=r,l", [nx], dtype=tl.int32, is_pure=False, pack=1
            )
        h = _chunk(
            h, A2, u, dl, zz, Dv, bias, t, t < L, offs, d, tt, nn, bc_base + k * (2 * N * BT), B_row, C_row,
            stride_bn, stride_cn, A_ptr, out_ptr,
            N, BD, BT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FP64, FAST, A_REG, BC_PACK, SP_POLY, EMU, False,
        )  # fmt: skip
        # the states entering step (k + 1) * BT when that is a multiple of BLOCK_L (the last one: the final state)
        if ((k + 1) * BT) % BLOCK_L == 0 and (k + 1) * BT // BLOCK_L != slot_end:
            slot = b * 0 + (k + 1) * BT // BLOCK_L  # int64 (b is)
            if COL_STORE:
                # one [BD] column per state, straight from the owning threads: a [BD, NP] tile store would first
                # convert h to a d-contiguous layout through shared memory (every BLOCK_L steps)
                for n in tl.static_range(N):
                    tl.store(st_col + slot * N * DIM + n * DIM, _col(h, nn, n).to(states_ptr.dtype.element_ty))
            else:
                tl.store(st_ptrs + slot * N * DIM, h.to(states_ptr.dtype.element_ty), mask=st_mask)
    if last and n_full < n_steps:
        # the partial last chunk, masked
        t = n_full * BT + tt
        tmask = t < L
        offs = row[:, None] + t[None, :]
        u = tl.load(u_ptr + offs, mask=tmask[None, :], other=0.0)
        dl = tl.load(delta_ptr + offs, mask=tmask[None, :], other=0.0)
        zz = u
        if HAS_Z:
            zz = tl.load(z_ptr + offs, mask=tmask[None, :], other=0.0)
        h = _chunk(
            h, A2, u, dl, zz, Dv, bias, t, tmask, offs, d, tt, nn, bc_base + n_full * (2 * N * BT), B_row, C_row,
            stride_bn, stride_cn, A_ptr, out_ptr,
            N, BD, BT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FP64, FAST, A_REG, BC_PACK, SP_POLY, EMU, True,
        )  # fmt: skip
    if last and L % BLOCK_L != 0:
        tl.store(st_ptrs + (b * 0 + N_CHUNKS) * N * DIM, h.to(states_ptr.dtype.element_ty), mask=st_mask)


@triton.jit
def _softplus_dl(dl, mask, SOFTPLUS: tl.constexpr, FP64: tl.constexpr, FAST: tl.constexpr):
    """delta (bias added) through softplus (exact in float64, the polynomial in float32), zero where masked."""
    if SOFTPLUS:
        if FP64:
            dl = _softplus(dl)
        else:
            dl = softplus_poly(dl, FAST)
    return tl.where(mask, dl, 0.0)


@triton.jit
def _keep_last(a, b):
    return b


@triton.jit
def seq_fwd_carry_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    bias_ptr,
    end_ptr,
    sumdl_ptr,
    DIM,
    L,
    SEG_LEN,
    CH_PER_GROUP,
    stride_bb,
    stride_bg,
    stride_bn,
    N: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    FP64: tl.constexpr,
    FAST: tl.constexpr,
):
    """Grid (DIM // BD, batch, S - 1): segment s (steps [s SEG_LEN, (s + 1) SEG_LEN), whole: only the last segment
    reaches L) scanned from a zero state. Writes end ``[S - 1, B, N, D]``, its state at the end, and sumdl ``[S - 1,
    B, D]``, the sum of delta (after bias / softplus) over it: the state entering segment s + 1 is then
    ``exp(A sumdl) h_s + end``. No y, no C, no saved states; the states are a tuple of N [BD] vectors."""
    CT: tl.constexpr = tl.float64 if FP64 else tl.float32
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    d = pid_d * BD + tl.arange(0, BD)
    grp = (pid_d * BD) // CH_PER_GROUP
    tt = tl.arange(0, BT)
    row = (b * DIM + d).to(tl.int64) * L
    B_row = B_ptr + b * stride_bb + grp * stride_bg
    first = (tt == 0)[None, :]
    sdl = tl.zeros([BD], dtype=CT)
    bias = sdl
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(CT)
    h = ()
    for _n in tl.static_range(N):
        h = h + (sdl,)
    t_lo = s * SEG_LEN
    n_tiles = SEG_LEN // BT
    offs_nx = row[:, None] + (t_lo + tt)[None, :]
    u_nx = tl.load(u_ptr + offs_nx)
    dl_nx = tl.load(delta_ptr + offs_nx)
    for i in range(0, n_tiles):
        t = t_lo + i * BT + tt
        u, dl = u_nx.to(CT), dl_nx.to(CT)
        offs_nx = row[:, None] + (t_lo + tl.minimum(i + 1, n_tiles - 1) * BT + tt)[None, :]
        u_nx = tl.load(u_ptr + offs_nx)
        dl_nx = tl.load(delta_ptr + offs_nx)
        if HAS_BIAS:
            dl = dl + bias[:, None]
        dl = _softplus_dl(dl, True, SOFTPLUS, FP64, FAST)  # whole segments: no mask
        sdl += tl.sum(dl, 1)
        du = dl * u
        nh = ()
        for n in tl.static_range(N):
            a_n = tl.load(A_ptr + d * N + n).to(CT)
            Bn = tl.load(B_row + n * stride_bn + t).to(CT)
            if FP64:
                a = tl.exp(dl * a_n[:, None])
            else:
                a = exp2(dl * (a_n * LOG2E)[:, None], FAST)
            # fold: the carried state enters as a_0 h added to b_0, so the scan's product output is dead code
            bb = du * Bn[None, :] + tl.where(first, a * h[n][:, None], -0.0)
            _, hs = tl.associative_scan((a, bb), 1, _scan_combine)
            nh = nh + (tl.reduce(hs, 1, _keep_last),)
        h = nh
    sb = s * tl.num_programs(1) + b
    for n in tl.static_range(N):
        tl.store(end_ptr + (sb * N + n) * DIM + d, h[n].to(end_ptr.dtype.element_ty))
    tl.store(sumdl_ptr + sb * DIM + d, sdl.to(sumdl_ptr.dtype.element_ty))


def pack_bc(B: torch.Tensor, C: torch.Tensor, bt: int, dtype: torch.dtype) -> torch.Tensor:
    """B, C ``[B, G, N, L]`` -> ``[B, G, cdiv(L, bt), N, 2, bt]`` in ``dtype``, zero-padded past L: each chunk's rows
    of every state in one block, so the kernel loads them at constant offsets from one pointer."""
    bsz, g, n, length = B.shape
    nk = triton.cdiv(length, bt)
    bc = torch.zeros(bsz, g, nk * bt, n, 2, device=B.device, dtype=dtype)
    bc[:, :, :length, :, 0] = B.transpose(2, 3)
    bc[:, :, :length, :, 1] = C.transpose(2, 3)
    return bc.view(bsz, g, nk, bt, n, 2).permute(0, 1, 2, 4, 5, 3).contiguous()


def fast_math(u: torch.Tensor) -> bool:
    """Approximate ex2/rcp PTX (float32 math on an NVIDIA GPU); the interpreter runs the exact path."""
    return u.is_cuda and torch.version.hip is None and u.dtype != torch.float64


def seq_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    delta_softplus: bool,
    block_l: int = 64,
    bt: int | None = None,
    bd: int = 32,
    num_warps: int = 1,
    *,
    a_reg: int = 1,
    bc_pack: int = 1,
    prefetch: int = 1,
    softplus_poly: int | None = None,
    emu: int = 0,
    pf_bc: int | None = None,
    fast: bool | None = None,
    col_store: int = 1,
    segments: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, delta, z ``[B, D, L]`` contiguous; A ``[D, N]``; B, C ``[B, G, N, L]`` (L contiguous); D, delta_bias ``[D]``;
    initial_state ``[B, D, N]``. Returns ``out [B, D, L]`` (u's dtype), ``last_state [B, D, N]`` and the states
    buffer ``[B, cdiv(L, block_l) + 1, N, D]`` (v2's format).

    Knobs: ``bt`` time steps a thread (None: 16 bytes of u, 8 for bf16, 4 for float32; more makes Triton split a
    thread's steps over lanes, which costs shuffles); ``bd`` channels a program (a power of two dividing D / G; one
    channel a thread at ``bd = 32 num_warps``); ``block_l`` the state-buffer spacing (a multiple of bt). Variants:
    ``a_reg`` A's row as a register tile; ``bc_pack`` B/C repacked chunk-major in the state dtype (else read in place);
    ``prefetch`` next chunk's u/delta/z into registers; ``softplus_poly`` (default on a GPU) the one-MUFU softplus;
    ``emu`` states whose decay exp runs on the FMA pipe; ``pf_bc`` (default on a GPU) L1 prefetch of the next
    chunk's B/C; ``fast`` approximate ex2/rcp PTX (default on a GPU). The state loop is unrolled: N up to ~32
    (N = 64 compiles for ~10 min and spills). ``segments``: the sequence split into this many segments run in
    parallel (more programs for few long sequences): a light pass (``seq_fwd_carry_kernel``) gives each segment but
    the last its end state from zero and its decay, a chain over the segments writes the states entering them into
    the states buffer, then the main kernel runs every segment from its entering state."""
    bsz, dim, length = u.shape
    if bt is None:
        bt = max(1, 16 // u.element_size())
    n = A.shape[1]
    groups = B.shape[1]
    if block_l % bt or bt & (bt - 1) or bd & (bd - 1) or (dim // groups) % bd:
        raise ValueError(f"seq_fwd: need powers of two bt={bt} | block_l={block_l} and bd={bd} | D/G={dim // groups}")
    nc = triton.cdiv(length, block_l)
    out = torch.empty_like(u)
    states = new_states(u, initial_state, nc, n)
    dummy = u
    bc = pack_bc(B, C, bt, states.dtype) if bc_pack else dummy
    fast_ = fast_math(u) if fast is None else bool(fast)
    sd = states.dtype
    seg_blocks = triton.cdiv(nc, max(1, segments))
    n_seg = triton.cdiv(nc, seg_blocks)
    if n_seg > 1:
        end = torch.empty(n_seg - 1, bsz, n, dim, device=u.device, dtype=sd)
        sumdl = torch.empty(n_seg - 1, bsz, dim, device=u.device, dtype=sd)
        seq_fwd_carry_kernel[(dim // bd, bsz, n_seg - 1)](
            u, delta, A, B, delta_bias if delta_bias is not None else dummy, end, sumdl, dim, length,
            seg_blocks * block_l, dim // groups, B.stride(0), B.stride(1), B.stride(2),
            N=n, BD=bd, BT=bt, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            FP64=sd == torch.float64, FAST=fast_, num_warps=num_warps,
        )  # fmt: skip
        a_t = A.t().to(sd)  # [N, D]
        for seg in range(1, n_seg):  # the states entering each segment, in its slot of the buffer
            prev = states[:, (seg - 1) * seg_blocks]
            states[:, seg * seg_blocks] = torch.exp(a_t * sumdl[seg - 1][:, None, :]) * prev + end[seg - 1]
    selective_scan_seq_fwd_kernel[(dim // bd, bsz, n_seg)](
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
        bc,
        dim,
        length,
        nc,
        dim // groups,
        groups,
        B.stride(0),
        B.stride(1),
        B.stride(2),
        C.stride(0),
        C.stride(1),
        C.stride(2),
        N=n,
        NP=triton.next_power_of_2(n),
        BD=bd,
        BT=bt,
        BLOCK_L=block_l,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        FP64=states.dtype == torch.float64,
        FAST=fast_,
        A_REG=int(a_reg),
        BC_PACK=int(bc_pack),
        PREFETCH=int(prefetch),
        SP_POLY=int(fast_math(u) if softplus_poly is None else softplus_poly) and states.dtype != torch.float64,
        EMU=min(int(emu), n) if states.dtype != torch.float64 else 0,
        PF_BC=int(fast_math(u) if pf_bc is None else pf_bc) and bool(bc_pack),
        COL_STORE=int(col_store),
        SEG_BLOCKS=seg_blocks,
        SEGMENTED=int(n_seg > 1),
        num_warps=num_warps,
    )
    # a copy even when N = 1 (where the transposed view is already contiguous): no output may alias another
    return out, states[:, nc].transpose(1, 2).clone(memory_format=torch.contiguous_format), states


#: configs for the GPU sweep, best guess first. sm_90 cross-compile (Triton 3.6, bf16 with z, D, bias + softplus), chunk
#: loop per (t, d, n) element: bt 8: 255 registers (8 one-warp programs / SM), 7.9 instructions, 1.19 MUFU;
#: emu 1: 8.6 and 1.125; bt 4: 168 registers (12 / SM), 8.4 and 1.19; bd 64 / 128 with 2 / 4 warps: the same loop
_K = dict(block_l=64, bt=8, bd=32, num_warps=1)
SWEEP = [
    _K,
    _K | dict(emu=1),
    _K | dict(bt=4),
    _K | dict(bt=4, emu=1),
    _K | dict(bd=64, num_warps=2),
    _K | dict(bd=128, num_warps=4),
    _K | dict(bt=4, bd=64, num_warps=2),
    _K | dict(emu=2),
    _K | dict(pf_bc=0),
    _K | dict(prefetch=0),
    _K | dict(a_reg=0),
    _K | dict(bc_pack=0),
    _K | dict(softplus_poly=0),
    _K | dict(block_l=128),
    _K | dict(bt=2),
]


def _main(argv: list[str] | None = None) -> int:
    """GPU check and timing of seq_fwd vs v2's forward; writes ``OUT/seq_fwd.json``."""
    import argparse
    import json
    import os
    import time

    import triton.testing

    from .op import default_config, selective_scan_fwd

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("out")
    p.add_argument("--configs", default="", help="JSON list of seq_fwd keyword dicts (default: SWEEP)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: tiny shapes, one call timed")
    args = p.parse_args(argv)
    cfgs = json.loads(args.configs) if args.configs else SWEEP
    dev, dim, n = ("cpu" if args.smoke else "cuda"), args.dim, args.state

    def inputs(bsz, length, dtype, seed):
        g = torch.Generator(device=dev).manual_seed(seed)

        def r(*shape, scale=1.0, shift=0.0):
            return torch.randn(*shape, generator=g, device=dev, dtype=torch.float64) * scale + shift

        ins = dict(
            u=r(bsz, dim, length), delta=r(bsz, dim, length, scale=0.5, shift=-1.0),
            A=-torch.rand(dim, n, generator=g, device=dev, dtype=torch.float64) * 2 - 0.1,
            B=r(bsz, 1, n, length), C=r(bsz, 1, n, length), D=r(dim), z=r(bsz, dim, length),
            delta_bias=r(dim, scale=0.5, shift=-2.0), initial_state=None,
        )  # fmt: skip
        low = ("u", "delta", "B", "C", "z")
        return {k: (v.to(dtype) if k in low else v.to(state_dtype(ins["u"].to(dtype)))) if v is not None else None
                for k, v in ins.items()}  # fmt: skip

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def v2_cfg(block_l, length):
        cfg = default_config(dim, length, 1)
        return [block_l, *cfg[1:]]

    rows = []
    # accuracy at B2 against v2's float64 forward (itself checked against the float64 recurrence)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        ins = inputs(2, args.length, dtype, 1)
        ref = inputs(2, args.length, torch.float64, 1)
        for c in cfgs[:2] if dtype != torch.float64 else cfgs[:1]:
            y2, h2, s2 = selective_scan_fwd(*ref.values(), True, v2_cfg(c["block_l"], args.length))
            y, h, s = seq_fwd(*ins.values(), True, **c)
            rows.append(dict(kind="check", dtype=str(dtype), config=c, rel_y=rel(y, y2), rel_last=rel(h, h2),
                             rel_states=rel(s, s2)))  # fmt: skip
            print(rows[-1], flush=True)
    ins = inputs(args.batch, args.length, torch.bfloat16, 2)

    def bench(fn):
        if args.smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    cfg2 = default_config(dim, args.length, 1)
    rows.append(dict(kind="time", impl="v2", config=cfg2,
                     ms=bench(lambda: selective_scan_fwd(*ins.values(), True, cfg2))))  # fmt: skip
    rows.append(dict(kind="time", impl="pack_bc only", ms=bench(lambda: pack_bc(ins["B"], ins["C"], 8, torch.float32))))
    print(rows[-2], rows[-1], flush=True)
    for c in cfgs:
        ref = selective_scan_fwd(*ins.values(), True, v2_cfg(c["block_l"], args.length))
        got = seq_fwd(*ins.values(), True, **c)
        row = dict(kind="time", impl="v3", config=c, ms=bench(lambda c=c: seq_fwd(*ins.values(), True, **c)),
                   rel_y_vs_v2=rel(got[0], ref[0]), rel_states_vs_v2=rel(got[2], ref[2]))  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)", torch=torch.__version__, triton=triton.__version__,
                shape=dict(batch=args.batch, length=args.length, dim=dim, state=n))  # fmt: skip
    with open(os.path.join(args.out, "seq_fwd.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
