"""Shared fixtures: a small repetitive text corpus and a tiny, fast training config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mixlab.config import Config
from mixlab.configio import config_from_dict

WORDS = ["alpha", "beta", "gamma", "delta", "(", ")", ":", "return", "def", "\n    ", " = ", "x", "y", "1", "2"]


def make_corpus(d: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (d / f"doc{i:03d}.txt").write_text("".join(rng.choice(WORDS) + " " for _ in range(60)))
    return d


def tiny_overrides(root: Path) -> list[str]:
    """key=value overrides for a ~50k-parameter attention model on the fixture corpus (fast on CPU)."""
    return [
        "model.name=tiny-test",
        "model.pattern=A",
        "model.d_model=32",
        "model.n_layers=2",
        "model.d_intermediate=64",
        "model.attention.n_heads=2",
        f"data.source={root / 'corpus'}",
        f"data.cache_dir={root / 'cache'}",
        "data.seq_len=32",
        "data.val_min_tokens=256",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.eval_batches=2",
        "train.eval_every=0",
        "log.progress=false",
    ]


@pytest.fixture
def tiny(tmp_path: Path):
    """``make(run_dir_name, *extra_overrides) -> Config`` over a corpus made in ``tmp_path``."""
    make_corpus(tmp_path / "corpus")

    def make(run: str = "run", *extra: str) -> Config:
        from mixlab.configio import apply_overrides

        base = config_from_dict({"model": {}})
        return apply_overrides(base, [*tiny_overrides(tmp_path), f"run.dir={tmp_path / run}", *extra])

    make.root = tmp_path
    make.overrides = tiny_overrides(tmp_path)
    return make
