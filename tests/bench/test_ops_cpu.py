"""`mixlab bench ops-cpu` at tiny shapes: one row per op, sane timings and errors, a JSON file."""

from __future__ import annotations

import json

import pytest

from mixlab.bench.ops_cpu import OPS
from mixlab.cli import main


def test_tiny_run_writes_every_op(tmp_path, capsys):
    args = [
        "bench",
        "ops-cpu",
        "--seqlen",
        "40",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--ssd-heads",
        "2",
        "--ssd-headdim",
        "4",
        "--ssd-state",
        "8",
        "--ssd-chunk",
        "16",
        "--channels",
        "8,12",
        "--state",
        "4",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    files = sorted(tmp_path.glob("ops-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["suite"] == "ops-cpu" and data["env"]["torch"] and data["config"]["seqlen"] == 40
    assert data["config"]["channels"] == "8,12" and data["config"]["ssd_chunk"] == 16
    rows = {(r["op"], r["shape"]): r for r in data["rows"]}
    assert {op for op, _ in rows} == set(OPS)
    assert {shape for op, shape in rows if op == "selective_scan"} == {"B1 D8 N4", "B1 D12 N4"}
    for r in rows.values():
        assert r["T"] == 40 and r["reference_ms"] > 0 and r["chunked_ms"] > 0
        assert r["speedup"] == pytest.approx(r["reference_ms"] / r["chunked_ms"])
        assert r["max_rel_err"] < 1e-3  # float32 chunked vs reference, outputs and every gradient
    out = capsys.readouterr().out
    assert "speedup" in out and str(files[0]) in out


def test_unknown_op_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown op"):
        main(["bench", "ops-cpu", "--ops", "ssd,flash", "--out-dir", str(tmp_path)])
