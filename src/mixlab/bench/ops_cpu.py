"""``mixlab bench ops-cpu``: forward + backward time of the ``chunked`` ops against their ``reference``
(the step-by-step recurrence) on the CPU, at T = 2048 by default.

Ops: ``delta_rule`` (DeltaNet), ``gated_delta_rule`` (Gated DeltaNet), ``ssd`` (Mamba2) and
``selective_scan`` (Mamba), each at one modest shape (flags below; ``selective_scan`` once per
channel count in ``--channels``: its reference costs about the same per step at any width, while
the chunked scan's cost grows with it). One timed call is a forward and
a backward against a fixed random cotangent (``torch.autograd.grad``), reported as the median of
``--repeat`` calls after ``--warmup``: wall time and process CPU time (the CPU time is the steadier
figure on a shared machine). The same run also reports each chunked op's largest error relative
to the reference, on the outputs and on every input gradient.

Runs on ``--threads`` threads (default 1: a busy multi-core machine makes multi-threaded timings
of small ops erratic). Rows go to ``benchmarks/results/ops-cpu-cpu-<date>.json`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .common import format_table, save_results

OPS = ("delta_rule", "gated_delta_rule", "ssd", "selective_scan")
COLUMNS = [
    "op",
    "shape",
    "T",
    "reference_ms",
    "chunked_ms",
    "speedup",
    "reference_cpu_ms",
    "chunked_cpu_ms",
    "speedup_cpu",
    "max_rel_err",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--seqlen", type=int, default=2048, help="sequence length T (default 2048)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--heads", type=int, default=4, help="delta rule: heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="delta rule: key = value head dim (default 64)")
    parser.add_argument("--ssd-heads", type=int, default=8, help="ssd: heads (default 8)")
    parser.add_argument("--ssd-headdim", type=int, default=32, help="ssd: head dim P (default 32)")
    parser.add_argument("--ssd-state", type=int, default=64, help="ssd: state size N (default 64)")
    parser.add_argument("--ssd-chunk", type=int, default=64, help="ssd: chunk size (default 64)")
    parser.add_argument(
        "--channels",
        default="64,256",
        help="selective_scan: comma list of channel counts D, one row each (default 64,256)",
    )
    parser.add_argument("--state", type=int, default=16, help="selective_scan: state size N (default 16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls, median reported (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)


# --------------------------------------------------------------------------------------------------
# cases: each builds its inputs once and returns fn(backend) -> (outputs, grads of every input)
# --------------------------------------------------------------------------------------------------

Case = tuple[str, Callable[[str], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def delta_rule_case(args: argparse.Namespace, gated: bool, dtype: torch.dtype, gen: torch.Generator) -> Case:
    from ..ops.delta_rule import delta_rule

    B, T, H, K = args.batch, args.seqlen, args.heads, args.head_dim
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype) + 3) if gated else None
    h0 = torch.randn(B, H, K, K, generator=gen, dtype=dtype) * 0.1
    inputs = [_leaf(t) for t in (q, k, v, beta, h0)] + ([_leaf(g)] if gated else [])
    gy = torch.randn(B, T, H, K, generator=gen, dtype=dtype)

    def fn(backend: str):
        qq, kk, vv, bb, s0 = inputs[:5]
        gg = inputs[5] if gated else None
        o, _ = delta_rule(qq, kk, vv, bb, gg, initial_state=s0, backend=backend)
        return o, torch.autograd.grad(o, inputs, gy)

    return f"B{B} H{H} K{K} V{K}", fn


def ssd_case(args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator) -> Case:
    from ..ops.ssd import ssd

    B, T, H, P, N = args.batch, args.seqlen, args.ssd_heads, args.ssd_headdim, args.ssd_state
    x = torch.randn(B, T, H, P, generator=gen, dtype=dtype)
    dt = torch.randn(B, T, H, generator=gen, dtype=dtype) - 2
    A = -torch.empty(H, dtype=dtype).uniform_(1, 16, generator=gen)
    Bm = torch.randn(B, T, 1, N, generator=gen, dtype=dtype)
    Cm = torch.randn(B, T, 1, N, generator=gen, dtype=dtype)
    D = torch.ones(H, dtype=dtype)
    dt_bias = torch.randn(H, generator=gen, dtype=dtype) * 0.1
    inputs = [_leaf(t) for t in (x, dt, A, Bm, Cm, D, dt_bias)]
    gy = torch.randn(B, T, H, P, generator=gen, dtype=dtype)

    def fn(backend: str):
        xx, dd, AA, BB, CC, DD, db = inputs
        kw = {"chunk_size": args.ssd_chunk} if backend == "chunked" else {}
        y, _ = ssd(xx, dd, AA, BB, CC, D=DD, dt_bias=db, dt_softplus=True, backend=backend, **kw)
        return y, torch.autograd.grad(y, inputs, gy)

    return f"B{B} H{H} P{P} N{N} G1 chunk{args.ssd_chunk}", fn


def selective_scan_case(args: argparse.Namespace, D: int, dtype: torch.dtype, gen: torch.Generator) -> Case:
    from ..ops.selective_scan import selective_scan

    B, T, N = args.batch, args.seqlen, args.state
    # [B, L, D] activations seen as [B, D, L], as the Mamba layer passes them
    u = torch.randn(B, T, D, generator=gen, dtype=dtype).transpose(1, 2)
    delta = (torch.randn(B, T, D, generator=gen, dtype=dtype) - 2).transpose(1, 2)
    z = torch.randn(B, T, D, generator=gen, dtype=dtype).transpose(1, 2)
    A = -torch.arange(1, N + 1, dtype=dtype).expand(D, N) * torch.empty(D, 1, dtype=dtype).uniform_(
        0.5, 1.5, generator=gen
    )
    Bm = torch.randn(B, T, N, generator=gen, dtype=dtype).transpose(1, 2)
    Cm = torch.randn(B, T, N, generator=gen, dtype=dtype).transpose(1, 2)
    Dp = torch.ones(D, dtype=dtype)
    bias = torch.randn(D, generator=gen, dtype=dtype) * 0.1
    inputs = [_leaf(t) for t in (u, delta, A, Bm, Cm, Dp, z, bias)]
    gy = torch.randn(B, D, T, generator=gen, dtype=dtype)

    def fn(backend: str):
        uu, dd, AA, BB, CC, DD, zz, bb = inputs
        y = selective_scan(uu, dd, AA, BB, CC, DD, zz, delta_bias=bb, delta_softplus=True, backend=backend)
        return y, torch.autograd.grad(y, inputs, gy)

    return f"B{B} D{D} N{N}", fn


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def _time(fn: Callable[[], Any], warmup: int, repeat: int) -> tuple[float, float, Any]:
    """Median wall and CPU milliseconds of ``fn()`` over ``repeat`` calls, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpus.append((time.process_time() - c0) * 1e3)
        walls.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(walls), statistics.median(cpus), out


def _max_rel_err(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = y.detach().abs().max().item()
        if scale > 0:
            worst = max(worst, (x.detach() - y.detach()).abs().max().item() / scale)
    return worst


def run_case(name: str, case: Case, warmup: int, repeat: int, T: int) -> dict[str, Any]:
    shape, fn = case
    ref_ms, ref_cpu, (y_ref, g_ref) = _time(lambda: fn("reference"), warmup, repeat)
    ch_ms, ch_cpu, (y_ch, g_ch) = _time(lambda: fn("chunked"), warmup, repeat)
    return {
        "op": name,
        "shape": shape,
        "T": T,
        "reference_ms": ref_ms,
        "chunked_ms": ch_ms,
        "speedup": ref_ms / ch_ms,
        "reference_cpu_ms": ref_cpu,
        "chunked_cpu_ms": ch_cpu,
        "speedup_cpu": ref_cpu / ch_cpu,
        "max_rel_err": _max_rel_err((y_ch, *g_ch), (y_ref, *g_ref)),
    }


def run(args: argparse.Namespace) -> int:
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"mixlab bench ops-cpu: unknown op(s) {unknown}; choose from {', '.join(OPS)}")
    if args.seqlen < 1 or args.batch < 1:
        raise SystemExit("mixlab bench ops-cpu: --seqlen and --batch must be positive")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    dtype = getattr(torch, args.dtype)
    try:
        channels = [int(c) for c in str(args.channels).split(",") if c.strip()]
    except ValueError:
        raise SystemExit(
            f"mixlab bench ops-cpu: --channels must be a comma list of ints, got {args.channels!r}"
        ) from None
    rows = []
    try:
        for name, variant in [(o, c) for o in ops for c in (channels if o == "selective_scan" else [None])]:
            gen = torch.Generator().manual_seed(args.seed)
            if name in ("delta_rule", "gated_delta_rule"):
                case = delta_rule_case(args, name == "gated_delta_rule", dtype, gen)
            elif name == "ssd":
                case = ssd_case(args, dtype, gen)
            else:
                case = selective_scan_case(args, variant, dtype, gen)
            row = run_case(name, case, args.warmup, args.repeat, args.seqlen)
            print(
                f"{name:17s} {row['shape']:28s} reference {row['reference_ms']:9.1f} ms  "
                f"chunked {row['chunked_ms']:8.1f} ms  x{row['speedup']:.1f}",
                flush=True,
            )
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    extra = {
        "config": {
            k: v for k, v in vars(args).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
        },
        "timing": "forward + backward (autograd.grad of every input), median of `repeat` calls; ms",
    }
    path = save_results("ops-cpu", rows, extra=extra, out_dir=args.out_dir)
    print()
    print(format_table(rows, COLUMNS))
    print(f"\nsaved {path}")
    return 0
