"""Benchmark cases of the Mamba-side kernels: selective scan, causal conv, (gated) RMSNorm, chunked loss.

Runnable on its own (``python -m mixlab.bench.cases_mamba``) and through ``mixlab bench``: ``add_arguments``
and ``run(args)``. On a GPU it first checks the kernels at full width against float64 references,
then times forward and forward+backward (``triton.testing.do_bench`` medians) next to their floors:
the fewest bytes over the measured copy bandwidth and, for the scan, its essential arithmetic
(below). Results go to ``<out-dir>/kernels-mamba-<device>-<date>.json``; a short table is printed last.

Floors of the selective scan (M tokens, D channels, N states, bf16 I/O): forward moves u, delta, z in
and y out (8 M D bytes); backward reads u, delta, z, dy and writes du, ddelta, dz (14 M D bytes).
Per (token, channel, state) the forward needs one exp (MUFU, 16/clk/SM on Hopper) and ~4 FP32
instructions; forward+backward (with the forward recomputed once) ~18 FP32 instructions and 2 exps.

``--smoke`` runs everything at toy sizes on the CPU under ``TRITON_INTERPRET=1`` to test the script.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F

from .common import environment, format_table, save_results

# Hopper figures used for the arithmetic floors (H100 SXM: 132 SMs; a sustained ~1.755 GHz clock).
SM_CLOCK_HZ = 1.755e9
FP32_LANES_PER_SM = 128
MUFU_PER_SM = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch = tokens / T)")
    p.add_argument("--dim", type=int, default=4096, help="scan / conv channels (Mamba's d_inner)")
    p.add_argument("--state", type=int, default=16, help="scan state size N")
    p.add_argument("--lengths", default="2048,8192,32768", help="sequence lengths T to time the scan at")
    p.add_argument("--sweep", action="store_true", help="time several launch configs first and keep the fastest")
    p.add_argument("--sections", default="ceil,check,scan,conv,norm,loss", help="comma-separated subset to run")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip sweeps / sections once this many seconds pass")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU under TRITON_INTERPRET=1")
    p.add_argument(
        "--scan-configs",
        default=None,
        help="JSON list of scan launch configs to sweep instead of the built-in list (see selective_scan's op.py); "
        "the check section then runs the first of them as well as the default",
    )


# ------------------------------------------------------------------------------------------------ util


class _Clock:
    def __init__(self, budget_s: float) -> None:
        self.t0 = time.time()
        self.budget = budget_s

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)


def _bench_ms(fn, smoke: bool) -> float:
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ ceilings


def _ceilings(dev: str, smoke: bool) -> dict[str, float]:
    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of float32 on the GPU
    x = torch.randn(n, device=dev)
    y = torch.empty_like(x)
    ms = _bench_ms(lambda: y.copy_(x), smoke)
    out = {"copy_tb_s": 2 * x.numel() * 4 / ms / 1e9}
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        out["sms"] = props.multi_processor_count
    else:
        out["sms"] = 1
    return out


# ------------------------------------------------------------------------------------- selective scan


def _scan_inputs(bsz: int, dim: int, length: int, n: int, dev: str, dtype: torch.dtype, seed: int = 0):
    """Mamba-like inputs: A = -(1..N), dt bias = softplus^-1 of dt in [1e-3, 0.1], small delta."""
    g = torch.Generator(device=dev).manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale

    dt = torch.exp(torch.rand(dim, generator=g, device=dev) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    ins = {
        "u": r(bsz, dim, length).to(dtype),
        "delta": r(bsz, dim, length, scale=0.5).to(dtype),
        "A": -torch.arange(1, n + 1, device=dev, dtype=torch.float32).repeat(dim, 1),
        "B": r(bsz, n, length).to(dtype),
        "C": r(bsz, n, length).to(dtype),
        "D": r(dim),
        "z": r(bsz, dim, length).to(dtype),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),
    }
    return ins


def _scan_recurrence(u, delta, A, B, C, D, z, delta_bias):
    """float64 step-by-step definition (mamba_ssm's selective_scan_ref semantics), with last state."""
    u, delta, A, B, C = u.double(), delta.double(), A.double(), B.double(), C.double()
    delta = F.softplus(delta + delta_bias.double()[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + D.double()[:, None] * u
    return y * F.silu(z.double()), h


def _scan_check(args, dev, rows) -> None:
    from mixlab.ops.selective_scan.triton import selective_scan_triton
    from mixlab.ops.selective_scan.triton.op import default_config, launch_config

    bsz, length = (2, 2048) if not args.smoke else (1, 12)
    dim, n = args.dim, args.state
    base = _scan_inputs(bsz, dim, length, n, dev, torch.float64, seed=1)
    leaves = {k: v.clone().requires_grad_() for k, v in base.items()}
    y_ref, h_ref = _scan_recurrence(**leaves)
    g = torch.Generator(device=dev).manual_seed(2)
    gy = torch.randn(y_ref.shape, generator=g, device=dev, dtype=torch.float64)
    gh = torch.randn(h_ref.shape, generator=g, device=dev, dtype=torch.float64)
    names = list(leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), [leaves[k] for k in names])
    y_ref, h_ref = y_ref.detach(), h_ref.detach()
    # the default at a batch that fills the GPU (v3 for N <= 16; at this check's B2 the op itself would pick v2), v2
    cfgs = ["default", default_config(dim, length, 1)]
    if args.scan_configs:
        cfgs.append(json.loads(args.scan_configs)[0])
    for cfg, dtype in itertools.product(cfgs, (torch.bfloat16, torch.float32)):
        if cfg == "default":
            cfg = launch_config(dim, length, 1, n, dtype)
        ins = {
            k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v.float()).detach().requires_grad_()
            for k, v in base.items()
        }
        y, h = selective_scan_triton(**ins, delta_softplus=True, return_last_state=True, config=cfg)
        grads = torch.autograd.grad([y, h], [ins[k] for k in names], [gy.to(y.dtype), gh.float()])
        row = {
            "op": "selective_scan",
            "case": f"check B{bsz} T{length} D{dim} N{n} vs float64 recurrence",
            "config": cfg,
            "dtype": str(dtype).replace("torch.", ""),
            "rel_err_y": _rel(y, y_ref),
            "rel_err_last_state": _rel(h, h_ref),
        }
        for k, a, b in zip(names, grads, grads_ref):
            row[f"rel_err_d{k}"] = _rel(a, b)
        rows.append(row)
        print("check", row, flush=True)


def _scan_floor_ms(tokens: int, dim: int, n: int, copy_tb_s: float, sms: int) -> dict[str, float]:
    elems = tokens * dim * n
    lanes = sms * FP32_LANES_PER_SM * SM_CLOCK_HZ
    mufu = sms * MUFU_PER_SM * SM_CLOCK_HZ
    bw = copy_tb_s * 1e12
    fwd = max(8 * tokens * dim / bw, 4 * elems / lanes, elems / mufu)
    fb = max(22 * tokens * dim / bw, 18 * elems / lanes, 2 * elems / mufu)
    return {"fwd": fwd * 1e3, "fwd_bwd": fb * 1e3}


def _scan_call(ins, cfg):
    from mixlab.ops.selective_scan.triton import selective_scan_triton

    return selective_scan_triton(**ins, delta_softplus=True, config=cfg)


def _scan_time(ins, cfg, smoke) -> tuple[float, float]:
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    with torch.no_grad():
        fwd = _bench_ms(lambda: _scan_call(ins, cfg), smoke)
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    gy = torch.randn_like(ins["u"])

    def fb():
        y = _scan_call(leaves, cfg)
        torch.autograd.grad(y, [leaves[k] for k in names], gy)

    return fwd, _bench_ms(fb, smoke)


def _warm_scan(cfg: list[int], dim: int, n: int, length: int) -> str:
    """Compile one launch config in a worker process (fills Triton's on-disk cache)."""
    try:
        ins = _scan_inputs(1, dim, length, n, "cuda", torch.bfloat16)
        _scan_time_once(ins, cfg)
        return "ok"
    except Exception as e:  # report, don't kill the sweep
        return f"{type(e).__name__}: {e}"[:300]


def _scan_time_once(ins, cfg) -> None:
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    y = _scan_call(leaves, cfg)
    torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y))
    _sync()


def _scan_sweep_configs(smoke: bool, override: str | None = None) -> list[list[int]]:
    if override:
        return [list(map(int, c)) for c in json.loads(override)]
    # [block_l, fwd_block_d, fwd_warps, bwd_block_d, bwd_warps(, bwd_states, bwd_red(, bwd_maxnreg(, fold)))];
    # 8 elements per thread in each tile. bwd_states 2: two states per iteration of the backward; bwd_red 1: dB/dC
    # added as tiles with atomics (no cross-lane sums); bwd_maxnreg: register cap; fold 1: carries folded into
    # the scans' inputs, both passes (forward loop 183 -> 160 per state) (ops/selective_scan/triton/op.py)
    if smoke:
        return [[8, 4, 1, 4, 1], [8, 2, 1, 2, 1], [8, 4, 1, 4, 1, 2, 1, 0, 1], [8, 4, 1, 4, 1, 1, 2, 128, 1]]
    # the backward dominates (~21 of 25.5 ms) and is latency-bound: vary its resident warps and variant. sm_90
    # (Triton 3.9 cross-compile) registers of the backward, one-warp programs per SM in parentheses, and SASS
    # instructions of the state loop per state (8 elements a thread); most promising first (the budget cuts the tail)
    return [
        [64, 16, 4, 4, 1],  # v2.1 default: [4, 64] tile, 213 regs (9), loop 466, 84 SHFL
        [64, 16, 4, 4, 1, 1, 0, 136, 1],  # fold + cap: 136 regs (15), loop 418, 72 SHFL
        [64, 16, 4, 4, 1, 1, 0, 0, 1],  # fold: 213 regs (9), loop 406
        [64, 16, 4, 4, 1, 1, 0, 136],  # cap: 136 regs (15), loop 473, spill-free (96 B spilled outside it)
        [64, 16, 4, 4, 1, 1, 0, 168, 1],  # fold + cap: 168 regs (12), no spill, loop 415
        [64, 16, 4, 4, 1, 1, 1, 136, 1],  # tile atomics + fold + cap: 136 regs (15), loop 405, 56 SHFL, 1 BAR
        [64, 16, 4, 4, 1, 1, 0, 128, 1],  # fold + cap: 128 regs (16), loop 422
        [64, 16, 4, 4, 1, 2, 1, 0, 1],  # two states per iteration + tile atomics + fold: 255 regs (8), 386 per state
        [128, 8, 4, 2, 1, 1, 0, 0, 1],  # [2, 128] + fold: 179 regs (11), no spill, loop 432
        [128, 8, 4, 2, 1, 1, 0, 136, 1],  # [2, 128] + fold + cap: 136 regs (15), loop 436
        [64, 16, 4, 4, 1, 1, 1, 0, 1],  # tile atomics + fold: 181 regs (11), loop 400
        [128, 8, 4, 2, 1],  # v2.1 [2, 128]: 168 regs + 8 B spill (12), loop 485
    ]


def _scan_family(cfg: list[int]) -> tuple[int, int]:
    """(version, block_l) of a scan config: configs of one family share the saved-state layout."""
    from mixlab.ops.selective_scan.triton.op import V3, block_len

    return (V3 if cfg[0] == V3 else 2, block_len(cfg))


def _scan_merge_halves(fwd_cfg: list[int], bwd_cfg: list[int]) -> list[int]:
    """The forward half of one config with the backward half of another of the same family."""
    from mixlab.ops.selective_scan.triton.op import V3, V3_FIELDS

    if fwd_cfg[0] != V3:
        return [fwd_cfg[0], *fwd_cfg[1:3], *bwd_cfg[3:]]
    names = [name for name, _ in V3_FIELDS]
    full = {name: default for name, default in V3_FIELDS}
    f = full | dict(zip(names, fwd_cfg[1:]))
    b = full | dict(zip(names, bwd_cfg[1:]))
    return [V3, *(f[k] if k.startswith("fwd") or k == "block_l" else b[k] for k in names)]


def _start_warm_pool(args, dev):
    """Compile the sweep's scan configs in worker processes while the main process runs the checks."""
    if not args.sweep or args.smoke or dev != "cuda":
        return None, []
    import importlib

    warm = importlib.import_module("mixlab.bench.cases_mamba")._warm_scan  # picklable by module path
    cfgs = _scan_sweep_configs(args.smoke, args.scan_configs)
    t_sweep = int(args.lengths.split(",")[0])
    ex = cf.ProcessPoolExecutor(max_workers=min(len(cfgs), 12), mp_context=torch.multiprocessing.get_context("spawn"))
    return ex, [ex.submit(warm, cfg, args.dim, args.state, t_sweep) for cfg in cfgs]


def _scan_grads(ins, cfg):
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    y = _scan_call(leaves, cfg)
    gy = torch.randn(y.shape, generator=torch.Generator(device=y.device).manual_seed(9), device=y.device).to(y.dtype)
    return [y.detach(), *torch.autograd.grad(y, [leaves[k] for k in names], gy)]


def _scan_bench(args, dev, rows, ceil, clock, warm=None) -> None:
    from mixlab.ops.selective_scan.triton.op import launch_config

    dim, n = args.dim, args.state
    lengths = [int(x) for x in args.lengths.split(",")] if not args.smoke else [16]
    tokens = args.tokens if not args.smoke else 32
    floor = _scan_floor_ms(tokens, dim, n, ceil["copy_tb_s"], ceil["sms"])
    best = None
    if args.sweep:
        cfgs = _scan_sweep_configs(args.smoke, args.scan_configs)
        t_sweep = lengths[0]
        if warm:
            t0 = time.time()
            status = [f.result() for f in warm]
            print(f"waited {time.time() - t0:.1f}s for the parallel compiles: {status}", flush=True)
        else:
            status = ["ok"] * len(cfgs)
        ins = _scan_inputs(tokens // t_sweep, dim, t_sweep, n, dev, torch.bfloat16)
        base_cfg = launch_config(dim, t_sweep, 1, n, torch.bfloat16, tokens // t_sweep)
        base = _scan_grads(ins, base_cfg)
        results = []
        for cfg, st in zip(cfgs, status):
            row = {"op": "selective_scan", "case": f"sweep B{tokens // t_sweep} T{t_sweep}", "config": cfg}
            if st != "ok" or clock.left() < 60:
                rows.append(row | {"error": st if st != "ok" else "skipped: time budget"})
                continue
            try:
                fwd, fb = _scan_time(ins, cfg, args.smoke)
                other = _scan_grads(ins, cfg)
                diff = max(_rel(a, b) for a, b in zip(other, base))
                del other
            except Exception as e:
                rows.append(row | {"error": repr(e)[:300]})
                continue
            # bf16 outputs of two correct configs differ by rounding only
            if diff < 2e-2:
                results.append((cfg, fwd, fb))
            rows.append(row | {"fwd_ms": fwd, "fwd_bwd_ms": fb, "bwd_ms": fb - fwd, "max_rel_diff_vs_default": diff})
            print(rows[-1], flush=True)
        # fwd and bwd halves are independent given the version and block_l: combine the best of each
        combos = []
        for key in sorted({_scan_family(r[0]) for r in results}):
            same = [r for r in results if _scan_family(r[0]) == key]
            f = min(same, key=lambda r: r[1])
            b = min(same, key=lambda r: r[2] - r[1])
            combos.append((f[1] + (b[2] - b[1]), _scan_merge_halves(f[0], b[0])))
        if combos:
            best = min(combos)[1]
            print(f"best scan config {best}", flush=True)
        del ins, base
    for length in lengths:
        if clock.left() < 30:
            break
        bsz = max(1, tokens // length)
        cfg = best or launch_config(dim, length, 1, n, torch.bfloat16, bsz)
        ins = _scan_inputs(bsz, dim, length, n, dev, torch.bfloat16)
        try:
            fwd, fb = _scan_time(ins, cfg, args.smoke)
        except Exception as e:
            rows.append({"op": "selective_scan", "case": f"T{length}", "config": cfg, "error": repr(e)[:300]})
            continue
        rows.append(
            {
                "op": "selective_scan",
                "case": f"D{dim} N{n} z+D, B{bsz} T{length}",
                "dtype": "bfloat16",
                "config": cfg,
                "fwd_ms": fwd,
                "fwd_bwd_ms": fb,
                "floor_fwd_ms": floor["fwd"],
                "floor_fwd_bwd_ms": floor["fwd_bwd"],
                "pct_floor_fwd_bwd": 100 * floor["fwd_bwd"] / fb,
                "target_ms": 23.5,
            }
        )
        print(rows[-1], flush=True)
        _peer_mamba_ssm(ins, length, bsz, dim, n, rows, args.smoke)
        del ins


def _peer_mamba_ssm(ins, length, bsz, dim, n, rows, smoke) -> None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    leaves = {k: v.detach().requires_grad_() for k, v in ins.items()}
    gy = torch.randn_like(ins["u"])

    def fb():
        y = selective_scan_fn(**leaves, delta_softplus=True)
        torch.autograd.grad(y, [leaves[k] for k in names], gy)

    with torch.no_grad():
        fwd = _bench_ms(lambda: selective_scan_fn(**ins, delta_softplus=True), smoke)
    rows.append(
        {
            "op": "selective_scan (mamba_ssm CUDA)",
            "case": f"D{dim} N{n} z+D, B{bsz} T{length}",
            "fwd_ms": fwd,
            "fwd_bwd_ms": _bench_ms(fb, smoke),
        }
    )


# ---------------------------------------------------------------------------------------------- conv


def _conv_bench(args, dev, rows, ceil, clock) -> None:
    from mixlab.ops.conv.reference import causal_conv1d
    from mixlab.ops.conv.triton import bwd_variants, causal_conv1d_triton, default_config

    T = 2048 if not args.smoke else 16
    tokens = args.tokens if not args.smoke else 32
    bsz, C, W = tokens // T, args.dim, 4
    g = torch.Generator(device=dev).manual_seed(3)
    x64 = torch.randn(bsz, T, C, generator=g, device=dev, dtype=torch.float64)
    w64 = torch.randn(C, W, generator=g, device=dev, dtype=torch.float64) * 0.5
    b64 = torch.randn(C, generator=g, device=dev, dtype=torch.float64)
    gy64 = torch.randn(bsz, T, C, generator=g, device=dev, dtype=torch.float64)
    # accuracy vs float64, at full shape
    leaves = [t.clone().requires_grad_() for t in (x64, w64, b64)]
    y_ref = causal_conv1d(*leaves, activation="silu")[0]
    g_ref = torch.autograd.grad(y_ref, leaves, gy64)
    for dtype in (torch.bfloat16, torch.float32):
        lv = [x64.to(dtype).requires_grad_(), w64.float().requires_grad_(), b64.float().requires_grad_()]
        y = causal_conv1d_triton(*lv, activation="silu")[0]
        gr = torch.autograd.grad(y, lv, gy64.to(dtype))
        rows.append(
            {
                "op": "causal_conv1d",
                "case": f"check B{bsz} T{T} C{C} W{W} bias+silu vs float64",
                "dtype": str(dtype).replace("torch.", ""),
                "rel_err_y": _rel(y, y_ref.detach()),
                "rel_err_dx": _rel(gr[0], g_ref[0]),
                "rel_err_dw": _rel(gr[1], g_ref[1]),
                "rel_err_db": _rel(gr[2], g_ref[2]),
            }
        )
        print(rows[-1], flush=True)
    del leaves, y_ref, g_ref
    x = x64.to(torch.bfloat16)
    w, b, gy = w64.float(), b64.float(), gy64.to(torch.bfloat16)
    del x64, gy64
    el = bsz * T * C
    bw = ceil["copy_tb_s"] * 1e12
    floor_f, floor_fb = 4 * el / bw * 1e3, 10 * el / bw * 1e3
    cfgs = [default_config(T, C)]
    if args.sweep:
        # backward variants (launch table in ops/conv/triton.py); smoke: small tiles over the toy shape
        cfgs = bwd_variants(T, C) if not args.smoke else [[*cfgs[0][:3], 8, 8, 1, 4], [*cfgs[0][:3], 16, 4, 1, 2]]

    def timed(fn_fwd, fn_fb):
        with torch.no_grad():
            f = _bench_ms(fn_fwd, args.smoke)
        return f, _bench_ms(fn_fb, args.smoke)

    xl, wl, bl = (t.detach().requires_grad_() for t in (x, w, b))
    for cfg in cfgs:
        if clock.left() < 20:
            break
        try:
            f, fb = timed(
                lambda cfg=cfg: causal_conv1d_triton(x, w, b, "silu", config=cfg),
                lambda cfg=cfg: torch.autograd.grad(
                    causal_conv1d_triton(xl, wl, bl, "silu", config=cfg)[0], [xl, wl, bl], gy
                ),
            )
        except Exception as e:
            rows.append({"op": "causal_conv1d", "config": cfg, "error": repr(e)[:300]})
            continue
        rows.append(
            {
                "op": "causal_conv1d",
                "case": f"B{bsz} T{T} C{C} W{W} bias+silu",
                "dtype": "bfloat16",
                "config": cfg,
                "fwd_ms": f,
                "fwd_bwd_ms": fb,
                "bwd_ms": fb - f,
                "floor_fwd_ms": floor_f,
                "floor_fwd_bwd_ms": floor_fb,
                "floor_bwd_ms": floor_fb - floor_f,
                "x_floor_fwd_bwd": fb / floor_fb,
                "pct_floor_fwd": 100 * floor_f / f,
                "pct_floor_fwd_bwd": 100 * floor_fb / fb,
            }
        )
        print(rows[-1], flush=True)
    f, fb = timed(
        lambda: causal_conv1d(x, w, b, "silu"),
        lambda: torch.autograd.grad(causal_conv1d(xl, wl, bl, "silu")[0], [xl, wl, bl], gy),
    )
    rows.append(
        {
            "op": "causal_conv1d (plain PyTorch)",
            "case": f"B{bsz} T{T} C{C} W{W} bias+silu",
            "dtype": "bfloat16",
            "fwd_ms": f,
            "fwd_bwd_ms": fb,
            "pct_floor_fwd_bwd": 100 * floor_fb / fb,
        }
    )
    print(rows[-1], flush=True)


# --------------------------------------------------------------------------------------------- norms


def _norm_bench(args, dev, rows, ceil, clock) -> None:
    from mixlab.ops.norm import gated_rms_norm
    from mixlab.ops.norm_triton import gated_rms_norm_triton

    tokens = args.tokens if not args.smoke else 32
    bw = ceil["copy_tb_s"] * 1e12
    cases = [
        ("rms_norm", 2048, None, False, False),
        ("gated_rms_norm (Mamba2: norm(x*silu(z)), one group)", 4096, 4096, False, True),
        ("gated_rms_norm (GDN: norm(x)*silu(z), groups of 256)", 4096, 256, True, True),
    ]
    if args.smoke:
        cases = [(name, 16, gs and min(gs, 8), nbg, hz) for name, _, gs, nbg, hz in cases]
    g = torch.Generator(device=dev).manual_seed(4)
    for name, d, gs, nbg, has_z in cases:
        if clock.left() < 15:
            break
        x64 = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.float64)
        z64 = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.float64) if has_z else None
        w64 = 1 + 0.1 * torch.randn(d, generator=g, device=dev, dtype=torch.float64)
        gy64 = torch.randn(tokens, d, generator=g, device=dev, dtype=torch.float64)
        lv = [t.clone().requires_grad_() for t in (x64, z64, w64) if t is not None]
        ref = gated_rms_norm(lv[0], lv[1] if has_z else None, lv[-1], 1e-5, gs, nbg)
        gref = torch.autograd.grad(ref, lv, gy64)
        x, z, w, gy = x64.bfloat16(), (z64.bfloat16() if has_z else None), w64.float(), gy64.bfloat16()
        lt = [t.detach().requires_grad_() for t in (x, z, w) if t is not None]

        def tri(lt=lt, gs=gs, nbg=nbg, has_z=has_z):
            return gated_rms_norm_triton(lt[0], lt[1] if has_z else None, lt[-1], 1e-5, gs, nbg)

        def plain(lt=lt, gs=gs, nbg=nbg, has_z=has_z):
            return gated_rms_norm(lt[0], lt[1] if has_z else None, lt[-1], 1e-5, gs, nbg)

        y = tri()
        gr = torch.autograd.grad(y, lt, gy)
        err = {"rel_err_y": _rel(y, ref.detach())}
        err |= {f"rel_err_d{k}": _rel(a, b) for k, a, b in zip(("x", "z", "w") if has_z else ("x", "w"), gr, gref)}
        n_io = 3 if has_z else 2  # tensors in + out, forward
        floor_f = n_io * 2 * tokens * d / bw * 1e3
        floor_fb = floor_f + (2 * n_io) * 2 * tokens * d / bw * 1e3 - 2 * tokens * d / bw * 1e3
        for label, fn in (("triton", tri), ("plain PyTorch", plain)):
            with torch.no_grad():
                f = _bench_ms(fn, args.smoke)
            fb = _bench_ms(lambda fn=fn, lt=lt, gy=gy: torch.autograd.grad(fn(), lt, gy), args.smoke)
            row = {
                "op": f"{name} ({label})",
                "case": f"{tokens}x{d}" + (f" group {gs}" if gs else ""),
                "dtype": "bfloat16",
                "fwd_ms": f,
                "fwd_bwd_ms": fb,
                "floor_fwd_ms": floor_f,
                "floor_fwd_bwd_ms": floor_fb,
                "pct_floor_fwd_bwd": 100 * floor_fb / fb,
            }
            if label == "triton":
                row |= err
            rows.append(row)
            print(row, flush=True)
        del x64, z64, gy64, lv, ref, gref, lt


# ---------------------------------------------------------------------------------------------- loss


def _loss_bench(args, dev, rows, ceil, clock) -> None:
    from mixlab.ops.loss import linear_cross_entropy

    n, v, d = (args.tokens, 32768, 2048) if not args.smoke else (64, 128, 16)
    g = torch.Generator(device=dev).manual_seed(5)
    h = (torch.randn(n, d, generator=g, device=dev) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d, generator=g, device=dev) * d**-0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=dev)
    t[::17] = -100

    def unfused():
        loss = F.cross_entropy((h @ w.t()).float(), t, ignore_index=-100)
        return torch.autograd.grad(loss, [h, w]), loss

    def chunked():
        loss = linear_cross_entropy(h, w, t)
        return torch.autograd.grad(loss, [h, w]), loss

    res = {}
    for name, fn in (("unfused F.cross_entropy on full logits", unfused), ("chunked linear_cross_entropy", chunked)):
        if clock.left() < 15:
            break
        _sync()
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        (gh, gw), loss = fn()
        _sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev == "cuda" else float("nan")
        res[name] = (gh.double(), gw.double(), loss.double())
        del gh, gw
        ms = _bench_ms(fn, args.smoke)
        rows.append(
            {
                "op": "lm loss",
                "case": f"{name}, N{n} V{v} d{d}",
                "dtype": "bfloat16",
                "fwd_bwd_ms": ms,
                "peak_extra_gib": peak,
                "tflop_s": 3 * 2 * n * v * d / ms / 1e9,
            }
        )
        print(rows[-1], flush=True)
    if len(res) == 2:
        (a, b) = res.values()
        rows.append(
            {
                "op": "lm loss",
                "case": "chunked vs unfused",
                "rel_err_loss": _rel(b[2], a[2]),
                "rel_err_dh": _rel(b[0], a[0]),
                "rel_err_dw": _rel(b[1], a[1]),
            }
        )
        print(rows[-1], flush=True)


# ----------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if dev == "cpu" and not args.smoke:
        print("cases_mamba: no CUDA device; use --smoke to exercise the script on the CPU", file=sys.stderr)
        return 1
    clock = _Clock(args.budget_s)
    rows: list[dict[str, Any]] = []
    sections = set(args.sections.split(","))
    ceil = {"copy_tb_s": 3.0, "sms": 132}
    out_dir = getattr(args, "out_dir", None)
    pool: dict[str, Any] = {}

    def start_pool():
        if "scan" in sections:
            pool["ex"], pool["warm"] = _start_warm_pool(args, dev)

    steps = [
        ("ceil", lambda: ceil.update(_ceilings(dev, args.smoke))),
        ("pool", start_pool),
        ("check", lambda: _scan_check(args, dev, rows)),
        ("scan", lambda: _scan_bench(args, dev, rows, ceil, clock, pool.get("warm"))),
        ("conv", lambda: _conv_bench(args, dev, rows, ceil, clock)),
        ("norm", lambda: _norm_bench(args, dev, rows, ceil, clock)),
        ("loss", lambda: _loss_bench(args, dev, rows, ceil, clock)),
    ]
    for name, step in steps:
        if name not in sections and name != "pool":
            continue
        if clock.left() < 10:
            rows.append({"op": name, "error": "skipped: time budget spent"})
            continue
        t0 = time.time()
        try:
            step()
        except Exception:
            rows.append({"op": name, "error": traceback.format_exc()[-1500:]})
            print(traceback.format_exc(), flush=True)
        print(f"[{name}] {time.time() - t0:.1f}s", flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
        save_results("kernels-mamba", rows, {"ceilings": ceil}, out_dir)
    if pool.get("ex") is not None:
        pool["ex"].shutdown(wait=False, cancel_futures=True)
    path = save_results("kernels-mamba", rows, {"ceilings": ceil}, out_dir)
    env = environment()
    print(f"\n{env.get('device')} torch {env['torch']} triton {env['triton']}; copy {ceil['copy_tb_s']:.2f} TB/s")
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    print(
        format_table(
            timed,
            ["op", "case", "config", "fwd_ms", "fwd_bwd_ms", "floor_fwd_bwd_ms", "pct_floor_fwd_bwd", "peak_extra_gib"],
        )
    )
    errs = [r for r in rows if any(k.startswith("rel_err") for k in r)]
    for r in errs:
        print(r["op"], r.get("dtype", ""), {k: f"{v:.1e}" for k, v in r.items() if k.startswith("rel_err")})
    for r in rows:
        if "error" in r:
            print("ERROR", r["op"], r.get("config", ""), r["error"][-300:])
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=None)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
