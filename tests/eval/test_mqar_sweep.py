"""The MQAR sweep command: one tiny point end to end, result files, reuse, and the model shapes."""

from __future__ import annotations

import json

import pytest

from mixlab.configio import load_config
from mixlab.eval.mqar_sweep import main, model_overrides


def test_model_overrides_follow_the_zoology_setup() -> None:
    for arch, letter in (("transformer", "A"), ("deltanet", "D"), ("gated_deltanet", "G"), ("mamba", "m")):
        cfg = load_config(None, [*model_overrides(arch, 64), "task=mqar"]).model
        assert cfg.pattern == letter and cfg.n_layers == 2 and cfg.d_intermediate == 0 and cfg.d_model == 64
    gdn = load_config(None, model_overrides("gated_deltanet", 128)).model.gated_deltanet
    assert (gdn.n_heads, gdn.head_dim, gdn.expand_v) == (2, 64, 1.0)
    assert load_config(None, model_overrides("transformer", 64)).model.attention.n_heads == 1
    with pytest.raises(ValueError, match="unknown architecture"):
        model_overrides("rwkv", 64)


def test_tiny_sweep_writes_json_png_and_table(tmp_path, capsys) -> None:
    args = [
        "--device", "cpu", "--budget-min", "2", "--archs", "transformer", "--d-models", "16", "--lrs", "3e-3",
        "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--batch-size", "8", "--eval-examples", "16",
        "--min-steps", "3", "--max-steps", "4", "--work-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "mqar-L16-kv2-cpu.json").read_text())
    assert (tmp_path / "mqar-L16-kv2-cpu.png").stat().st_size > 1000
    (row,) = doc["rows"]
    assert row["arch"] == "transformer" and row["steps"] == 4 and 0.0 <= row["accuracy"] <= 1.0
    assert doc["best"][0]["accuracy"] == row["accuracy"] and doc["settings"]["num_kv_pairs"] == 2
    assert out.strip().splitlines()[-1].split()[:2] == ["transformer", "16"]  # the table is printed last
    # a rerun reuses the finished point
    assert main(args) == 0
    assert "reusing 1 finished point" in capsys.readouterr().out


def test_a_point_over_its_time_share_is_stopped_and_still_scored(tmp_path, capsys) -> None:
    args = [
        "--device", "cpu", "--budget-min", "0.2", "--archs", "transformer", "--d-models", "16", "--lrs", "3e-3",
        "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--batch-size", "8", "--eval-examples", "16",
        "--min-steps", "100000", "--max-steps", "100000", "--work-dir", str(tmp_path / "runs"),
        "--out-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(args) == 0
    (row,) = json.loads((tmp_path / "mqar-L16-kv2-cpu.json").read_text())["rows"]
    assert row["stopped_by_budget"] and 0 < row["steps"] < 100000 and 0.0 <= row["accuracy"] <= 1.0
    assert "time share spent" in capsys.readouterr().out


def test_jobs_run_points_as_processes_and_only_the_parent_writes(tmp_path, capsys) -> None:
    args = [
        "--device", "cpu", "--budget-min", "3", "--archs", "transformer", "--d-models", "16", "--lrs", "3e-3,1e-2",
        "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--batch-size", "8", "--eval-examples", "16",
        "--train-examples", "40", "--min-steps", "3", "--max-steps", "4", "--jobs", "2",
        "--work-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(args) == 0
    assert "2 at a time" in capsys.readouterr().out
    doc = json.loads((tmp_path / "mqar-L16-kv2-cpu.json").read_text())
    assert doc["jobs"] == 2 and doc["settings"]["train_examples"] == 40
    assert sorted(r["lr"] for r in doc["rows"]) == ["1e-2", "3e-3"]
    assert all(r["steps"] == 4 and 0.0 <= r["accuracy"] <= 1.0 for r in doc["rows"])
    assert len(doc["best"]) == 1 and doc["best"][0]["accuracy"] == max(r["accuracy"] for r in doc["rows"])
    logs = tmp_path / "runs" / "logs"
    assert {p.name for p in logs.glob("*.json")} == {"transformer-d16-lr3e-3.json", "transformer-d16-lr1e-2.json"}
    assert not list(tmp_path.glob("*.tmp"))
