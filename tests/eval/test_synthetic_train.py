"""``mixlab train task=mqar``: the one training loop on labeled synthetic batches."""

from __future__ import annotations

import pytest

from mixlab.config import ConfigError
from mixlab.configio import load_config
from mixlab.data.synthetic import SyntheticLoader
from mixlab.train import load_model, read_metrics, train

BASE = [
    "model=transformer-tiny",
    "model.d_model=32",
    "model.n_layers=2",
    "model.d_intermediate=0",
    "model.attention.n_heads=1",
    "synthetic.vocab_size=64",
    "synthetic.num_kv_pairs=4",
    "synthetic.eval_examples=16",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "log.progress=false",
]


def _quiet(_m: str) -> None:
    pass


def test_mqar_training_matches_accumulation_and_scores_only_queries(tmp_path) -> None:
    a = train(load_config(None, [*BASE, "task=mqar", "train.max_steps=3", f"run.dir={tmp_path / 'a'}"]), log=_quiet)
    b = train(
        load_config(
            None, [*BASE, "task=mqar", "train.max_steps=3", "train.micro_batch_size=4", f"run.dir={tmp_path / 'b'}"]
        ),
        log=_quiet,
    )
    assert a.ok and b.ok and a.config.model.vocab_size == 64
    for step in (1, 2, 3):  # every row has the same number of queries: accumulation equals one big batch
        assert a.losses[step] == pytest.approx(b.losses[step], rel=1e-4)
    # the first loss is the loss of the queries only: about ln(64) at init, not a text-model value
    assert abs(a.losses[1] - 4.16) < 0.5
    # val loss is the loss on the held-out stream's queries
    model, _ = load_model(a.run_dir)
    from mixlab.eval.mqar import labeled_accuracy

    held = SyntheticLoader("mqar", a.config.synthetic, 32, 8, seed=0).eval_batches()
    assert a.val_loss == pytest.approx(labeled_accuracy(model, held)["loss"], rel=1e-4)
    assert [r["step"] for r in read_metrics(a.run_dir) if "val_loss" in r] == [3]


def test_selective_copying_trains_and_bad_task_is_named(tmp_path) -> None:
    cfg = load_config(
        None, [*BASE, "task=selective_copying", "synthetic.num_tokens=4", "train.max_steps=2", f"run.dir={tmp_path}"]
    )
    assert train(cfg, log=_quiet).ok
    with pytest.raises(ConfigError, match="task='copy'"):
        load_config(None, [*BASE, "task=copy"])
    with pytest.raises(ValueError, match=r"data\.seq_len >= 64"):
        train(load_config(None, [*BASE, "task=mqar", "synthetic.num_kv_pairs=16", f"run.dir={tmp_path / 'x'}"]))
