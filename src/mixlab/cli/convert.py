"""``mixlab convert SRC DST [--to mixlab|mamba_ssm|hf]``: import a checkpoint directory, write it out.

SRC is any local directory ``mixlab.from_pretrained`` reads (mixlab export or run, mamba_ssm
``MambaLMHeadModel``, Hugging Face ``MambaForCausalLM`` / ``Mamba2ForCausalLM``, fla
``GatedDeltaNetForCausalLM`` / ``DeltaNetForCausalLM``); the format is detected. DST gets mixlab's
export (config.json + model.safetensors), mamba_ssm's layout (config.json + pytorch_model.bin) or
Hugging Face's Mamba/Mamba2 layout, plus SRC's tokenizer files.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory to read (format detected)")
    parser.add_argument("dst", metavar="DST", help="directory to write")
    parser.add_argument("--to", default="mixlab", choices=("mixlab", "mamba_ssm", "hf"), help="output format")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the written weights"
    )
    parser.add_argument("--force", action="store_true", help="write into DST even if it holds a config.json")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..models.convert import CheckpointMismatchError, UnsupportedCheckpointError
    from ..models.hub import copy_tokenizer, detect_format, from_pretrained, save_pretrained

    dst = Path(args.dst)
    if (dst / "config.json").exists() and not args.force:
        print(f"mixlab convert: {dst} already holds a model (config.json); pass --force to overwrite", file=sys.stderr)
        return 2
    try:
        fmt = detect_format(args.src)
        model = from_pretrained(args.src, dtype=getattr(torch, args.dtype))
        save_pretrained(model, dst, format=args.to)
    except (FileNotFoundError, UnsupportedCheckpointError, CheckpointMismatchError, ValueError) as e:
        print(f"mixlab convert: {e}", file=sys.stderr)
        return 2
    copied = copy_tokenizer(args.src, dst)
    cfg = model.config
    print(
        f"{args.src} ({fmt}) -> {dst} ({args.to}): {model.num_parameters():,} parameters, "
        f"{cfg.n_layers} layers {''.join(cfg.layer_types)}, d_model {cfg.d_model}, vocab {cfg.vocab_size}"
        + (f"; tokenizer files: {', '.join(copied)}" if copied else "; no tokenizer files found")
    )
    return 0
