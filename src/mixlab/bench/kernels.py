"""``mixlab bench kernels``: the Triton delta-rule and SSD kernels against their peers on one GPU.

At 65,536 tokens per call (batch = tokens / T) and the shapes of ANCHORS.md §1 — Gated DeltaNet and
DeltaNet H16 K128 V128, Mamba2 SSD H64 P64 N128 G1 (chunk 256 for mamba_ssm), causal attention H16
D128 (torch SDPA) — it times forward and forward+backward (median of ``triton.testing.do_bench``),
and reports TFLOP/s and the share of the floor ``max(FLOPs / matmul peak, bytes / copy bandwidth)``
with both ceilings measured on the card in the same run. Peers run side by side when importable:
fla (``chunk_gated_delta_rule``, ``chunk_delta_rule``), mamba_ssm (``mamba_chunk_scan_combined``).

``--shape gdn-1.3b`` times the delta-rule ops (gdn, dn) at the 1.3b Gated DeltaNet layer's shape instead:
H6 K256 V512 at 32,768 tokens per call (B = 8 at T = 4096), the shape its training step runs the kernels at.

``--check`` first compares the kernels at full head shapes with float64 references (relative error
of outputs, final states and every gradient; bf16 ≤ 1e-2, fp32 ≤ 1e-3). ``--profile`` prints the
per-kernel time split of one forward+backward. ``--variants`` times launch-table overrides.

FLOPs count the chunked algorithm's matrix products at chunk 64 (forward; forward+backward = 3×
forward); bytes count each input read once and each output written once.
"""

from __future__ import annotations

import argparse
import json
import math
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .common import environment, format_table, save_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = {
    "gdn": {"H": 16, "K": 128, "V": 128},
    "dn": {"H": 16, "K": 128, "V": 128},
    "ssd": {"H": 64, "P": 64, "N": 128, "G": 1, "chunk": 256},
    "sdpa": {"H": 16, "D": 128},
}
#: ``--shape`` presets: SHAPES entries replaced, and the tokens per call unless ``--tokens`` is given.
SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "bench": {"shapes": {}, "tokens": 65536},
    "gdn-1.3b": {
        "shapes": {"gdn": {"H": 6, "K": 256, "V": 512}, "dn": {"H": 6, "K": 256, "V": 512}},
        "tokens": 32768,
    },
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default="gdn,dn,ssd,sdpa", help="comma list of gdn, dn, ssd, sdpa")
    parser.add_argument("--seqlens", default="2048,4096,8192,16384,32768", help="comma list of T")
    parser.add_argument(
        "--shape",
        default="bench",
        choices=sorted(SHAPE_PRESETS),
        help="bench: ANCHORS.md shapes at 65,536 tokens; gdn-1.3b: gdn/dn at H6 K256 V512, 32,768 tokens per call",
    )
    parser.add_argument(
        "--tokens", type=int, default=None, help="tokens per call (batch = tokens / T); default from --shape"
    )
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    parser.add_argument("--check", action="store_true", help="first check the kernels against float64 references")
    parser.add_argument("--no-peers", action="store_true", help="skip fla / mamba_ssm even if importable")
    parser.add_argument("--warmup-ms", type=float, default=50.0)
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--profile", default="", help="comma list of T: per-kernel split of one fwd+bwd")
    parser.add_argument("--profile-ops", default="gdn", help="comma list of ops to profile (gdn, dn, ssd)")
    parser.add_argument(
        "--variants",
        default="",
        help='JSON list of launch-table overrides, e.g. \'[{"fwd_h": {"num_warps": 8}}]\', timed at --variant-seqlens',
    )
    parser.add_argument("--variant-seqlens", default="2048,32768", help="comma list of T timed for each variant")
    parser.add_argument(
        "--check-seqlen", type=int, default=4096, help="T of the --check / --variant-check inputs (B = 2)"
    )
    parser.add_argument("--variant-ops", default="gdn,dn,ssd", help="comma list of ops timed for each --variants entry")
    parser.add_argument(
        "--variant-profile",
        default="",
        help="comma list of T: per-kernel split of one fwd+bwd of each --variant-ops op for each --variants entry",
    )
    parser.add_argument(
        "--variant-check",
        action="store_true",
        help="also run the bf16 accuracy checks (of the --variant-ops among gdn, dn, ssd) for each --variants entry",
    )


# --------------------------------------------------------------------------------------------------
# FLOPs and bytes
# --------------------------------------------------------------------------------------------------


def delta_flops(tokens: int, H: int, K: int, V: int, C: int = 64) -> float:
    """Forward FLOPs of the chunked delta rule: per chunk and head C²(6K+4V) + 6CKV."""
    return tokens / C * H * (C * C * (6 * K + 4 * V) + 6 * C * K * V)


def ssd_flops(tokens: int, H: int, P: int, N: int, G: int, C: int = 64) -> float:
    """Forward FLOPs of chunked SSD: C·Bᵀ per group, intra-chunk output, state update and inter-chunk output."""
    return tokens / C * (G * 2 * C * C * N + H * (2 * C * C * P + 4 * C * N * P))


def sdpa_flops(tokens: int, T: int, H: int, D: int) -> float:
    """Forward FLOPs of causal attention (half of 4·T²·D per head and sequence)."""
    return (tokens / T) * H * 2 * T * T * D


def _bytes(elems_in: float, elems_out: float, esize: int) -> float:
    return (elems_in + elems_out) * esize


def op_bytes(op: str, tokens: int, esize: int, mode: str) -> float:
    """Fewest bytes: inputs read once, outputs written once (backward: inputs + dO read, grads written)."""
    s = SHAPES[op]
    if op in ("gdn", "dn"):
        H, K, V = s["H"], s["K"], s["V"]
        ins = tokens * H * (2 * K + V) * esize + tokens * H * 4 * (2 if op == "gdn" else 1)
        out = tokens * H * V * esize
    elif op == "ssd":
        H, P, N, G = s["H"], s["P"], s["N"], s["G"]
        ins = tokens * (H * P + 2 * G * N) * esize + tokens * H * 4
        out = tokens * H * P * esize
    else:
        H, D = s["H"], s["D"]
        ins = tokens * H * 3 * D * esize
        out = tokens * H * D * esize
    fwd = ins + out
    return fwd if mode == "fwd" else fwd + (ins + out) + ins  # backward reads inputs and dO, writes grads


def op_flops(op: str, tokens: int, T: int, mode: str) -> float:
    s = SHAPES[op]
    if op in ("gdn", "dn"):
        f = delta_flops(tokens, s["H"], s["K"], s["V"])
        return f if mode == "fwd" else 3 * f
    if op == "ssd":
        f = ssd_flops(tokens, s["H"], s["P"], s["N"], s["G"])
        return f if mode == "fwd" else 3 * f
    f = sdpa_flops(tokens, T, s["H"], s["D"])
    return f if mode == "fwd" else 3.5 * f


# --------------------------------------------------------------------------------------------------
# inputs and callables
# --------------------------------------------------------------------------------------------------


def _delta_inputs(B, T, H, K, V, gated, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q = rn(B, T, H, K).to(dtype)
    k = F.normalize(rn(B, T, H, K), dim=-1).to(dtype)
    v = rn(B, T, H, V).to(dtype)
    beta = torch.sigmoid(rn(B, T, H)).to(dtype)
    g = (F.logsigmoid(rn(B, T, H)) / 8).float() if gated else None
    return q, k, v, beta, g


def _ssd_inputs(B, T, dtype, device, seed=0):
    s = SHAPES["ssd"]
    H, P, N, G = s["H"], s["P"], s["N"], s["G"]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    x = rn(B, T, H, P).to(dtype)
    dt = (rn(B, T, H) - 2.0).float()
    A = -torch.exp(rn(H) * 0.5).float()
    Bm = rn(B, T, G, N).to(dtype)
    Cm = rn(B, T, G, N).to(dtype)
    dt_bias = (rn(H) * 0.1).float()
    return x, dt, A, Bm, Cm, dt_bias


def _fwd_bwd(fn: Callable[[], Any], leaves: list[torch.Tensor]) -> Callable[[], Any]:
    """A callable running ``fn`` and the backward of its first output against a fixed random gradient."""
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)

    def run():
        o = fn()
        o = o[0] if isinstance(o, tuple) else o
        return torch.autograd.grad(o, leaves, grad)

    return run


def _impls(op: str, B: int, T: int, dtype, device, peers: bool) -> dict[str, tuple[Callable[[], Any], list]]:
    """name -> (forward callable, leaves) for ours and every importable peer."""
    out: dict[str, tuple[Callable[[], Any], list]] = {}
    if op in ("gdn", "dn"):
        s = SHAPES[op]
        q, k, v, beta, g = _delta_inputs(B, T, s["H"], s["K"], s["V"], op == "gdn", dtype, device)
        leaves = [x.requires_grad_() for x in (q, k, v, beta, g) if x is not None]
        from mixlab.ops.delta_rule.triton import delta_rule_triton

        out["mixlab"] = (lambda: delta_rule_triton(q, k, v, beta, g), leaves)
        if peers:
            try:
                if op == "gdn":
                    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

                    out["fla"] = (lambda: chunk_gated_delta_rule(q, k, v, g, beta), leaves)
                else:
                    from fla.ops.delta_rule import chunk_delta_rule

                    out["fla"] = (lambda: chunk_delta_rule(q, k, v, beta), leaves)
            except Exception:
                pass
    elif op == "ssd":
        x, dt, A, Bm, Cm, dt_bias = _ssd_inputs(B, T, dtype, device)
        leaves = [t.requires_grad_() for t in (x, dt, A, Bm, Cm, dt_bias)]
        from mixlab.ops.ssd.triton import ssd_triton

        out["mixlab"] = (lambda: ssd_triton(x, dt, A, Bm, Cm, dt_bias=dt_bias, dt_softplus=True), leaves)
        if peers:
            try:
                from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

                cs = SHAPES["ssd"]["chunk"]
                out["mamba_ssm"] = (
                    lambda: mamba_chunk_scan_combined(x, dt, A, Bm, Cm, cs, dt_bias=dt_bias, dt_softplus=True),
                    leaves,
                )
            except Exception:
                pass
    else:
        s = SHAPES["sdpa"]
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn(B, s["H"], T, s["D"], device=device, generator=gen).to(dtype).requires_grad_() for _ in range(3)
        )
        out["torch_sdpa"] = (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
    return out


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def _bench(fn: Callable[[], Any], warmup: float, rep: float) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def measure_ceilings(device) -> dict[str, float]:
    """bf16 matmul TFLOP/s (8192³, random data) and device copy TB/s (bytes read + written)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b, 25, 100)
    tflops = 2 * 8192**3 / ms / 1e9
    x = torch.randn(256 * 2**20, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms_c = _bench(lambda: y.copy_(x), 25, 100)
    tbs = 2 * x.numel() * 4 / ms_c / 1e9
    return {"matmul_tflops": tflops, "copy_tbs": tbs}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _ssd_reference_f64(x, dt, A, B, C, dt_bias, h0, chunk=64):
    """Float64 chunked SSD (dt_softplus, no D/z): the fallback oracle when ``ssd_chunked`` is absent."""
    T, H, G = x.shape[1], x.shape[2], B.shape[2]
    dt = F.softplus(dt + dt_bias)
    Bh, Ch = B.repeat_interleave(H // G, 2), C.repeat_interleave(H // G, 2)
    h = h0
    ys = []
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        Gc = (dt[:, sl] * A).cumsum(1).transpose(1, 2)  # [b, H, L]
        L = Gc.shape[-1]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        seg = torch.where(mask, Gc[..., :, None] - Gc[..., None, :], -math.inf).exp()
        xs = dt[:, sl, :, None] * x[:, sl]  # [b, L, H, P]
        cb = torch.einsum("bihn,bjhn->bhij", Ch[:, sl], Bh[:, sl]) * seg
        y = torch.einsum("bhij,bjhp->bihp", cb, xs)
        y = y + torch.einsum("bihn,bhpn->bihp", Ch[:, sl] * Gc.exp().transpose(1, 2)[..., None], h)
        decay = (Gc[..., -1:] - Gc).exp().transpose(1, 2)[..., None]  # [b, L, H, 1]
        h = Gc[..., -1].exp()[..., None, None] * h + torch.einsum("bjhn,bjhp->bhpn", Bh[:, sl] * decay, xs)
        ys.append(y)
    return torch.cat(ys, 1), h


def run_checks(
    device,
    tol: dict[str, float],
    T: int = 4096,
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
    ssd: bool = True,
    delta_ops: tuple[str, ...] = ("gdn", "dn"),
) -> list[dict[str, Any]]:
    """Kernels vs float64 references at full head shapes: relative error of every output and gradient."""
    from mixlab.ops.delta_rule.chunked import delta_rule_chunked
    from mixlab.ops.delta_rule.triton import delta_rule_triton
    from mixlab.ops.ssd.triton import ssd_triton

    rows = []
    gen0 = torch.Generator(device=device).manual_seed(3)  # initial states: the same for every call (variants)
    for name in dtypes:
        dtype = DTYPES[name]
        for op in delta_ops:
            s = SHAPES[op]
            B = 2
            q, k, v, beta, g = _delta_inputs(B, T, s["H"], s["K"], s["V"], op == "gdn", dtype, device, seed=1)
            h0 = torch.randn(B, s["H"], s["K"], s["V"], device=device, generator=gen0) * 0.1
            ins = [x for x in (q, k, v, beta, g, h0) if x is not None]
            leaves = [x.clone().requires_grad_() for x in ins]
            ref_leaves = [x.double().clone().requires_grad_() for x in ins]

            def call(f, ls, gated=op == "gdn", scale=s["K"] ** -0.5):
                gg = ls[4] if gated else None
                return f(*ls[:4], gg, scale=scale, initial_state=ls[-1], output_final_state=True)

            o, ht = call(delta_rule_triton, leaves)
            ro, rht = call(delta_rule_chunked, ref_leaves)
            do, dht = torch.randn_like(ro), torch.randn_like(rht)
            grads = torch.autograd.grad((o.double() * do).sum() + (ht.double() * dht).sum(), leaves)
            rgrads = torch.autograd.grad((ro * do).sum() + (rht * dht).sum(), ref_leaves)
            names = ["q", "k", "v", "beta"] + (["g"] if op == "gdn" else []) + ["h0"]
            errs = {"o": _rel(o, ro), "ht": _rel(ht, rht)}
            errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(names, grads, rgrads)})
            worst = max(errs.values())
            rows.append({"op": op, "dtype": name, "shape": f"B{B} T{T} H{s['H']} K{s['K']} V{s['V']}", "max_rel_err": worst,
                         "pass": worst <= tol[name], "errors": errs})  # fmt: skip
        if not ssd:
            continue
        B = 1
        x, dt, A, Bm, Cm, dt_bias = _ssd_inputs(B, T, dtype, device, seed=2)
        s = SHAPES["ssd"]
        h0 = torch.randn(B, s["H"], s["P"], s["N"], device=device) * 0.1
        ins = [x, dt, A, Bm, Cm, dt_bias, h0]
        leaves = [t.clone().requires_grad_() for t in ins]
        ref_leaves = [t.double().clone().requires_grad_() for t in ins]
        y, ht = ssd_triton(
            *leaves[:5], dt_bias=leaves[5], dt_softplus=True, initial_state=leaves[6], output_final_state=True
        )
        try:
            from mixlab.ops.ssd.chunked import ssd_chunked

            ry, rht = ssd_chunked(*ref_leaves[:5], dt_bias=ref_leaves[5], dt_softplus=True, chunk_size=64,
                                  initial_state=ref_leaves[6], output_final_state=True)  # fmt: skip
            oracle = "ssd_chunked"
        except ImportError:
            ry, rht = _ssd_reference_f64(*ref_leaves[:5], ref_leaves[5], ref_leaves[6])
            oracle = "bench fallback"
        dy, dht = torch.randn_like(ry), torch.randn_like(rht)
        grads = torch.autograd.grad((y.double() * dy).sum() + (ht.double() * dht).sum(), leaves)
        rgrads = torch.autograd.grad((ry * dy).sum() + (rht * dht).sum(), ref_leaves)
        errs = {"y": _rel(y, ry), "ht": _rel(ht, rht)}
        errs.update(
            {f"d{n}": _rel(a, b) for n, a, b in zip(["x", "dt", "A", "B", "C", "dt_bias", "h0"], grads, rgrads)}
        )
        worst = max(errs.values())
        rows.append({"op": "ssd", "dtype": name, "shape": f"B{B} T{T} ({oracle})", "max_rel_err": worst,
                     "pass": worst <= tol[name], "errors": errs})  # fmt: skip
    return rows


def profile_split(op: str, T: int, tokens: int, dtype, device) -> list[dict[str, Any]]:
    """Per-kernel CUDA time of one forward+backward of ``op`` (ours), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn, leaves = _impls(op, tokens // T, T, dtype, device, peers=False)["mixlab"]
    step = _fwd_bwd(fn, leaves)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append({"op": op, "T": T, "kernel": ev.key[:60], "calls": ev.count, "ms": t / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:14]


def apply_shape(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Install the ``--shape`` preset into SHAPES and fill ``args.tokens``; returns the SHAPES to restore."""
    saved = {k: dict(v) for k, v in SHAPES.items()}
    preset = SHAPE_PRESETS[args.shape]
    for op, s in preset["shapes"].items():
        SHAPES[op] = {**SHAPES[op], **s}
    if args.tokens is None:
        args.tokens = preset["tokens"]
    return saved


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("mixlab bench kernels needs a CUDA GPU (none found)")
        return 1
    saved = apply_shape(args)
    try:
        return _run(args)
    finally:
        SHAPES.clear()
        SHAPES.update(saved)


def _run(args: argparse.Namespace) -> int:
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    env = environment()
    ceil = measure_ceilings(device)
    print(f"{env.get('device')}  torch {env['torch']}  triton {env['triton']}  "
          f"matmul {ceil['matmul_tflops']:.0f} TFLOP/s  copy {ceil['copy_tbs']:.2f} TB/s", flush=True)  # fmt: skip
    extra: dict[str, Any] = {"ceilings": ceil, "shape": args.shape, "shapes": {k: dict(v) for k, v in SHAPES.items()},
                             "tokens": args.tokens, "dtype": args.dtype}  # fmt: skip

    if args.check:
        try:
            checks = run_checks(device, {"bf16": 1e-2, "fp32": 1e-3}, T=args.check_seqlen)
        except Exception:  # report and go on to the timings
            traceback.print_exc()
            checks = []
        extra["checks"] = checks
        print(format_table(checks, ["op", "dtype", "shape", "max_rel_err", "pass"]), flush=True)
        for c in checks:
            print(c["op"], c["dtype"], {k: f"{v:.1e}" for k, v in c["errors"].items()}, flush=True)

    rows: list[dict[str, Any]] = []
    modes = args.modes.split(",")
    for op in args.ops.split(","):
        for T in (int(t) for t in args.seqlens.split(",")):
            B = max(1, args.tokens // T)
            tokens = B * T
            try:
                impls = _impls(op, B, T, dtype, device, peers=not args.no_peers)
            except torch.OutOfMemoryError:
                continue
            for name, (fn, leaves) in impls.items():
                for mode in modes:
                    try:
                        call = fn if mode == "fwd" else _fwd_bwd(fn, leaves)
                        ms = _bench(call, args.warmup_ms, args.rep_ms)
                    except Exception as e:  # a peer failing must not stop the run
                        print(f"{op} T={T} {name} {mode}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    flops = op_flops(op, tokens, T, mode)
                    nbytes = op_bytes(op, tokens, esize, mode)
                    floor_ms = max(flops / (ceil["matmul_tflops"] * 1e9), nbytes / (ceil["copy_tbs"] * 1e9))
                    row = {"op": op, "impl": name, "T": T, "B": B, "mode": mode, "ms": ms,
                           "tflops": flops / ms / 1e9, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / ms}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del impls
            torch.cuda.empty_cache()

    path = save_results("kernels", rows, extra=extra, out_dir=args.out_dir)
    print(_summary(rows, args.dtype, args.tokens, path), flush=True)
    variant_rows: list[dict[str, Any]] = []
    if args.variants:
        from mixlab.ops._triton import chunk

        base = {k: dict(v) for k, v in chunk.CONFIG.items()}
        var_prof: list[dict[str, Any]] = []
        for i, var in enumerate(json.loads(args.variants)):
            for k, v in var.items():
                chunk.CONFIG[k] = {**base[k], **v}
            if args.variant_check:
                vops = args.variant_ops.split(",")
                ssd_check = "ssd" in vops  # SSD kernels have variants too (dqkwg_ssd)
                dops = tuple(op for op in ("gdn", "dn") if op in vops)
                for c in run_checks(device, {"bf16": 1e-2}, T=args.check_seqlen, dtypes=("bf16",), ssd=ssd_check,
                                    delta_ops=dops):  # fmt: skip
                    variant_rows.append({"variant": i, "op": c["op"], "T": "check", "fwd_ms": None, "fwdbwd_ms": None,
                                         "config": json.dumps(var), "max_rel_err": c["max_rel_err"],
                                         "errors": {k: f"{v:.1e}" for k, v in c["errors"].items()}})  # fmt: skip
                    print(i, c["op"], c["dtype"], {k: f"{v:.1e}" for k, v in c["errors"].items()}, flush=True)
            for T in (int(t) for t in args.variant_seqlens.split(",") if t):
                for op in args.variant_ops.split(","):
                    fn, leaves = _impls(op, args.tokens // T, T, dtype, device, peers=False)["mixlab"]
                    ms_f = _bench(fn, args.warmup_ms, args.rep_ms)
                    ms = _bench(_fwd_bwd(fn, leaves), args.warmup_ms, args.rep_ms)
                    variant_rows.append({"variant": i, "op": op, "T": T, "fwd_ms": ms_f, "fwdbwd_ms": ms,
                                         "config": json.dumps(var)})  # fmt: skip
            for T in (int(t) for t in args.variant_profile.split(",") if t):
                for op in args.variant_ops.split(","):
                    for r in profile_split(op, T, args.tokens, dtype, device):
                        var_prof.append({"variant": i, **r})
                        print(i, op, T, f"{r['kernel']:<40} {r['calls']:>3} {r['ms']:.3f}", flush=True)
            chunk.CONFIG.clear()
            chunk.CONFIG.update({k: dict(v) for k, v in base.items()})
        extra["variants"] = variant_rows
        if var_prof:
            extra["variant_profile"] = var_prof

    prof_rows: list[dict[str, Any]] = []
    for op in args.profile_ops.split(","):
        for T in (int(t) for t in args.profile.split(",") if t):
            prof_rows += profile_split(op, T, args.tokens, dtype, device)
    if prof_rows:
        extra["profile"] = prof_rows

    path = save_results("kernels", rows, extra=extra, out_dir=args.out_dir)
    if prof_rows:
        print(format_table(prof_rows, ["op", "T", "kernel", "calls", "ms"]))
    if variant_rows:
        print(format_table(variant_rows, ["variant", "op", "T", "fwd_ms", "fwdbwd_ms", "max_rel_err", "config"]))
    print(_summary(rows, args.dtype, args.tokens, path))
    return 0


def _summary(rows: list[dict[str, Any]], dtype: str, tokens: int, path) -> str:
    """One line per (op, impl, mode), one column per T: ``ms (% of floor)``."""
    seqs = sorted({r["T"] for r in rows})
    lines = []
    for key in sorted({(r["op"], r["impl"], r["mode"]) for r in rows}):
        line: dict[str, Any] = {"op": key[0], "impl": key[1], "mode": key[2]}
        for T in seqs:
            r = next((r for r in rows if (r["op"], r["impl"], r["mode"], r["T"]) == (*key, T)), None)
            line[f"T{T}"] = f"{r['ms']:.2f} ({r['pct_floor']:.0f}%)" if r else ""
        lines.append(line)
    head = f"ms (% of floor), {dtype}, {tokens} tokens per call; results: {path}\n"
    return head + format_table(lines, ["op", "impl", "mode", *[f"T{T}" for T in seqs]])
