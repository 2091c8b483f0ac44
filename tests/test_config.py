"""Config tree: YAML + key=value overrides, strict keys with suggestions, typed values, round trips."""

from __future__ import annotations

import pytest

from mixlab.cli import main
from mixlab.config import Config, ConfigError, ModelConfig
from mixlab.configio import (
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    load_config_text,
    parse_override,
)

TINY = {"model": {"name": "t", "d_model": 32, "n_layers": 2, "pattern": "A"}}


def test_overrides_parse_yaml_scalars_and_lists() -> None:
    cfg = apply_overrides(
        config_from_dict(TINY),
        [
            "train.lr=3e-4",  # YAML 1.1 reads this as a string; float fields accept it
            "train.max_steps=1_000",
            "train.betas=[0.8,0.99]",
            "data.source=[a.txt,'b/*.txt']",
            "model.attention.n_kv_heads=null",
            "model.mamba.dt_rank=8",
            "model.gated_deltanet.A_init_range=[1,8]",
            "log.tensorboard=true",
            "run.dir=runs/x",
        ],
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.data.source == ["a.txt", "b/*.txt"]
    assert cfg.model.attention.n_kv_heads is None
    assert cfg.model.mamba.dt_rank == 8 and isinstance(cfg.model.mamba.dt_rank, int)
    assert cfg.model.gated_deltanet.A_init_range == (1.0, 8.0)
    assert cfg.log.tensorboard is True
    assert cfg.run.dir == "runs/x"
    assert cfg.model.d_model == 32  # untouched


def test_reset_override_restores_default() -> None:
    cfg = apply_overrides(config_from_dict(TINY), ["train.lr=1.0", "~train.lr", "~model.d_model"])
    assert cfg.train.lr == Config().train.lr
    assert cfg.model.d_model == ModelConfig().d_model
    assert parse_override("~a.b") == ("a.b", None, True)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "'train.lrr'; did you mean 'train.lr'?"),
        ("trian.lr=1", "'trian'; did you mean 'train'?"),
        ("model.attention.n_head=3", "did you mean 'model.attention.n_heads'?"),
        ("data.seqlen=64", "did you mean 'data.seq_len'?"),
    ],
)
def test_unknown_key_names_it_and_suggests(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="unknown config key") as e:
        apply_overrides(config_from_dict(TINY), [override])
    assert expected in str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "config key 'train.lr' expects float, got 'abc' (str)"),
        ("train.max_steps=1.5", "config key 'train.max_steps' expects int, got 1.5 (float)"),
        ("train.compile=1", "config key 'train.compile' expects bool, got 1 (int)"),
        ("train.betas=[0.9]", "config key 'train.betas' expects tuple[float, float]"),
        ("data.tokenizer=3", "config key 'data.tokenizer' expects str, got 3 (int)"),
        ("train=3", "config key 'train' is a section"),
        ("train.lr.x=1", "'train.lr' is a value, not a section"),
    ],
)
def test_wrong_type_names_key_type_and_value(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_overrides(config_from_dict(TINY), [override])
    assert expected in str(e.value)


def test_invalid_value_is_rejected_with_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"train.schedule='cosin'; allowed: cosine, constant, linear"):
        apply_overrides(config_from_dict(TINY), ["train.schedule=cosin"])
    with pytest.raises(ConfigError, match=r"must be a multiple of train.micro_batch_size"):
        apply_overrides(config_from_dict(TINY), ["train.batch_size=6", "train.micro_batch_size=4"])


def test_yaml_file_is_strict_too(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model: {d_model: 32}\ntrain:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match=r"'train.max_step'; did you mean 'train.max_steps'"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_preset_selection_then_field_overrides_in_any_order(tmp_path) -> None:
    cfg = load_config(None, ["model.d_model=128", "model=transformer-tiny", "model.n_layers=3"])
    assert cfg.model.name == "transformer-tiny" and cfg.model.pattern == "A"
    assert (cfg.model.d_model, cfg.model.n_layers) == (128, 3)
    assert load_config().model.name == "gated_deltanet-tiny"  # the default preset
    p = tmp_path / "c.yaml"
    p.write_text("model: mamba2-tiny\ntrain: {lr: 1.0e-3}\n")
    cfg = load_config(p, ["model.d_model=64"])
    assert (cfg.model.name, cfg.model.d_model, cfg.train.lr) == ("mamba2-tiny", 64, 1e-3)
    p.write_text("model: {preset: deltanet-tiny, n_layers: 1}\n")
    assert (load_config(p).model.pattern, load_config(p).model.n_layers) == ("D", 1)
    with pytest.raises(ConfigError, match="unknown model preset 'nope-tiny'"):
        load_config(None, ["model=nope-tiny"])


def test_dump_reloads_to_identical_config(tmp_path) -> None:
    cfg = load_config(
        None,
        ["model=gdn_h2-tiny", "train.lr=3e-4", "data.source=[x.txt,y.jsonl]", "train.betas=[0.9,0.999]", "run.seed=7"],
    )
    text = dump_config(cfg)
    again = load_config_text(text)
    assert again == cfg
    assert dump_config(again) == text
    p = tmp_path / "c.yaml"
    p.write_text(text)
    assert load_config(p) == cfg


def test_cli_reports_config_errors(capsys) -> None:
    assert main(["train", "train.lrr=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'; did you mean 'train.lr'?" in err
    assert main(["train", "--print-config", "model=transformer-tiny", "train.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert load_config_text(out).train.lr == 1e-3


def test_example_configs_load_and_default_yaml_is_the_default() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    files = sorted(root.glob("*.yaml"))
    assert files, root
    for f in files:
        load_config(f)
    assert load_config(root / "default.yaml") == load_config()
