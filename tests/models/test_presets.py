"""Presets: every one builds on the meta device and lands at the size its name promises."""

from __future__ import annotations

import pytest
import torch

from mixlab import LanguageModel, ModelConfig, get_preset, list_presets
from mixlab.models.presets import ARCHS, SIZES, preset_label

REPORT = {"report-transformer-3.5b": 3.5e9, "report-deltanet-3.7b": 3.7e9, "report-mamba-3.2b": 3.2e9}


def test_every_arch_and_size_is_listed():
    names = list_presets()
    assert names == [f"{a}-{s}" for a in ARCHS for s in SIZES] + list(REPORT)
    assert set(ARCHS) == {"transformer", "mamba", "mamba2", "deltanet", "gated_deltanet", "gdn_h1", "gdn_h2"}
    assert set(SIZES) == {"tiny", "125m", "350m", "1.3b"}


@pytest.mark.parametrize("name", list_presets())
def test_preset_builds_on_meta_with_its_documented_size(name):
    cfg = get_preset(name)
    assert isinstance(cfg, ModelConfig) and cfg.name == name
    with torch.device("meta"):
        model = LanguageModel(cfg)
    n = model.num_parameters()
    assert n == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    label = REPORT.get(name, preset_label(name))
    if label is None:
        assert n <= 5_000_000, f"{name}: {n:,} parameters, tiny must be <= 5M"
        assert cfg.vocab_size == 256
    else:
        assert abs(n / label - 1) <= 0.05, f"{name}: {n:,} parameters is not within 5% of {label:,.0f}"
        if not name.startswith("report-"):
            assert cfg.vocab_size == 32000


def test_preset_shapes_follow_the_papers():
    assert get_preset("gdn_h1-1.3b").pattern == "GS"
    assert get_preset("gdn_h2-1.3b").pattern == "MGS"
    assert get_preset("gdn_h2-350m").attention.window == 2048
    for arch in ("mamba", "mamba2"):
        cfg = get_preset(f"{arch}-1.3b")
        assert cfg.mlp_hidden == 0 and cfg.n_layers == 2 * get_preset("transformer-1.3b").n_layers
    gdn = get_preset("gated_deltanet-1.3b").gated_deltanet
    assert (gdn.head_dim, gdn.expand_v, gdn.n_heads) == (256, 2.0, 6)
    rt = get_preset("report-transformer-3.5b")
    assert (rt.n_layers, rt.d_model, rt.attention.n_heads, rt.attention.n_kv_heads) == (32, 2560, 32, 8)
    assert rt.attention.rope_theta == 5e5
    rm = get_preset("report-mamba-3.2b").mamba2
    assert (rm.d_state, rm.headdim, rm.d_conv, rm.chunk_size, rm.A_init_range) == (64, 64, 4, 64, (1.0, 16.0))


def test_get_preset_returns_fresh_copies_and_names_the_choices():
    a = get_preset("transformer-tiny")
    a.attention.n_heads = 1
    assert get_preset("transformer-tiny").attention.n_heads != 1
    with pytest.raises(ValueError, match="transformer-tiny"):
        get_preset("transformer-7b")
