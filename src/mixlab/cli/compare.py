"""``mixlab compare [-c EXPERIMENT.yaml] [--vary KEY=V1,V2 ...] [key=value ...]``: train a grid of
runs that differ only in what is varied, then write a Markdown + HTML report (``mixlab.compare``)."""

from __future__ import annotations

import argparse
import shlex
import sys

EPILOG = """\
examples:
  mixlab compare --vary model=transformer-tiny,mamba-tiny --vary train.lr=1e-3,1e-4 train.max_steps=200
  mixlab compare -c configs/experiments/architectures.yaml             # scaled down (CPU / one GPU)
  mixlab compare -c configs/experiments/architectures.yaml --full      # the full-size experiment
  mixlab compare -c configs/experiments/lr_sweep.yaml --vary train.lr=3e-3,1e-3 --out runs/lr
the grid is every combination of the --vary values; `gpus` is a pseudo-key (--vary gpus=1,4 runs the
multi-GPU points through torchrun with parallel.strategy=ddp). Finished runs under OUT are reused.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("-c", "--config", default=None, help="experiment YAML (name, vary, base, eval, full)")
    parser.add_argument("--full", action="store_true", help="apply the experiment file's full-size section")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a varied key (repeatable)")
    parser.add_argument("--out", default=None, help="output directory (default runs/compare-<name>)")
    parser.add_argument("--eval", default=None, help="auto (ppl for text, mqar for task=mqar) | none | ppl,mqar,...")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--rerun", action="store_true", help="train finished runs again")
    parser.add_argument("--dry-run", action="store_true", help="print the runs' configurations and stop")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="base overrides for every run")


def run(args: argparse.Namespace) -> int:
    from mixlab.compare import compare, load_experiment, parse_vary
    from mixlab.config import ConfigError

    try:
        exp = (
            load_experiment(args.config, full=args.full)
            if args.config
            else {"name": "grid", "description": "", "vary": {}, "base": [], "eval": "auto"}
        )
        if args.full and not args.config:
            raise ValueError("--full needs an experiment file (-c)")
        vary = dict(exp["vary"])
        vary.update(parse_vary(args.vary))
        if not vary:
            raise ValueError("nothing to compare: give --vary KEY=V1,V2 (or an experiment file with vary:)")
        parts = (["-c", args.config] if args.config else []) + (["--full"] if args.full else [])
        parts += [x for v in args.vary for x in ("--vary", v)] + (["--out", args.out] if args.out else [])
        parts += (["--eval", args.eval] if args.eval else []) + list(args.overrides)
        command = "mixlab compare " + shlex.join(parts)
        result = compare(
            vary,
            [*exp["base"], *args.overrides],
            args.out or f"runs/compare-{exp['name']}{'-full' if args.full else ''}",
            eval_spec=args.eval or exp["eval"],
            title=args.title or f"mixlab compare: {exp['name']}",
            description=exp["description"],
            rerun=args.rerun,
            dry_run=args.dry_run,
            command=command,
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"mixlab compare: {e}", file=sys.stderr)
        return 2
    failed = [r["name"] for r in result["runs"] if not str(r["status"]).startswith("completed")]
    if failed:
        print(f"mixlab compare: {len(failed)} run(s) did not complete: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
