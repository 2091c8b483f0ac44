"""Data: tokenizers, corpora, token shards and the resumable loader.

tok = load_tokenizer("byte")
shards = prepare_shards(DataConfig(source="stdlib", seq_len=256))   # tokenised once, then reused
loader = TrainLoader(shards.train, seq_len=256, batch_size=16, seed=0)
tokens = loader.batch(step)                                         # [16, 257] int64
"""

from mixlab.data.corpus import iter_documents, resolve_sources, stdlib_files
from mixlab.data.loader import TokenWindows, TrainLoader, eval_batches
from mixlab.data.shards import TokenShards, default_cache_dir, open_shards, prepare_shards
from mixlab.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    load_tokenizer_from_dir,
    save_tokenizer_to_dir,
    train_bpe,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "TokenShards",
    "TokenWindows",
    "Tokenizer",
    "TrainLoader",
    "default_cache_dir",
    "eval_batches",
    "iter_documents",
    "load_tokenizer",
    "load_tokenizer_from_dir",
    "open_shards",
    "prepare_shards",
    "resolve_sources",
    "save_tokenizer_to_dir",
    "stdlib_files",
    "train_bpe",
]
