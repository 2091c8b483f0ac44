"""``mixlab models`` and ``mixlab demo``."""

from __future__ import annotations

import json

import torch

from mixlab import LanguageModel, get_preset, list_presets
from mixlab.cli import main


def _meta_count(name: str) -> int:
    with torch.device("meta"):
        return LanguageModel(get_preset(name)).num_parameters()


def test_models_json_gives_exact_counts(capsys):
    names = ["transformer-tiny", "transformer-1.3b", "report-transformer-3.5b"]
    assert main(["models", "--json", *names]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == names
    for r in rows:
        cfg = get_preset(r["name"])
        assert r["params"] == _meta_count(r["name"])
        assert (r["n_layers"], r["d_model"], r["pattern"]) == (cfg.n_layers, cfg.d_model, cfg.pattern)
    assert rows[2]["params"] - rows[2]["non_embedding_params"] == 2 * 128256 * 2560  # untied head


def test_models_table_lists_every_preset(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip() and not line.startswith("pattern")}
    assert list(rows) == list_presets()
    for name in ("mamba-tiny", "gdn_h2-125m", "report-mamba-3.2b"):  # exact counts (each meta build takes a while)
        assert rows[name][1] == f"{_meta_count(name):,}"
        assert rows[name][5] == get_preset(name).pattern


def test_models_unknown_name(capsys):
    assert main(["models", "transformer-7b"]) == 2
    assert "unknown preset" in capsys.readouterr().out


def test_demo_passes_and_reports(capsys):
    assert main(["demo", "--archs", "transformer", "gdn_h1", "--seq-len", "10", "--prefill", "4"]) == 0
    out = capsys.readouterr().out
    assert sum(line.endswith("  OK") for line in out.splitlines()) == 2 and "FAIL" not in out
    assert f"{_meta_count('gdn_h1-tiny'):,}" in out


def test_demo_fails_when_decoding_is_wrong(capsys, monkeypatch):
    from mixlab.layers.attention import Attention

    monkeypatch.setattr(Attention, "_attend_cached", lambda self, q, k, v, cache: torch.zeros_like(q))
    assert main(["demo", "--archs", "transformer", "--seq-len", "6", "--prefill", "2"]) == 1
    assert "FAIL" in capsys.readouterr().out
