"""``mixlab data prepare|tokenizer``: tokenise a corpus into shards; train a BPE tokenizer."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "prepare",
        help="tokenise data.source into memory-mapped shards (reused by `mixlab train`)",
        description="Tokenise data.source with data.tokenizer into uint16/uint32 shards + manifest under "
        "data.cache_dir (default $MIXLAB_CACHE or ~/.cache/mixlab). Same config keys as `mixlab train`, e.g. "
        "`mixlab data prepare data.source='corpus/*.jsonl' data.text_field=content data.tokenizer=tok/`.",
    )
    p.add_argument("-c", "--config", default=None, help="YAML config file (its data section is used)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*)")
    t = sub.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer on data.source (needs `tokenizers`)",
        description="Train a byte-level BPE on the documents of data.source and write OUT/tokenizer.json; "
        "use it with data.tokenizer=OUT. Example: `mixlab data tokenizer -o tok/ --vocab-size 8192`.",
    )
    t.add_argument("-o", "--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including bytes and EOS")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge")
    t.add_argument("--max-docs", type=int, default=0, help="train on the first N documents only (0: all)")
    t.add_argument("-c", "--config", default=None, help="YAML config file (its data section is used)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*)")


def run(args: argparse.Namespace) -> int:
    from mixlab.config import ConfigError
    from mixlab.configio import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mixlab data: config error: {e}", file=sys.stderr)
        return 2
    try:
        if args.data_command == "prepare":
            return _prepare(cfg)
        return _tokenizer(cfg, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mixlab data: error: {e}", file=sys.stderr)
        return 2


def _prepare(cfg) -> int:
    from mixlab.data.shards import prepare_shards

    shards = prepare_shards(cfg.data)
    m = shards.manifest
    print(f"shards:    {shards.dir}")
    print(f"tokenizer: {m['tokenizer']}")
    print(f"dtype:     {m['dtype']}")
    print(
        f"train:     {shards.train_tokens:,} tokens, {m['train']['documents']:,} documents, {len(m['train']['files'])} file(s)"
    )
    print(
        f"val:       {shards.val_tokens:,} tokens, {m['val']['documents']:,} documents ({m['split']['method']} split)"
    )
    return 0


def _tokenizer(cfg, args: argparse.Namespace) -> int:
    import itertools
    import time

    from mixlab.data.corpus import iter_documents, resolve_sources
    from mixlab.data.tokenizer import train_bpe

    files = resolve_sources(cfg.data.sources, cfg.data.format)
    docs = iter_documents(files, cfg.data.text_field)
    if args.max_docs > 0:
        docs = itertools.islice(docs, args.max_docs)
    t0 = time.perf_counter()
    tok = train_bpe(docs, args.vocab_size, args.out, min_frequency=args.min_frequency)
    sample = "def main(argv=None):\n    return 0\n"
    n_bytes, n_tok = len(sample.encode()), len(tok.encode(sample))
    print(f"trained a BPE of {tok.vocab_size} tokens (EOS id {tok.eos_id}) in {time.perf_counter() - t0:.1f}s")
    print(f"written: {args.out}/tokenizer.json  (use it with data.tokenizer={args.out})")
    print(f"sample:  {n_bytes} bytes -> {n_tok} tokens")
    return 0
