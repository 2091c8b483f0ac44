"""``mixlab generate RUN_OR_MODEL_DIR --prompt "..."``: stream a continuation as it is produced.

The directory is a finished run (its export), a stopped run (its newest checkpoint), or any model
directory ``mixlab.from_pretrained`` reads (mixlab, mamba_ssm, Hugging Face Mamba/Mamba2, fla).
The tokenizer is the run's (``mixlab_tokenizer.json`` / ``config.yaml``) or the directory's
``tokenizer.json``; ``--tokenizer`` names one for directories that have none.
"""

from __future__ import annotations

import argparse
import sys
import time

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_OR_MODEL_DIR", help="run directory or model directory")
    parser.add_argument("--prompt", default=None, help="prompt text (default: empty, i.e. start a new document)")
    parser.add_argument("--prompt-file", default=None, help="read the prompt from this file instead")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off; default 0.95)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling draws")
    parser.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec when the directory names none")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph")
    parser.add_argument("--no-prompt-echo", action="store_true", help="print only the generated text")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..generate import TextStreamer, generate
    from ..models.hub import from_pretrained, load_tokenizer_for

    if args.prompt is not None and args.prompt_file is not None:
        print("mixlab generate: give --prompt or --prompt-file, not both", file=sys.stderr)
        return 2
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(
                f"mixlab generate: --device {args.device} but CUDA is not available; use --device cpu", file=sys.stderr
            )
            return 2
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer_for(args.path)
        model = from_pretrained(args.path, device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"mixlab generate: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(
            f"mixlab generate: {args.path} names no tokenizer (no tokenizer.json, mixlab_tokenizer.json or "
            "config.yaml); pass --tokenizer PATH (a tokenizer.json, .model, .tiktoken, or 'byte')",
            file=sys.stderr,
        )
        return 2
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        print(
            f"mixlab generate: the tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}; "
            "they do not belong together (pass the model's tokenizer with --tokenizer)",
            file=sys.stderr,
        )
        return 2
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a new document: EOS separates documents
    eos = None if args.no_eos else tokenizer.eos_id
    if not args.no_prompt_echo:
        sys.stdout.write(prompt)
        sys.stdout.flush()
    streamer = TextStreamer(tokenizer, stop_ids=[] if eos is None else [eos])
    t0 = time.perf_counter()
    try:
        out = generate(
            model,
            [ids],
            args.max_new_tokens,
            temperature=0.0 if args.greedy else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=eos,
            streamer=streamer,
            seed=args.seed,
            cuda_graph=args.cuda_graph,
        )
    except ValueError as e:
        print(f"\nmixlab generate: {e}", file=sys.stderr)
        return 2
    n = len(out[0]) - len(ids)
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s, prompt {len(ids)} tokens]", file=sys.stderr)
    return 0
