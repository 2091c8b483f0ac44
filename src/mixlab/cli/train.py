"""``mixlab train [-c FILE] [key=value ...]``: train a model (default: gated_deltanet-tiny on the
embedded stdlib corpus with the byte tokenizer), with resumable checkpoints and metrics."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

EPILOG = """\
overrides use Hydra's syntax, e.g.
  mixlab train model=mamba2-125m data.seq_len=2048 train.batch_size=16 train.lr=3e-4 \\
               train.max_steps=1000 train.save_every=100 run.dir=runs/x train.resume=auto
sections: model (or model=<preset>), run, data, train, parallel, log; `mixlab models` lists presets.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("-c", "--config", default=None, help="YAML config file (overrides apply on top)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mixlab.config import ConfigError
    from mixlab.configio import dump_config, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mixlab train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0

    from mixlab.train import DistributedError
    from mixlab.train.checkpoint import CheckpointError
    from mixlab.train.loop import train

    try:
        result = train(cfg)
    except DistributedError as e:
        if os.environ.get("MIXLAB_DEBUG"):
            raise
        print(f"mixlab train: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        if os.environ.get("MIXLAB_DEBUG"):
            raise
        print(f"mixlab train: error: {e}  (MIXLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    if result.rank == 0:
        print(summary(result))
    if result.status == "diverged":
        print(f"mixlab train: {result.message}", file=sys.stderr)
        return 1
    return 0 if result.status == "completed" else 130  # preempted/interrupted: Slurm examples requeue on 130


def summary(result) -> str:
    """The closing lines: what happened, where the run is, and how to resume or generate from it."""
    from mixlab.train.loop import format_duration

    run_dir = shlex.quote(str(result.run_dir))
    steps = sorted(result.losses)
    lines = [""]
    head = f"{result.status}: step {result.step}/{result.config.train.max_steps} in {format_duration(result.elapsed_s)}"
    if steps:
        head += f"; train loss {result.losses[steps[0]]:.3f} (step {steps[0]}) -> {result.losses[steps[-1]]:.3f}"
    if result.val_loss is not None:
        import math

        head += f"; val loss {result.val_loss:.3f} (ppl {math.exp(min(result.val_loss, 50)):.2f})"
    if result.bad_steps:
        head += f"; {result.bad_steps} skipped non-finite step(s)"
    lines.append(head)
    lines.append(f"run directory: {result.run_dir}")
    if result.checkpoint is not None:
        lines.append(f"last checkpoint: {result.checkpoint}")
    if result.exported is not None:
        lines.append(f"exported model: {result.run_dir}/config.json + model.safetensors")
    lines.append(f"resume:   mixlab train -c {run_dir}/config.yaml train.resume=auto  (raise train.max_steps to go on)")
    lines.append(f"generate: mixlab generate {run_dir} --prompt 'def '")
    lines.append(f"plot:     mixlab plot {run_dir} -o {run_dir}/curves.png")
    return "\n".join(lines)
