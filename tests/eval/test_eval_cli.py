"""``mixlab eval`` end to end on tiny trained runs; task parsing."""

from __future__ import annotations

import json
import math
import random

import pytest

from mixlab.cli import main
from mixlab.configio import load_config
from mixlab.eval import evaluate, parse_tasks
from mixlab.train import train

TINY = [
    "model=transformer-tiny",
    "model.d_model=32",
    "model.n_layers=2",
    "model.d_intermediate=64",
    "model.attention.n_heads=2",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "log.progress=false",
]


def _quiet(_m: str) -> None:
    pass


def test_parse_tasks() -> None:
    assert parse_tasks("ppl,mqar") == (["ppl", "mqar"], [])
    assert parse_tasks("ppl,harness:hellaswag,arc_easy") == (["ppl"], ["hellaswag", "arc_easy"])
    assert parse_tasks(["harness:a", "b", "niah", "ppl"]) == (["niah", "ppl"], ["a", "b"])
    with pytest.raises(ValueError, match="harness:hellaswag"):
        parse_tasks("hellaswag")
    with pytest.raises(ValueError, match="no eval task"):
        parse_tasks(",")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "(", ")", "def", "return", "\n", "x", "1"]
    (root / "corpus").mkdir()
    for i in range(30):
        (root / "corpus" / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    cfg = load_config(
        None,
        [
            *TINY,
            f"data.source={root / 'corpus'}",
            f"data.cache_dir={root / 'cache'}",
            "data.seq_len=32",
            "data.val_min_tokens=600",
            "train.max_steps=4",
            f"run.dir={root / 'run'}",
        ],
    )
    return train(cfg, log=_quiet)


def test_eval_cli_ppl_and_length_curve(text_run, capsys) -> None:
    run = text_run.run_dir
    assert main(["eval", str(run), "--tasks", "ppl", "--max-tokens", "400", "--factor", "2"]) == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["train_len"] == 32 and res["ppl"]["context"] == 32 and res["ppl"]["mode"] == "window"
    assert res["ppl"]["ppl"] == pytest.approx(math.exp(res["ppl"]["loss"]))
    assert 0 < res["ppl"]["bits_per_byte"] < 10
    assert res["length"]["length"] == 64 and len(res["length"]["buckets"]) == 8
    out = capsys.readouterr().out
    assert "bits/byte" in out and "eval.json" in out
    # results of later calls merge into eval.json; the state mode scores the same tokens
    assert main(["eval", str(run), "--tasks", "niah", "--niah-variants", "niah_1", "--niah-lengths", "500",
                 "--niah-depths", "50", "--niah-samples", "1"]) == 0  # fmt: skip
    res2 = json.loads((run / "eval.json").read_text())
    assert "ppl" in res2 and res2["niah"]["variants"]["niah_1"]["cells"][0]["length"] == 500
    state = evaluate(run, "ppl", ppl_mode="state", max_tokens=400, log=_quiet)["ppl"]
    assert state["tokens"] == res["ppl"]["tokens"] and state["context"] is None


def test_eval_cli_synthetic_runs_and_errors(tmp_path, capsys) -> None:
    cfg = load_config(
        None,
        [*TINY, "task=mqar", "synthetic.vocab_size=64", "synthetic.num_kv_pairs=4", "synthetic.eval_examples=8",
         "data.seq_len=32", "train.max_steps=2", f"run.dir={tmp_path / 'mq'}"],
    )  # fmt: skip
    run = train(cfg, log=_quiet).run_dir
    assert main(["eval", str(run), "--tasks", "mqar", "--mqar-examples", "16"]) == 0
    res = json.loads((run / "eval.json").read_text())["mqar"]
    assert res["vocab_size"] == 64 and [(r["seq_len"], r["num_kv_pairs"]) for r in res["results"]] == [(32, 4)]
    assert res["results"][0]["targets"] == 64
    assert main(["eval", str(run), "--tasks", "ppl"]) == 2
    assert "synthetic task" in capsys.readouterr().err
    # `synthetic` scores the run's own task: the same figure as MQAR's at the run's setting
    assert main(["eval", str(run), "--tasks", "synthetic", "--mqar-examples", "16"]) == 0
    syn = json.loads((run / "eval.json").read_text())["synthetic"]
    assert syn["task"] == "mqar" and syn["accuracy"] == pytest.approx(res["results"][0]["accuracy"])
    assert main(["eval", str(run), "--tasks", "bogus"]) == 2
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "ppl"]) == 2
    cfg = load_config(
        None,
        [*TINY, "task=selective_copying", "synthetic.vocab_size=16", "synthetic.num_tokens=4",
         "synthetic.eval_examples=8", "data.seq_len=16", "train.max_steps=2", f"run.dir={tmp_path / 'sc'}"],
    )  # fmt: skip
    run = train(cfg, log=_quiet).run_dir
    assert main(["eval", str(run), "--tasks", "synthetic", "--mqar-examples", "8"]) == 0
    syn = json.loads((run / "eval.json").read_text())["synthetic"]
    assert syn["task"] == "selective_copying" and syn["targets"] == 32
    assert main(["eval", str(run), "--tasks", "mqar"]) == 2
    assert "evaluate it with the task 'synthetic'" in capsys.readouterr().err
