"""``mixlab`` command line. Each subcommand lives in its own module of this package and exposes
``add_arguments(parser)`` and ``run(args) -> int``; the library below never parses command lines."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mixlab.cli.train", "train a model (default: gated_deltanet-tiny on the embedded corpus)"),
    "compare": ("mixlab.cli.compare", "train a grid of runs that differ in what is varied, then report"),
    "eval": ("mixlab.cli.eval", "evaluate a run or model directory: ppl, mqar, niah, harness:TASKS"),
    "generate": ("mixlab.cli.generate", "generate text from a run or model directory"),
    "convert": ("mixlab.cli.convert", "import/export checkpoints (mamba_ssm, Hugging Face, fla, mixlab)"),
    "data": ("mixlab.cli.data", "prepare token shards and train tokenizers"),
    "plot": ("mixlab.cli.plot", "plot loss and throughput curves of runs"),
    "models": ("mixlab.cli.models", "list the model presets with exact parameter counts"),
    "demo": ("mixlab.cli.demo", "build every architecture and check forward against decoding"),
    "bench": ("mixlab.cli.bench", "benchmarks: ops-cpu, kernels, train, decode"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixlab",
        description="Train, evaluate, benchmark and generate "
        "from attention / Mamba / Mamba2 / DeltaNet / Gated DeltaNet models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = _import_command(module)
        if mod is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod.add_arguments(p)
    return parser


def _import_command(module: str):
    """Import a subcommand module; None when that module is not part of this installation."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
