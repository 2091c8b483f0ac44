"""LanguageModel: decode equals forward for every architecture, meta-device build, init, parameter counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mixlab import ModelConfig, build_model, get_preset
from mixlab.layers.base import Mixer
from mixlab.models import LanguageModel
from mixlab.models.presets import ARCHS


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _decode(model, ids, prefill):
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    outs = [model(ids[:, :prefill], cache=cache)] if prefill else []
    outs += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    assert cache.position == ids.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_prefill_plus_decode_equals_forward_for_every_tiny_preset(arch):
    cfg = get_preset(f"{arch}-tiny")
    cfg.attention.window = 6  # shorter than the sequence, so sliding-window layers wrap their ring buffers
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(ids)
    assert full.shape == (2, 20, cfg.vocab_size)
    for prefill in (0, 9):
        err = _rel_err(_decode(model, ids, prefill), full)
        assert err < 1e-5, f"{arch}: prefill {prefill}: relative error {err:.2e}"


def _tiny_attention_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=3, pattern="AS", d_intermediate=48, init_std=0.02)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.attention = dataclasses.replace(cfg.attention, n_heads=4, n_kv_heads=2, window=4)
    return cfg


def test_meta_build_materialises_everything_and_ties_weights():
    cfg = _tiny_attention_config()
    with torch.device("meta"):
        meta = LanguageModel(cfg)
    assert all(p.is_meta for p in meta.parameters())
    model = build_model(cfg, dtype=torch.float64)
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight
    assert model.num_parameters() == meta.num_parameters()
    assert torch.isfinite(model(torch.randint(0, 64, (1, 5)))).all()


def test_tied_embeddings_counted_once():
    tied, untied = build_model(_tiny_attention_config()), build_model(_tiny_attention_config(tie_embeddings=False))
    v_d = 64 * 32
    unique = {id(p): p.numel() for m in (tied,) for p in m.parameters()}
    assert tied.num_parameters() == sum(unique.values())
    assert untied.num_parameters() == tied.num_parameters() + v_d
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - v_d
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - 2 * v_d
    assert untied.lm_head.weight is not untied.embed.weight


def _std(p):
    return p.detach().double().std().item()


def test_init_std_and_residual_scaling():
    cfg = _tiny_attention_config(d_model=256, n_layers=4, d_intermediate=512, vocab_size=512, init_std=0.03)
    torch.manual_seed(0)
    model = build_model(cfg)
    scaled = 0.03 / math.sqrt(2 * 4)  # 4 blocks with mixer and MLP: 8 residual branches
    assert _std(model.embed.weight) == pytest.approx(0.03, rel=0.03)
    for block in model.layers:
        assert _std(block.mixer.q_proj.weight) == pytest.approx(0.03, rel=0.03)
        assert _std(block.mlp.gate_proj.weight) == pytest.approx(0.03, rel=0.03)
        assert _std(block.mixer.o_proj.weight) == pytest.approx(scaled, rel=0.03)
        assert _std(block.mlp.down_proj.weight) == pytest.approx(scaled, rel=0.03)
        assert torch.equal(block.norm.weight, torch.ones(256))
    assert torch.equal(model.norm_f.weight, torch.ones(256))


def test_mixer_only_blocks_scale_by_number_of_layers():
    cfg = _tiny_attention_config(d_model=256, n_layers=6, d_intermediate=0, vocab_size=64, pattern="A")
    model = build_model(cfg)
    assert all(block.mlp is None for block in model.layers)
    o = torch.cat([b.mixer.o_proj.weight.flatten() for b in model.layers])
    assert _std(o) == pytest.approx(0.02 / math.sqrt(6), rel=0.03)


class _Probe(Mixer):
    """A mixer whose own init must survive the model's generic init."""

    def __init__(self, d):
        super().__init__()
        self.special = nn.Linear(d, d, bias=True)
        self.conv = nn.Conv1d(d, d, 3, groups=d)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.keep = nn.Parameter(torch.full((d,), 7.0))
        self.keep._no_reinit = True

    def reset_parameters(self):
        with torch.no_grad():
            self.special.weight.fill_(0.5)
            self.special.bias.fill_(-1.0)
            self.conv.weight.fill_(0.25)

    def forward(self, x, cache=None):
        return self.out_proj(self.special(x))


def test_generic_init_does_not_clobber_mixer_init():
    model = build_model(_tiny_attention_config(n_layers=2))
    model.layers[0].mixer = _Probe(32)
    model.init_weights()
    probe = model.layers[0].mixer
    assert torch.all(probe.special.weight == 0.5) and torch.all(probe.special.bias == -1.0)
    assert torch.all(probe.conv.weight == 0.25)  # the mixer's init ran after Conv1d's own reset
    assert torch.all(probe.keep == 7.0)
    assert _std(probe.out_proj.weight) == pytest.approx(0.02 / math.sqrt(4), rel=0.1)  # residual projection scaled


def test_forward_hidden_feeds_the_head_and_gradients_reach_everything():
    torch.manual_seed(0)
    model = build_model(_tiny_attention_config(tie_embeddings=False))
    ids = torch.randint(0, 64, (2, 9))
    h = model.forward_hidden(ids)
    assert h.shape == (2, 9, 32)
    torch.testing.assert_close(model.lm_head(h), model(ids))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing


def test_input_and_cache_errors():
    model = build_model(_tiny_attention_config())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 5))
    cache = model.init_cache(2, 8)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)


def test_mixer_inits_survive_the_model_init():
    """Mamba's dt_proj / A_log / D and Mamba2's dt_bias / A_log come out as mamba_ssm sets them,
    not as the generic N(0, init_std) init, and their out_proj is depth-scaled (mixer-only blocks)."""
    torch.manual_seed(0)
    cfg = get_preset("mamba-tiny")
    model = build_model(cfg)
    n_layers = cfg.n_layers
    for block in model.layers:
        m = block.mixer
        torch.testing.assert_close(m.A_log.exp(), torch.arange(1.0, cfg.mamba.d_state + 1).expand_as(m.A_log))
        assert torch.all(m.D == 1)
        dt = nn.functional.softplus(m.dt_proj.bias.double())
        assert dt.min() >= cfg.mamba.dt_min * 0.999 and dt.max() <= cfg.mamba.dt_max * 1.001
        assert _std(m.dt_proj.weight) == pytest.approx(m.dt_rank**-0.5 / math.sqrt(3), rel=0.1)
        assert _std(m.in_proj.weight) == pytest.approx(cfg.init_std, rel=0.05)
    out = torch.cat([b.mixer.out_proj.weight.flatten() for b in model.layers])
    assert _std(out) == pytest.approx(cfg.init_std / math.sqrt(n_layers), rel=0.05)

    cfg2 = get_preset("mamba2-tiny")
    m2 = build_model(cfg2).layers[0].mixer
    lo, hi = cfg2.mamba2.A_init_range
    assert torch.all(m2.A_log.exp() >= lo * 0.999) and torch.all(m2.A_log.exp() <= hi * 1.001)
    dt = nn.functional.softplus(m2.dt_bias.double())
    assert dt.min() >= cfg2.mamba2.dt_min * 0.999 and dt.max() <= cfg2.mamba2.dt_max * 1.001


def _forward_adding_at_once(model, ids):
    """forward_hidden as a plain loop: every block adds its own branches (no add left to the next norm)."""
    x = model.embed(ids).float()
    for block in model.layers:
        x = block(x)
    return model.norm_f(x).to(model.norm_f.weight.dtype)


@pytest.mark.parametrize("checkpointed", ["none", "selective"])
@pytest.mark.parametrize("arch", ["gated_deltanet", "mamba2"])
def test_adds_left_to_the_next_norm_change_nothing(arch, checkpointed):
    """Under bf16 autocast (the training path, where each norm takes the pending residual add into its pass) the
    hidden states and every gradient equal those of adding at once; a checkpointed block gets no pending branch."""
    from mixlab.train.parallel import apply_activation_checkpointing

    cfg = get_preset(f"{arch}-tiny")
    cfg.n_layers = 4
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_activation_checkpointing(model, checkpointed)
    got_branch = []
    for block in model.layers:
        block.register_forward_pre_hook(
            lambda m, a, kw: got_branch.append(kw.get("branch") is not None), with_kwargs=True
        )
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    gy = torch.randn(2, 12, cfg.d_model)
    results = []
    for forward in (model.forward_hidden, lambda ids: _forward_adding_at_once(model, ids)):
        model.zero_grad(set_to_none=True)
        got_branch.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(ids)
        (y.float() * gy).sum().backward()
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(got_branch)))
    (y, grads, branches), (y_ref, grads_ref, _) = results
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    expected = [i > 0 and not (checkpointed == "selective" and i % 2 == 0) for i in range(cfg.n_layers)]
    assert branches == expected
