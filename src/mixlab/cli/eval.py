"""``mixlab eval RUN_OR_MODEL_DIR --tasks ppl,mqar,niah,harness:TASKS``: evaluate a run or model.

Results are printed and merged into ``eval.json`` in the directory (``--out`` elsewhere), where
``mixlab compare`` reports pick them up.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
tasks:
  ppl        perplexity + bits per byte on the run's held-out text (or --text), in windows of the
             training length (--ppl-mode state: carried recurrent state / KV cache), and the loss by
             position up to --factor x the training length
  length     the length-extrapolation curve alone
  mqar       multi-query associative recall (the run's own setting, or Zoology's sweep)
  niah       S-NIAH-1/2/3 needles at --niah-lengths x --niah-depths
  synthetic  accuracy of a task=mqar / selective_copying run on held-out data of its own task
  harness:A,B  lm-evaluation-harness tasks (pip install lm-eval), offline from the local cache
examples:
  mixlab eval runs/gdn --tasks ppl
  mixlab eval runs/mqar-gdn --tasks mqar
  mixlab eval runs/gdn --tasks niah --niah-lengths 1024,2048 --niah-depths 0,50,100
  mixlab eval runs/gdn --tasks harness:lambada_openai,hellaswag --harness-limit 100
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _pairs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            a, b = item.lower().split("x")
            out.append((int(a), int(b)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected SEQ_LENxKV_PAIRS, e.g. 256x16") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("path", metavar="RUN_OR_MODEL_DIR", help="run directory or model directory")
    parser.add_argument(
        "--tasks", required=True, help="comma-separated: ppl, length, mqar, niah, synthetic, harness:TASKS"
    )
    parser.add_argument("--out", default=None, help="results JSON (default: RUN_OR_MODEL_DIR/eval.json)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec when the directory names none")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="auto: bf16 on CUDA")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (ppl, harness)")
    g = parser.add_argument_group("ppl / length")
    g.add_argument("--text", default=None, help="held-out text files / glob / directory instead of the run's split")
    g.add_argument("--ppl-mode", choices=("window", "state"), default="window", help="default window")
    g.add_argument("--context", type=int, default=None, help="window (and harness context) length; default train len")
    g.add_argument("--stride", type=int, default=None, help="window stride (default: the context, disjoint windows)")
    g.add_argument("--chunk", type=int, default=1024, help="tokens per forward in state mode")
    g.add_argument("--max-tokens", type=int, default=200_000, help="held-out tokens to score at most")
    g.add_argument("--train-len", type=int, default=None, help="training length (default: the run's data.seq_len)")
    g.add_argument("--factor", type=int, default=4, help="length curve up to FACTOR x the training length")
    g = parser.add_argument_group("mqar")
    g.add_argument("--mqar-configs", type=_pairs, default=None, help="e.g. 64x4,128x8,256x16,512x64")
    g.add_argument("--mqar-examples", type=int, default=1000, help="test sequences per config (and for synthetic)")
    g = parser.add_argument_group("niah")
    g.add_argument("--niah-variants", default=None, help="niah_1,niah_2,niah_3 (default all)")
    g.add_argument("--niah-lengths", type=_ints, default=None, help="tokens, default 1024,2048,4096,8192,16384")
    g.add_argument("--niah-depths", type=_floats, default=None, help="percent, default 0,25,50,75,100")
    g.add_argument("--niah-samples", type=int, default=4, help="prompts per (length, depth)")
    g.add_argument("--haystack", default=None, help="essay text file (default: stdlib module docstrings)")
    g = parser.add_argument_group("harness")
    g.add_argument("--harness-include", default=None, help="directory of extra lm-eval task YAMLs")
    g.add_argument("--harness-limit", type=float, default=None, help="examples per task (testing)")
    g.add_argument("--num-fewshot", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mixlab.eval.api import evaluate

    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"mixlab eval: --device {device} but CUDA is not available; use --device cpu", file=sys.stderr)
            return 2
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    out = args.out or (str(Path(args.path) / "eval.json") if Path(args.path).is_dir() else None)
    limit = args.harness_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        evaluate(
            args.path,
            args.tasks,
            tokenizer=args.tokenizer,
            device=device,
            dtype=getattr(torch, dtype_name),
            out=out,
            text=args.text,
            train_len=args.train_len,
            ppl_mode=args.ppl_mode,
            context=args.context,
            stride=args.stride,
            chunk=args.chunk,
            max_tokens=args.max_tokens,
            factor=args.factor,
            batch_size=args.batch_size,
            mqar_configs=args.mqar_configs,
            mqar_examples=args.mqar_examples,
            niah_variants=args.niah_variants.split(",") if args.niah_variants else None,
            niah_lengths=args.niah_lengths,
            niah_depths=args.niah_depths,
            niah_samples=args.niah_samples,
            haystack=args.haystack,
            harness_include=args.harness_include,
            harness_limit=limit,
            num_fewshot=args.num_fewshot,
        )
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"mixlab eval: {e}", file=sys.stderr)
        return 2
    if out:
        print(f"results: {out}")
    return 0
