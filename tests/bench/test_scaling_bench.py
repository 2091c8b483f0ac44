"""``mixlab bench scaling``: the bookkeeping on hand-made rows, and one real run on CPU gloo processes."""

from __future__ import annotations

import argparse
import json

import pytest

from mixlab.bench import scaling


def test_world_sizes_default_and_explicit() -> None:
    assert scaling.world_sizes(None, "cpu") == [1, 2]
    assert scaling.world_sizes("8,1,4,2,4", "cuda") == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="positive world sizes"):
        scaling.world_sizes("0,2", "cuda")


def test_summarize_takes_the_median_step_after_warmup() -> None:
    tps = 1000.0
    rows = [{"step": 1, "tokens_per_s": 10.0, "loss": 9.0}]  # the warm-up step is slow and ignored
    rows += [
        {"step": s, "tokens_per_s": tps * f, "loss": 5.0, "peak_mem_gb": 2.0 + s} for s, f in [(2, 1), (3, 2), (4, 0.5)]
    ]
    out = scaling.summarize(rows, warmup=1, tokens_per_step=1000)
    assert out["status"] == "ok" and out["timed_steps"] == 3
    assert out["step_ms"] == pytest.approx(1000.0)  # step times 1, 0.5, 2 s: median 1 s
    assert out["tokens_per_s"] == pytest.approx(1000.0)
    assert out["peak_mem_gb"] == 6.0
    assert scaling.summarize(rows[:1], warmup=1, tokens_per_step=1000)["status"] == "no timed steps"


def test_efficiency_is_against_one_gpu_of_the_same_preset_and_strategy() -> None:
    rows = [
        {"preset": "a", "strategy": "ddp", "gpus": 1, "status": "ok", "tokens_per_s": 100.0},
        {"preset": "a", "strategy": "ddp", "gpus": 4, "status": "ok", "tokens_per_s": 360.0},
        {"preset": "a", "strategy": "fsdp", "gpus": 4, "status": "ok", "tokens_per_s": 300.0},
        {"preset": "a", "strategy": "ddp", "gpus": 8, "status": "failed"},
    ]
    scaling.add_efficiency(rows)
    assert rows[1]["efficiency"] == pytest.approx(0.9) and rows[1]["per_gpu"] == 90.0
    assert "efficiency" not in rows[2]  # no one-GPU fsdp point to compare with
    assert "per_gpu" not in rows[3]


def test_train_command_keeps_the_per_gpu_batch() -> None:
    args = argparse.Namespace(data="stdlib", seq_len=256, batch_per_gpu=3, ac="none", device="cpu")
    cmd = scaling.train_command("gated_deltanet-tiny", "fsdp", 4, scaling.Path("/r"), args, 7, ["train.lr=1e-3"])
    assert "--nproc_per_node=4" in cmd and "train.batch_size=12" in cmd and "train.max_steps=7" in cmd
    assert "parallel.strategy=fsdp" in cmd and "run.device=cpu" in cmd and cmd[-1] == "train.lr=1e-3"


def test_a_bad_ac_mode_is_refused_before_any_run(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    scaling.add_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--ac", "selective:x", "--work-dir", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="--ac: activation checkpointing mode 'selective:x'; allowed: none"):
        scaling.run(args)
    assert not (tmp_path / "w").exists()


def test_two_gloo_ranks_and_a_checkpoint_resumed_on_one(tmp_path, monkeypatch) -> None:
    """One point at world size 2 (FSDP) and the resume check: saved on 2 ranks, resumed on 1."""
    from mixlab.cli import main

    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    rc = main([
        "bench", "scaling", "--device", "cpu", "--presets", "gated_deltanet-tiny", "--strategies", "fsdp",
        "--gpus", "2", "--seq-len", "64", "--batch-per-gpu", "2", "--steps", "4", "--warmup", "1",
        "--data", str(corpus), "--resume-check", "--no-plot", "--out-dir", str(out), "train.lr=1e-3",
    ])  # fmt: skip
    assert rc == 0
    (path,) = out.glob("scaling-cpu-*.json")
    doc = json.loads(path.read_text())
    (row,) = doc["rows"]
    assert row["status"] == "ok" and row["gpus"] == 2 and row["global_batch"] == 4 and row["timed_steps"] == 4
    assert row["tokens_per_s"] > 0
    (check,) = doc["checks"]
    assert check["status"] == "ok" and (check["saved_on"], check["resumed_on"]) == (2, 1)
    assert len(check["losses_resumed"]) == 2
    assert check["max_rel_loss_diff"] < 1e-5, check
