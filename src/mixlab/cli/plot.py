"""``mixlab plot RUN_DIR... -o out.png``: loss and throughput curves of one or more runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    parser.add_argument("-o", "--out", default="curves.png", help="output PNG (default curves.png)")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N logged points")
    parser.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_runs(args.runs, args.out, smooth=args.smooth, x=args.x)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"mixlab plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def _smooth(values: list[float], n: int) -> list[float]:
    if n <= 1:
        return values
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_runs(runs: list[str], out: str | Path, smooth: int = 1, x: str = "step") -> Path:
    """Draw train loss (lines), val loss (markers) and tokens/s of each run into one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib (or 'mixlab[plot]')") from None
    from mixlab.train.metrics import read_metrics

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_dir in runs:
        rows = read_metrics(run_dir)
        if not rows:
            raise FileNotFoundError(f"{run_dir} has no metrics.jsonl rows")
        label = Path(run_dir).name
        train = [r for r in rows if r.get("loss") is not None and "tokens_per_s" in r]
        val = [r for r in rows if r.get("val_loss") is not None]
        key = "tokens" if x == "tokens" else "step"
        xs = [r.get(key, r["step"]) for r in train]
        (line,) = ax_loss.plot(xs, _smooth([r.get("loss_avg", r["loss"]) for r in train], smooth), label=label)
        if val:
            steps_to_x = {r["step"]: r.get(key, r["step"]) for r in train}
            ax_loss.plot(
                [steps_to_x.get(r["step"], r["step"]) for r in val],
                [r["val_loss"] for r in val],
                "o--",
                color=line.get_color(),
                label=f"{label} (val)",
            )
        ax_tps.plot(xs, _smooth([r["tokens_per_s"] for r in train], smooth), label=label, color=line.get_color())
    ax_loss.set_xlabel(x)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_tps.set_xlabel(x)
    ax_tps.set_ylabel("tokens/s")
    ax_tps.set_title("throughput")
    ax_tps.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
