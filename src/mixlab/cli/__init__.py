"""``mixlab`` command line. Each subcommand lives in its own module of this package and exposes
``add_arguments(parser)`` and ``run(args) -> int``; the library below never parses command lines."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
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
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
