"""`mixlab plot`: curves of one or more runs to a PNG."""

from __future__ import annotations

import json

import pytest

from mixlab.cli import main


def _fake_run(d, scale: float) -> None:
    d.mkdir()
    rows = [
        {"step": s, "loss": scale * 5 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s, "tokens": s * 64}
        for s in range(1, 21)
    ]
    rows += [{"step": 10, "val_loss": 1.0}, {"event": "resume", "step": 5}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_runs_to_png(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    _fake_run(tmp_path / "a", 1.0)
    _fake_run(tmp_path / "b", 2.0)
    out = tmp_path / "plots" / "c.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--smooth", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "has no metrics.jsonl rows" in capsys.readouterr().err
