"""``mixlab demo``: build every architecture at tiny size and check that decoding reproduces the forward pass.

For each architecture: build ``<arch>-tiny`` (meta device, then materialised and initialised),
print its parameter count, run a full forward over random tokens, then the same tokens as a
prefill followed by one-token decode steps through the model's cache, and compare the logits
(max |difference| / max |logit|). Exits 1 if any architecture fails.
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models.presets import ARCHS

    parser.add_argument(
        "--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS), metavar="ARCH", help="architectures to check"
    )
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--prefill", type=int, default=12, help="tokens fed at once before decoding (default 12)")
    parser.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps")
    parser.add_argument("--backend", default="auto", help="op backend: auto | reference | chunked | triton")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="max relative error (default 1e-5 on CPU, 2e-3 elsewhere)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import build_model, get_preset

    if not 0 <= args.prefill <= args.seq_len or args.seq_len < 1:
        print(f"mixlab demo: need 0 <= --prefill ({args.prefill}) <= --seq-len ({args.seq_len}) and --seq-len >= 1")
        return 2
    device = torch.device(args.device)
    tol = args.tolerance if args.tolerance is not None else (1e-5 if device.type == "cpu" else 2e-3)
    print(
        f"mixlab demo: tiny models on {device}, float32, batch {args.batch}, {args.seq_len} tokens "
        f"= prefill {args.prefill} + {args.seq_len - args.prefill} decode steps; pass if relative error < {tol:g}\n"
    )
    header = f"{'model':<22} {'pattern':<8} {'params':>11} {'rel. error':>11} {'time':>7}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for arch in args.archs:
        name = f"{arch}-tiny"
        cfg = get_preset(name)
        cfg.backend = args.backend
        t0 = time.perf_counter()
        try:
            torch.manual_seed(args.seed)
            model = build_model(cfg, device=device)
            model.eval()
            g = torch.Generator().manual_seed(args.seed)
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
            with torch.no_grad():
                full = model(ids)
                cache = model.init_cache(args.batch, args.seq_len)
                parts = [model(ids[:, : args.prefill], cache=cache)] if args.prefill else []
                parts += [model(ids[:, t : t + 1], cache=cache) for t in range(args.prefill, args.seq_len)]
                dec = torch.cat(parts, dim=1)
            err = ((dec - full).abs().max() / full.abs().max()).item()
            ok = err < tol  # NaN fails too
            params = f"{model.num_parameters():,}"
            err_s = f"{err:.2e}"
        except Exception as e:  # report and go on to the next architecture
            ok, params, err_s = False, "-", "-"
            print(f"{name}: {type(e).__name__}: {e}")
        failures += not ok
        dt = time.perf_counter() - t0
        print(f"{name:<22} {cfg.pattern:<8} {params:>11} {err_s:>11} {dt:>6.1f}s  {'OK' if ok else 'FAIL'}")
    print()
    if failures:
        print(f"{failures} of {len(args.archs)} architectures FAILED")
        return 1
    print(f"all {len(args.archs)} architectures OK: decoding reproduces the forward pass")
    return 0
