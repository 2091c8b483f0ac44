"""DeltaNet / Gated DeltaNet layers: decode == full forward (through the chunked op, the plain recurrence
step and the Triton decode kernels), init statistics, meta-device init, fla-compatible parameter
layout, and the forward against a by-hand composition of the ops.

The Triton decode test runs the kernels on the CPU under ``TRITON_INTERPRET=1`` (set here before Triton
is imported, as the kernel tests do) and skips when Triton is not installed."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab.layers.deltanet as deltanet_mod
from mixlab.config import DeltaNetConfig, GatedDeltaNetConfig, ModelConfig
from mixlab.layers import build_mixer
from mixlab.layers.common import DECODE_STEP_MAX_TOKENS
from mixlab.layers.deltanet import DeltaNet, GatedDeltaNet, delta_rule_steps
from mixlab.ops.delta_rule.reference import delta_rule_reference

D_MODEL = 32

LAYERS = {
    "deltanet": lambda **kw: DeltaNet(D_MODEL, n_heads=2, head_dim=8, **kw),
    "deltanet-gate-expand": lambda **kw: DeltaNet(
        D_MODEL, n_heads=2, head_dim=8, expand_v=1.5, use_output_gate=True, **kw
    ),
    "deltanet-noconv": lambda **kw: DeltaNet(D_MODEL, n_heads=2, head_dim=8, use_short_conv=False, **kw),
    "gated": lambda **kw: GatedDeltaNet(D_MODEL, n_heads=2, head_dim=8, **kw),
    "gated-conv2": lambda **kw: GatedDeltaNet(D_MODEL, n_heads=3, head_dim=4, conv_size=2, A_init_range=(1, 4), **kw),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


SEGMENTS = {
    "token-by-token": [1] * 10,
    "prefill-then-steps": [37, 1, 1, 1, 1],
    "across-a-chunk-boundary": [64, 2, 1, 1, 1],
    "mixed": [20, 10, 1, 1, 30, 1],
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("segments", list(SEGMENTS))
def test_decode_equals_full_forward(name, segments):
    """Feeding the sequence through the cache in segments (prefills of any length, single tokens)
    gives exactly the full forward's outputs (float32, 1e-5 relative)."""
    torch.manual_seed(0)
    layer = LAYERS[name]()
    lengths = SEGMENTS[segments]
    T = sum(lengths)
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, T)
        outs, pos = [], 0
        for n in lengths:
            outs.append(layer(x[:, pos : pos + n], cache=cache))
            pos += n
    assert cache.pos == T
    assert cache.state.dtype == torch.float32
    assert _rel(torch.cat(outs, dim=1), full) < 1e-5


def _spy(monkeypatch, module, name):
    """Record the number of tokens of every call of ``module.name`` (still running it)."""
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[1].shape[1] if name.endswith("_steps") else args[0].shape[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name", ["deltanet-gate-expand", "deltanet-noconv", "gated", "gated-conv2"])
def test_plain_decode_steps_are_used_and_equal_full_forward(name, monkeypatch):
    """Without gradient, a cached forward of 1 to DECODE_STEP_MAX_TOKENS["plain"] tokens runs the plain
    recurrence (never the chunked op) and continues the sequence exactly (float32, 1e-5)."""
    torch.manual_seed(4)
    layer = LAYERS[name](backend="chunked")
    steps = _spy(monkeypatch, deltanet_mod, "delta_rule_steps")
    chunked = _spy(monkeypatch, deltanet_mod, "delta_rule")
    limit = DECODE_STEP_MAX_TOKENS["plain"]
    pieces = [limit + 5, 1, 1, limit, 3, 1]  # the first piece is too long for a step: the chunked op
    x = torch.randn(2, sum(pieces), D_MODEL)
    with torch.no_grad():
        full = layer(x)
        chunked.clear()
        cache = layer.init_cache(2, x.shape[1])
        outs, pos = [], 0
        for n in pieces:
            outs.append(layer(x[:, pos : pos + n], cache))
            pos += n
    assert steps == pieces[1:] and chunked == pieces[:1]
    assert cache.pos == x.shape[1]
    assert _rel(torch.cat(outs, dim=1), full) < 1e-5


def test_decode_with_gradient_keeps_the_differentiable_op(monkeypatch):
    """With grad mode on, cached forwards stay on the differentiable op, still continue the sequence,
    and each one backpropagates (the op's saved initial state is not the cache tensor that the layer
    then overwrites in place)."""
    torch.manual_seed(5)
    layer = LAYERS["gated"](backend="chunked")
    steps = _spy(monkeypatch, deltanet_mod, "delta_rule_steps")
    x = torch.randn(2, 7, D_MODEL)
    with torch.no_grad():
        full = layer(x)
    cache = layer.init_cache(2, 7)
    with torch.no_grad():
        outs = [layer(x[:, :2], cache)]
    assert steps == [2]
    for s, e in [(2, 3), (3, 7)]:
        outs.append(layer(x[:, s:e], cache))
        outs[-1].square().sum().backward()
    assert steps == [2], "a forward that needs a gradient must not run the in-place step"
    assert layer.A_log.grad is not None and layer.A_log.grad.abs().sum() > 0
    assert _rel(torch.cat(outs, dim=1).detach(), full) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_steps_match_the_reference(gated):
    """The in-place recurrence step equals the reference op (float64): outputs and the state it leaves."""
    gen = torch.Generator().manual_seed(6)
    b, T, H, K, V = 2, 5, 3, 4, 6
    f64 = dict(generator=gen, dtype=torch.float64)
    q, k = torch.randn(b, T, H, K, **f64), F.normalize(torch.randn(b, T, H, K, **f64), dim=-1)
    v, beta = torch.randn(b, T, H, V, **f64), torch.rand(b, T, H, **f64)
    g = -torch.rand(b, T, H, **f64) if gated else None
    s0 = torch.randn(b, H, K, V, **f64)
    o_ref, s_ref = delta_rule_reference(q, k, v, beta, g, scale=0.7, initial_state=s0, output_final_state=True)
    state = s0.clone()
    o = delta_rule_steps(state, q, k, v, beta, g, 0.7)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (run on the CPU under TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("name", ["deltanet", "gated"])
def test_triton_decode_kernels_equal_full_forward(name, monkeypatch):
    """backend="triton" (interpreted on the CPU): one-token steps run the conv-update kernel on the
    cached windows in place and the fused recurrent delta-rule kernel, a short piece the fused kernel
    too; the outputs continue the full forward's sequence (float32, 1e-5)."""
    torch.manual_seed(7)
    layer = LAYERS[name](backend="chunked")
    x = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, 12)
        outs = [layer(x[:, :8], cache)]
    layer.backend = "triton"
    # (import_module: the package name is shadowed by the op function that mixlab.ops re-exports)
    kernel = _spy(monkeypatch, importlib.import_module("mixlab.ops.delta_rule.triton"), "delta_rule_recurrent_triton")
    conv_updates = _spy(monkeypatch, importlib.import_module("mixlab.ops.conv.triton"), "causal_conv1d_update_triton")
    windows = (cache.conv_q, cache.conv_k, cache.conv_v)
    with torch.no_grad():
        for s, e in [(8, 9), (9, 11), (11, 12)]:
            outs.append(layer(x[:, s:e], cache))
    assert kernel == [1, 2, 1] and len(conv_updates) == 3 * 2
    assert (cache.conv_q, cache.conv_k, cache.conv_v) == windows
    assert _rel(torch.cat(outs, dim=1), full) < 1e-5


@pytest.mark.parametrize("name", ["deltanet-gate-expand", "gated"])
def test_reference_and_chunked_backends_agree_with_gradients(name):
    torch.manual_seed(1)
    ref = LAYERS[name](backend="reference", dtype=torch.float64)
    chk = LAYERS[name](backend="chunked", dtype=torch.float64)
    chk.load_state_dict(ref.state_dict())
    x = torch.randn(2, 67, D_MODEL, dtype=torch.float64)
    y_ref, y_chk = ref(x), chk(x)
    assert _rel(y_chk, y_ref) < 1e-10
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    (y_chk * w).sum().backward()
    for (n, p_ref), p_chk in zip(ref.named_parameters(), chk.parameters()):
        assert p_ref.grad is not None and p_ref.grad.abs().max() > 0, f"{n} gets no gradient"
        assert _rel(p_chk.grad, p_ref.grad) < 1e-9, n


def test_gated_forward_matches_composition_of_ops():
    """The layer equals the documented pipeline written out with plain torch ops and the reference rule."""
    torch.manual_seed(2)
    layer = GatedDeltaNet(D_MODEL, n_heads=2, head_dim=4, dtype=torch.float64)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    B, T, H, K, V = 2, 9, 2, 4, 8

    def conv_silu(y, conv):
        W = conv.weight.shape[-1]
        y = F.conv1d(F.pad(y.transpose(1, 2), (W - 1, 0)), conv.weight, groups=y.shape[-1])
        return F.silu(y).transpose(1, 2)

    def l2(y):  # fla's l2norm: eps inside the square root
        return y / (y.square().sum(-1, keepdim=True) + 1e-6).sqrt()

    q = l2(conv_silu(layer.q_proj(x), layer.q_conv1d).view(B, T, H, K))
    k = l2(conv_silu(layer.k_proj(x), layer.k_conv1d).view(B, T, H, K))
    v = conv_silu(layer.v_proj(x), layer.v_conv1d).view(B, T, H, V)
    beta = torch.sigmoid(layer.b_proj(x))
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    o, _ = delta_rule_reference(q, k, v, beta, g, scale=K**-0.5)
    o = F.rms_norm(o, (V,), layer.o_norm.weight, eps=layer.o_norm.eps)
    o = o * F.silu(layer.g_proj(x).view(B, T, H, V))
    expected = layer.o_proj(o.reshape(B, T, H * V))
    assert _rel(layer(x), expected) < 1e-12


def test_parameter_layout_matches_fla():
    """Names and shapes of fla's GatedDeltaNet / DeltaNet, so their checkpoints load directly."""
    d, H, K = 48, 3, 8
    gdn = GatedDeltaNet(d, n_heads=H, head_dim=K, expand_v=2.0)
    V = 2 * K
    assert {n: tuple(p.shape) for n, p in gdn.state_dict().items()} == {
        "q_proj.weight": (H * K, d),
        "k_proj.weight": (H * K, d),
        "v_proj.weight": (H * V, d),
        "a_proj.weight": (H, d),
        "b_proj.weight": (H, d),
        "A_log": (H,),
        "dt_bias": (H,),
        "q_conv1d.weight": (H * K, 1, 4),
        "k_conv1d.weight": (H * K, 1, 4),
        "v_conv1d.weight": (H * V, 1, 4),
        "g_proj.weight": (H * V, d),
        "o_norm.weight": (V,),
        "o_proj.weight": (d, H * V),
    }
    dn = DeltaNet(d, n_heads=H, head_dim=K)
    assert {n: tuple(p.shape) for n, p in dn.state_dict().items()} == {
        "q_proj.weight": (H * K, d),
        "k_proj.weight": (H * K, d),
        "v_proj.weight": (H * K, d),
        "b_proj.weight": (H, d),
        "q_conv1d.weight": (H * K, 1, 4),
        "k_conv1d.weight": (H * K, 1, 4),
        "v_conv1d.weight": (H * K, 1, 4),
        "o_norm.weight": (K,),
        "o_proj.weight": (d, H * K),
    }
    assert gdn.A_log._no_weight_decay and gdn.dt_bias._no_weight_decay
    assert gdn.residual_out_proj == ("o_proj",) and dn.residual_out_proj == ("o_proj",)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(A_init_range=(1.0, 16.0), dt_min=0.01, dt_max=0.05, dt_init_floor=1e-4),
        dict(dt_min=1e-5, dt_max=1e-3, dt_init_floor=1e-4),
    ],
)
def test_gated_init_statistics(kw):
    torch.manual_seed(3)
    H = 512
    layer = GatedDeltaNet(16, n_heads=H, head_dim=2, **kw)
    cfg = GatedDeltaNetConfig(**kw)
    A = layer.A_log.detach().exp()
    lo, hi = cfg.A_init_range
    assert torch.isfinite(layer.A_log).all()
    assert A.min() >= lo and A.max() <= hi * (1 + 1e-6)
    assert A.min() < lo + 0.05 * (hi - lo) and A.max() > hi - 0.05 * (hi - lo)  # spread over the range
    dt = F.softplus(layer.dt_bias.detach())
    dt_lo = max(cfg.dt_min, cfg.dt_init_floor)
    dt_hi = max(cfg.dt_max, cfg.dt_init_floor)
    assert dt.min() >= dt_lo * (1 - 1e-5) and dt.max() <= dt_hi * (1 + 1e-5)
    if cfg.dt_init_floor <= cfg.dt_min:
        # log-uniform: the mean of log dt sits in the middle of [log dt_min, log dt_max].
        mid = 0.5 * (math.log(cfg.dt_min) + math.log(cfg.dt_max))
        assert abs(dt.log().mean().item() - mid) < 0.1 * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
    # The decay is a log-decay in (-inf, 0): memory shrinks, never grows.
    g = layer._decay(torch.randn(2, 5, 16))
    assert (g < 0).all()


def test_A_init_range_zero_never_gives_infinite_A_log():
    layer = GatedDeltaNet(16, n_heads=4, head_dim=2, A_init_range=(0.0, 0.0))
    assert torch.isfinite(layer.A_log).all()


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet])
def test_meta_device_then_reset_parameters(cls):
    """Built on meta, materialised with to_empty (garbage memory, here NaN), the model's init (Linear
    weights) plus the mixer's reset_parameters() leave no parameter uninitialised."""
    with torch.device("meta"):
        layer = cls(D_MODEL, n_heads=2, head_dim=8)
    assert layer.q_proj.weight.is_meta
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(float("nan"))
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
    layer.reset_parameters()
    for n, p in layer.named_parameters():
        assert torch.isfinite(p).all(), f"{n} left uninitialised by reset_parameters()"
    assert torch.equal(layer.o_norm.weight, torch.ones_like(layer.o_norm.weight))
    assert layer.q_conv1d.weight.abs().max() <= 0.5  # U(-1/sqrt(W), 1/sqrt(W)), W = 4
    y = layer(torch.randn(2, 10, D_MODEL))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("letter", ["D", "G"])
def test_built_from_model_config(letter):
    cfg = ModelConfig(
        d_model=D_MODEL,
        pattern=letter,
        deltanet=DeltaNetConfig(n_heads=2, head_dim=8),
        gated_deltanet=GatedDeltaNetConfig(n_heads=2, head_dim=8, A_init_range=(1.0, 2.0)),
    )
    layer = build_mixer(letter, cfg, layer_idx=0)
    assert isinstance(layer, GatedDeltaNet if letter == "G" else DeltaNet)
    if letter == "G":
        assert layer.A_log.exp().max() <= 2.0 * (1 + 1e-6)
    assert layer(torch.randn(1, 5, D_MODEL)).shape == (1, 5, D_MODEL)


def test_bad_arguments_are_reported():
    layer = DeltaNet(D_MODEL, n_heads=2, head_dim=8)
    cache = layer.init_cache(2, 10)
    with pytest.raises(ValueError, match="cache was made for batch 2"):
        layer(torch.randn(3, 1, D_MODEL), cache=cache)
    with pytest.raises(ValueError, match="head_dim \\* expand_v"):
        DeltaNet(D_MODEL, n_heads=2, head_dim=8, expand_v=0.3)
    with pytest.raises(ValueError, match="A_init_range"):
        GatedDeltaNet(D_MODEL, n_heads=2, head_dim=8, A_init_range=(4.0, 1.0))
    with pytest.raises(ValueError, match="dt_min"):
        GatedDeltaNet(D_MODEL, n_heads=2, head_dim=8, dt_min=0.2, dt_max=0.1)
