"""Fused conv -> SiLU -> L2 norm (``mixlab.ops.conv.triton_l2``) vs the lean layer's unfused pair (conv kernel,
then the RMSNorm kernel as L2 norm): accuracy against float64 and forward / backward times.

``python -m mixlab.bench.conv_l2 --out-dir DIR`` on CUDA: (a) max relative errors (``max |a - ref| / max |ref|``)
of y, dx, dw of both paths against a float64 PyTorch reference at the 1.3b GDN shape (B 8, T 4096, H 6, K 256,
bf16 x and dy, float32 weight as the layer has it); (b) ``triton.testing.do_bench`` medians of the forward
and the backward of both paths at B8 T4096 H6 K256 and B16 T2048 H16 K128, the fused kernels at a few launch
configs (and with ``FAST_MATH`` off: ``fused-ieee``). The lean layer runs, per q or k and training step,
the forward twice (forward + the backward's recompute) and the backward once: ``step = 2 fwd + bwd`` in the
table. Results: ``DIR/conv-l2-<device>-<date>.json``. ``--smoke``: a tiny shape, float32, on the CPU under Triton's
interpreter (a check that the script runs; its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

SHAPES = [(8, 4096, 6, 256), (16, 2048, 16, 128)]
SMOKE_SHAPES = [(1, 37, 2, 64)]


def _inputs(B, T, H, K, dtype, device, W=4, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, T, H * K, generator=g).to(device, dtype)
    w = (torch.randn(H * K, W, generator=g) * 0.5).to(device)  # float32, as the layer's conv weight
    dy = torch.randn(B, T, H, K, generator=g).to(device, dtype)
    return x, w, dy


def _unfused(H: int):
    """The lean layer's unfused path: (fwd(x, w) -> (y, (pre, rstd)), bwd(x, w, pre, rstd, dy) -> (dx, dw))."""
    from mixlab.layers.deltanet import _conv_cfg, _l2_bwd, _l2_fwd
    from mixlab.ops.conv.triton import causal_conv1d_bwd, causal_conv1d_fwd

    def fwd(x, w):
        B, T, _ = x.shape
        pre = causal_conv1d_fwd(x, w, None, None, True, _conv_cfg(x))[0].view(B, T, H, -1)
        y, rstd = _l2_fwd(pre)
        return y, (pre, rstd)

    def bwd(x, w, pre, rstd, dy):
        d = _l2_bwd(pre, rstd, dy).flatten(2)
        dx, dw, _, _ = causal_conv1d_bwd(x, w, None, None, d, None, True, _conv_cfg(x))
        return dx, dw

    return fwd, bwd


def _rel_max(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def check(B, T, H, K, dtype, device) -> dict[str, Any]:
    """Max relative errors of both paths against float64 ``l2(silu(conv(x)))`` (per head, eps 1e-6)."""
    from mixlab.layers.deltanet import L2_EPS
    from mixlab.ops.conv.reference import causal_conv1d
    from mixlab.ops.conv.triton_l2 import conv_silu_l2_bwd, conv_silu_l2_fwd

    x, w, dy = _inputs(B, T, H, K, dtype, device, seed=1)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    s = causal_conv1d(xr, wr, None, "silu")[0].view(B, T, H, K)
    yr = s / torch.sqrt(s.square().sum(-1, keepdim=True) + L2_EPS)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    yr = yr.detach()
    del s, xr, wr
    out: dict[str, Any] = {"shape": [B, T, H, K], "dtype": str(dtype).removeprefix("torch.")}
    y = conv_silu_l2_fwd(x, w, H, L2_EPS)
    dx, dw = conv_silu_l2_bwd(x, w, dy, H, L2_EPS)
    out["fused"] = {"y": _rel_max(y, yr), "dx": _rel_max(dx, dxr), "dw": _rel_max(dw, dwr)}
    fwd, bwd = _unfused(H)
    y, (pre, rstd) = fwd(x, w)
    dx, dw = bwd(x, w, pre, rstd, dy)
    out["unfused"] = {"y": _rel_max(y, yr), "dx": _rel_max(dx, dxr), "dw": _rel_max(dw, dwr)}
    return out


def _timer(device, warmup: float, rep: float) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":
        import triton

        return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def cpu(fn):  # --smoke: one call after a warm-up one
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def fwd_variants(K: int) -> list[list[int]]:
    """Forward tiles to compare (``[rows, warps]``); the first is the default."""
    return [[2048 // K, 4], [4096 // K, 4], [4096 // K, 8], [1024 // K, 2]]


def time_shape(B, T, H, K, dtype, device, timer, sweep: bool) -> list[dict[str, Any]]:
    """Rows ``{shape, impl, phase, config, ms, GBps}``; GB/s counts each kernel's reads and writes once."""
    from mixlab.layers.deltanet import L2_EPS
    from mixlab.ops.conv.triton_l2 import bwd_variants, conv_silu_l2_bwd, conv_silu_l2_fwd, default_config

    x, w, dy = _inputs(B, T, H, K, dtype, device)
    n, es = x.numel(), x.element_size()
    base = {"B": B, "T": T, "H": H, "K": K, "dtype": str(dtype).removeprefix("torch.")}
    rows = []

    def add(impl, phase, config, ms, nbytes):
        rows.append({**base, "impl": impl, "phase": phase, "config": config, "ms": ms, "GBps": nbytes / ms / 1e6})

    fwd, bwd = _unfused(H)
    pre, rstd = fwd(x, w)[1]
    add("unfused", "fwd", None, timer(lambda: fwd(x, w)), 4 * n * es)  # conv: x -> pre; norm: pre -> y
    add("unfused", "bwd", None, timer(lambda: bwd(x, w, pre, rstd, dy)), 6 * n * es)  # norm: pre, dy -> d; conv
    dflt = default_config(T, K)
    fcfgs = [dflt] + ([c + dflt[2:] for c in fwd_variants(K)[1:]] if sweep else [])
    for cfg in fcfgs:
        add("fused", "fwd", cfg[:2], timer(lambda cfg=cfg: conv_silu_l2_fwd(x, w, H, L2_EPS, cfg)), 2 * n * es)
    for cfg in bwd_variants(T, K) if sweep else [dflt]:
        add("fused", "bwd", cfg[2:], timer(lambda cfg=cfg: conv_silu_l2_bwd(x, w, dy, H, L2_EPS, cfg)), 3 * n * es)
    if sweep:  # the default configs with tl.exp and the IEEE division instead of the approximate PTX
        from mixlab.ops.conv import triton_l2

        triton_l2.FAST_MATH = False
        try:
            add("fused-ieee", "fwd", dflt[:2], timer(lambda: conv_silu_l2_fwd(x, w, H, L2_EPS, dflt)), 2 * n * es)
            add("fused-ieee", "bwd", dflt[2:], timer(lambda: conv_silu_l2_bwd(x, w, dy, H, L2_EPS, dflt)), 3 * n * es)
        finally:
            triton_l2.FAST_MATH = True
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape: the default fused and the unfused fwd, bwd and ``2 fwd + bwd`` (ms), and the best configs."""
    from mixlab.ops.conv.triton_l2 import default_config

    out = []
    for shape in dict.fromkeys((r["B"], r["T"], r["H"], r["K"]) for r in rows):
        rs = [r for r in rows if (r["B"], r["T"], r["H"], r["K"]) == shape]
        d = default_config(shape[1], shape[3])

        def ms(impl, phase, cfg=None, rs=rs):
            return next(r["ms"] for r in rs if r["impl"] == impl and r["phase"] == phase and r["config"] == cfg)

        uf, ub = ms("unfused", "fwd"), ms("unfused", "bwd")
        ff, fb = ms("fused", "fwd", d[:2]), ms("fused", "bwd", d[2:])
        best_f = min((r for r in rs if r["impl"] == "fused" and r["phase"] == "fwd"), key=lambda r: r["ms"])
        best_b = min((r for r in rs if r["impl"] == "fused" and r["phase"] == "bwd"), key=lambda r: r["ms"])
        out.append(
            {
                "shape": "B{} T{} H{} K{}".format(*shape),
                "unfused_fwd": uf,
                "fused_fwd": ff,
                "unfused_bwd": ub,
                "fused_bwd": fb,
                "unfused_step": 2 * uf + ub,
                "fused_step": 2 * ff + fb,
                "speedup": (2 * uf + ub) / (2 * ff + fb),
                "best_fwd": f"{best_f['config']} {best_f['ms']:.4g} ms {best_f['GBps']:.0f} GB/s",
                "best_bwd": f"{best_b['config']} {best_b['ms']:.4g} ms {best_b['GBps']:.0f} GB/s",
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny float32 shape; on CPU under TRITON_INTERPRET=1")
    p.add_argument("--no-sweep", action="store_true", help="time the default fused configs only")
    p.add_argument("--warmup", type=float, default=50, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=float, default=200, help="do_bench repetitions (ms)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            p.error("needs CUDA (or --smoke, which runs the kernels under Triton's interpreter)")
        if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before Triton is first imported (by torch)
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            os.execve(sys.executable, [sys.executable, "-m", "mixlab.bench.conv_l2", *sys.argv[1:]], env)
    from mixlab.bench.common import format_table, save_results

    device = torch.device("cuda" if cuda else "cpu")
    # bf16 on CUDA; the interpreter's bf16 arithmetic is not the GPU's (tests/conftest.py), so float32 there
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    checks = check(*shapes[0], dtype, device)
    if cuda:
        torch.cuda.empty_cache()
    print("max relative error vs float64 at B{} T{} H{} K{} ({}):".format(*checks["shape"], checks["dtype"]))
    for impl in ("fused", "unfused"):
        print(f"  {impl:8s} " + "  ".join(f"{k} {v:.3g}" for k, v in checks[impl].items()))
    timer = _timer(device, args.warmup, args.rep)
    rows = []
    for shape in shapes:
        rows += time_shape(*shape, dtype, device, timer, sweep=not args.no_sweep and not args.smoke)
        if cuda:
            torch.cuda.empty_cache()
    summ = summary(rows)
    path = save_results("conv-l2", rows, {"checks": checks, "summary": summ}, args.out_dir)
    print(format_table(rows, ["B", "T", "H", "K", "impl", "phase", "config", "ms", "GBps"]))
    print()
    cols = ["shape", "unfused_fwd", "fused_fwd", "unfused_bwd", "fused_bwd", "unfused_step", "fused_step", "speedup"]
    print(format_table(summ, cols))
    for s in summ:
        print(f"{s['shape']}: best fused fwd {s['best_fwd']}; best fused bwd {s['best_bwd']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
