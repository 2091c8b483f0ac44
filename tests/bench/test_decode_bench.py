"""`mixlab bench decode --quick` on the CPU: rows, constant recurrent cache, OOM skipping, files."""

from __future__ import annotations

import json

import torch

from mixlab.cli import main


def _results(tmp_path) -> dict:
    files = sorted(tmp_path.glob("decode-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_quick_run_writes_rows_plot_and_table(tmp_path, capsys):
    assert main(["bench", "decode", "--quick", "--contexts", "16,64", "--out-dir", str(tmp_path)]) == 0
    data = _results(tmp_path)
    rows = {(r["preset"], r["batch"], r["context"]): r for r in data["rows"]}
    assert set(rows) == {
        (p, b, c) for p in ("transformer-tiny", "gated_deltanet-tiny") for b in (1, 2) for c in (16, 64)
    }
    assert all(r["status"] == "ok" and r["decode_ms_per_token"] > 0 and r["prefill_ms"] > 0 for r in rows.values())
    # the Gated DeltaNet's cache is its state: the same at every context; the KV cache grows with it
    gdn = [rows[("gated_deltanet-tiny", 2, c)]["cache_mb"] for c in (16, 64)]
    kv = [rows[("transformer-tiny", 2, c)]["cache_mb"] for c in (16, 64)]
    assert gdn[0] == gdn[1]
    assert kv[1] > 3 * kv[0]
    assert rows[("gated_deltanet-tiny", 2, 16)]["cache_mb"] == 2 * rows[("gated_deltanet-tiny", 1, 16)]["cache_mb"]
    assert data["targets"] and all("pass" in t for t in data["targets"])
    assert sorted(tmp_path.glob("decode-*.png"))
    out = capsys.readouterr().out
    table_at = out.rindex("decode_ms_per_token")
    assert out.index("gated_deltanet-tiny  2", table_at) > table_at  # the table comes after the progress lines


def test_out_of_memory_points_are_skipped(tmp_path, monkeypatch):
    import mixlab.bench.decode as dec

    real = dec.measure_point

    def flaky(model, batch, context, *a, **k):
        if context == 32 and batch == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, context, *a, **k)

    monkeypatch.setattr(dec, "measure_point", flaky)
    args = ["--quick", "--no-plot", "--presets", "gated_deltanet-tiny", "--contexts", "16,32"]
    assert main(["bench", "decode", *args, "--out-dir", str(tmp_path)]) == 0
    rows = _results(tmp_path)["rows"]
    status = {(r["preset"], r["batch"], r["context"]): r["status"] for r in rows}
    assert status == {
        ("gated_deltanet-tiny", 1, 16): "ok",
        ("gated_deltanet-tiny", 1, 32): "ok",
        ("gated_deltanet-tiny", 2, 16): "ok",
        ("gated_deltanet-tiny", 2, 32): "oom",
    }
