"""Mamba and Mamba2 layers: decode == full forward (through the chunked op, the plain recurrence step and
the Triton decode kernels), mamba_ssm's layout and semantics, init, meta build.

The Triton decode tests run the kernels on the CPU under ``TRITON_INTERPRET=1`` (set here before Triton
is imported, as the kernel tests do) and skip when Triton is not installed."""

import dataclasses
import importlib
import importlib.util
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixlab.layers.mamba as mamba_mod
import mixlab.layers.mamba2 as mamba2_mod
from mixlab.config import Mamba2Config, MambaConfig, ModelConfig
from mixlab.layers import build_mixer
from mixlab.layers.common import DECODE_STEP_MAX_TOKENS, conv_steps
from mixlab.layers.mamba import Mamba, MambaCache, selective_scan_steps
from mixlab.layers.mamba2 import Mamba2, Mamba2Cache, ssd_steps
from mixlab.ops.conv.reference import causal_conv1d as causal_conv1d_reference
from mixlab.ops.selective_scan.reference import selective_scan_reference
from mixlab.ops.ssd.reference import ssd_reference

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton (run on the CPU under TRITON_INTERPRET=1)",
)

D_MODEL = 32
MAMBA_KW = dict(d_state=8, d_conv=4, expand=2)
MAMBA2_KW = dict(d_state=16, d_conv=4, expand=2, headdim=16, ngroups=2, chunk_size=8)


def make(cls, seed=0, **kw):
    torch.manual_seed(seed)
    base = MAMBA_KW if cls is Mamba else MAMBA2_KW
    return cls(D_MODEL, **{**base, **kw})


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("prefix", [0, 1, 7, 20])
def test_prefill_then_decode_equals_full_forward(cls, backend, prefix):
    layer = make(cls, backend=backend)
    T = 21
    x = torch.randn(2, T, D_MODEL, generator=torch.Generator().manual_seed(prefix))
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, T)
        outs = [layer(x[:, :prefix], cache)] if prefix else []
        for t in range(prefix, T):
            outs.append(layer(x[:, t : t + 1], cache))
    assert cache.pos == T
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_decode_in_uneven_pieces(cls):
    layer = make(cls, backend="chunked")
    x = torch.randn(3, 30, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(3, 30)
        outs = [layer(x[:, s:e], cache) for s, e in [(0, 2), (2, 11), (11, 12), (12, 29), (29, 30)]]
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


def _spy(monkeypatch, module, name):
    """Count the calls of ``module.name`` (still running it)."""
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[1].shape[1] if name.endswith("_steps") else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_plain_decode_steps_are_used_and_equal_full_forward(cls, monkeypatch):
    """Without gradient, a cached forward of 1 to DECODE_STEP_MAX_TOKENS["plain"] tokens runs the plain
    recurrence (never the scan op) and continues the sequence exactly (float32, 1e-5)."""
    layer = make(cls, backend="chunked")
    steps = _spy(monkeypatch, *((mamba_mod, "selective_scan_steps") if cls is Mamba else (mamba2_mod, "ssd_steps")))
    scans = _spy(monkeypatch, *((mamba_mod, "selective_scan") if cls is Mamba else (mamba2_mod, "ssd")))
    limit = DECODE_STEP_MAX_TOKENS["plain"]
    pieces = [limit + 3, 1, 1, limit, 2, 1]  # the first piece is too long for a step: the scan op
    x = torch.randn(2, sum(pieces), D_MODEL, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = layer(x)
        scans.clear()
        cache = layer.init_cache(2, x.shape[1])
        outs, pos = [], 0
        for n in pieces:
            outs.append(layer(x[:, pos : pos + n], cache))
            pos += n
    assert steps == pieces[1:] and len(scans) == 1
    assert cache.pos == x.shape[1] and cache.ssm_state.dtype == torch.float32
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_decode_with_gradient_keeps_the_differentiable_op(cls, monkeypatch):
    """With grad mode on, cached forwards stay on the differentiable scan op, still continue the
    sequence, and each one backpropagates (the op's saved initial state is not the cache tensor that
    the layer then overwrites in place)."""
    layer = make(cls, backend="chunked")
    steps = _spy(monkeypatch, *((mamba_mod, "selective_scan_steps") if cls is Mamba else (mamba2_mod, "ssd_steps")))
    x = torch.randn(2, 14, D_MODEL, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = layer(x)
    cache = layer.init_cache(2, 14)
    with torch.no_grad():
        outs = [layer(x[:, :3], cache)]
    assert steps == [3]
    for s, e in [(3, 4), (4, 14)]:  # the last piece spans two of Mamba2's 8-token chunks
        outs.append(layer(x[:, s:e], cache))
        outs[-1].square().sum().backward()
    assert steps == [3], "a forward that needs a gradient must not run the in-place step"
    assert layer.A_log.grad is not None and layer.A_log.grad.abs().sum() > 0
    assert rel_err(torch.cat(outs, 1).detach(), full) < 1e-5
    assert mamba_mod.decode_path(layer, torch.randn(2, 1, D_MODEL), None) is None


def test_conv_steps_match_the_conv_op():
    """The sliding-window conv of a few tokens equals causal_conv1d (float64), state shifted in place."""
    gen = torch.Generator().manual_seed(6)
    for W, T in [(4, 1), (4, 5), (2, 3), (1, 2)]:
        x = torch.randn(2, T, 6, generator=gen, dtype=torch.float64)
        w, b = (
            torch.randn(6, 1, W, generator=gen, dtype=torch.float64),
            torch.randn(6, generator=gen, dtype=torch.float64),
        )
        state = torch.randn(2, 6, W - 1, generator=gen, dtype=torch.float64)
        y_ref, final_ref = causal_conv1d_reference(x, w, b, "silu", state, output_final_state=True)
        y = conv_steps(x, state, w, b)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, final_ref, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_steps_match_the_reference(groups):
    gen = torch.Generator().manual_seed(7 + groups)
    b, T, H, P, N = 2, 5, 4, 3, 6
    f64 = dict(generator=gen, dtype=torch.float64)
    x, dt = torch.randn(b, T, H, P, **f64), torch.randn(b, T, H, **f64)
    A = -torch.rand(H, **f64) * 3 - 0.2
    B, C = torch.randn(b, T, groups, N, **f64), torch.randn(b, T, groups, N, **f64)
    D, dt_bias, h0 = torch.randn(H, **f64), torch.randn(H, **f64), torch.randn(b, H, P, N, **f64)
    y_ref, h_ref = ssd_reference(
        x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, initial_state=h0, output_final_state=True
    )
    state = h0.clone()
    y = ssd_steps(state, x, dt, A, B, C, D, dt_bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, h_ref, rtol=1e-12, atol=1e-12)


def test_selective_scan_steps_match_the_reference():
    gen = torch.Generator().manual_seed(9)
    b, T, D, N = 2, 4, 6, 5
    f64 = dict(generator=gen, dtype=torch.float64)
    u, dt, z = (torch.randn(b, T, D, **f64) for _ in range(3))
    A = -torch.rand(D, N, **f64) * 3
    B, C = torch.randn(b, T, N, **f64), torch.randn(b, T, N, **f64)
    Dskip, bias, h0 = torch.randn(D, **f64), torch.randn(D, **f64), torch.randn(b, D, N, **f64)
    y_ref, h_ref = selective_scan_reference(
        *(t.transpose(1, 2) for t in (u, dt)),
        A,
        *(t.transpose(1, 2) for t in (B, C)),
        D=Dskip,
        z=z.transpose(1, 2),
        delta_bias=bias,
        delta_softplus=True,
        initial_state=h0,
        return_last_state=True,
    )
    state = h0.clone()
    y = selective_scan_steps(state, u, dt, A, B, C, Dskip, z, bias)
    torch.testing.assert_close(y, y_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, h_ref, rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_triton_decode_kernels_equal_full_forward(cls, monkeypatch):
    """backend="triton" (interpreted on the CPU): one-token steps run the conv-update and the fused
    decode kernels (state updated in place), short pieces the fused kernel too for Mamba2; the outputs
    continue the sequence of the full forward (float32, 1e-5)."""
    conv_triton = importlib.import_module("mixlab.ops.conv.triton")
    layer = make(cls, backend="chunked")
    x = torch.randn(2, 13, D_MODEL, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = layer(x)
        cache = layer.init_cache(2, 13)
        outs = [layer(x[:, :9], cache)]  # prefill on the chunked op
    layer.backend = "triton"
    conv_updates = _spy(monkeypatch, conv_triton, "causal_conv1d_update_triton")
    if cls is Mamba:
        # (import_module: the package names are shadowed by the op functions that mixlab.ops re-exports)
        kernels = _spy(
            monkeypatch, importlib.import_module("mixlab.ops.selective_scan.triton"), "selective_state_update_triton"
        )
        pieces = [1, 1, 1, 1]
    else:
        kernels = _spy(monkeypatch, importlib.import_module("mixlab.ops.ssd.triton"), "ssd_recurrent_triton")
        pieces = [1, 2, 1]
    conv_state, ssm_state = cache.conv_state, cache.ssm_state
    pos = 9
    with torch.no_grad():
        for n in pieces:
            outs.append(layer(x[:, pos : pos + n], cache))
            pos += n
    assert len(kernels) == len(pieces) and len(conv_updates) == pieces.count(1)
    assert cache.conv_state is conv_state and cache.ssm_state is ssm_state  # in place, as CUDA graphs need
    assert rel_err(torch.cat(outs, 1), full) < 1e-5


def test_cache_shapes_and_errors():
    m, m2 = make(Mamba), make(Mamba2)
    c = m.init_cache(4, 100)
    assert isinstance(c, MambaCache)
    assert c.conv_state.shape == (4, 64, 3) and c.ssm_state.shape == (4, 64, 8) and c.ssm_state.dtype == torch.float32
    c2 = m2.init_cache(4, 100, dtype=torch.bfloat16)
    assert isinstance(c2, Mamba2Cache)
    assert c2.conv_state.shape == (4, 64 + 2 * 2 * 16, 3) and c2.conv_state.dtype == torch.bfloat16
    assert c2.ssm_state.shape == (4, 4, 16, 16) and c2.ssm_state.dtype == torch.float32
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(2, 3, D_MODEL), c)
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(D_MODEL, headdim=24)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(D_MODEL, headdim=16, ngroups=3)


MAMBA_SHAPES = {
    "in_proj.weight": (128, 32),
    "conv1d.weight": (64, 1, 4),
    "conv1d.bias": (64,),
    "x_proj.weight": (2 + 16, 64),  # dt_rank = ceil(32 / 16) = 2
    "dt_proj.weight": (64, 2),
    "dt_proj.bias": (64,),
    "A_log": (64, 8),
    "D": (64,),
    "out_proj.weight": (32, 64),
}
MAMBA2_SHAPES = {
    "in_proj.weight": (2 * 64 + 2 * 2 * 16 + 4, 32),
    "conv1d.weight": (64 + 64, 1, 4),
    "conv1d.bias": (128,),
    "dt_bias": (4,),
    "A_log": (4,),
    "D": (4,),
    "norm.weight": (64,),
    "out_proj.weight": (32, 64),
}


@pytest.mark.parametrize("cls, shapes", [(Mamba, MAMBA_SHAPES), (Mamba2, MAMBA2_SHAPES)])
def test_meta_build_to_empty_reset_gives_mamba_ssm_layout_and_finite_outputs(cls, shapes):
    with torch.device("meta"):
        layer = make(cls)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == shapes
    layer.to_empty(device="cpu")
    with torch.no_grad():  # what LanguageModel.init_weights does for plain Linear weights
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 0.02)
                if mod.bias is not None:
                    mod.bias.zero_()
    layer.reset_parameters()
    out = layer(torch.randn(2, 9, D_MODEL))
    assert torch.isfinite(out).all()
    no_wd = {n for n, p in layer.named_parameters() if getattr(p, "_no_weight_decay", False)}
    assert no_wd == ({"A_log", "D", "dt_proj.bias"} if cls is Mamba else {"A_log", "D", "dt_bias"})
    assert layer.residual_out_proj == ("out_proj",)


def test_mamba_init_statistics():
    torch.manual_seed(0)
    m = Mamba(256, d_state=16, expand=4, dt_min=1e-3, dt_max=1e-1)  # d_inner = 1024
    n = torch.arange(1, 17, dtype=torch.float32)
    assert torch.equal(m.A_log.detach(), torch.log(n).expand(1024, 16))
    assert torch.equal(m.D.detach(), torch.ones(1024))
    dt = F.softplus(m.dt_proj.bias.detach().double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    log_dt = dt.log()
    mid, width = (math.log(1e-3) + math.log(1e-1)) / 2, math.log(1e-1) - math.log(1e-3)
    assert abs(log_dt.mean().item() - mid) < 4 * width / math.sqrt(12 * 1024)  # log-uniform
    assert abs(log_dt.std().item() - width / math.sqrt(12)) < 0.1 * width / math.sqrt(12)
    bound = m.dt_rank**-0.5  # dt_rank = 16
    w = m.dt_proj.weight.detach()
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert m.conv1d.weight.abs().max() <= 1 / math.sqrt(4)
    floored = Mamba(32, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4)
    torch.testing.assert_close(F.softplus(floored.dt_proj.bias.detach()), torch.full((64,), 1e-4))


def test_mamba2_init_statistics():
    torch.manual_seed(0)
    m = Mamba2(256, d_state=16, expand=8, headdim=2, A_init_range=(1.0, 16.0))  # 1024 heads
    A = m.A_log.detach().exp()
    assert A.min() >= 1.0 and A.max() <= 16.0 * (1 + 1e-6)
    assert abs(A.mean().item() - 8.5) < 4 * 15 / math.sqrt(12 * 1024)
    dt = F.softplus(m.dt_bias.detach().double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert abs(dt.log().mean().item() - math.log(1e-2)) < 4 * math.log(100) / math.sqrt(12 * 1024)
    assert torch.equal(m.D.detach(), torch.ones(1024)) and torch.equal(m.norm.weight.detach(), torch.ones(2048))
    assert m.norm.group_size == 2048 and not m.norm.norm_before_gate
    assert m.A_log.dtype == m.D.dtype == m.dt_bias.dtype == torch.float32


def _conv(x, layer):
    """mamba_ssm's non-fused conv: nn.Conv1d with padding W-1, cut to the sequence length, SiLU. x [B, L, C]."""
    L = x.shape[1]
    return F.silu(layer.conv1d(x.transpose(1, 2))[..., :L]).transpose(1, 2)


def mamba_ssm_mamba_forward(layer: Mamba, u):
    """mamba_ssm ``Mamba.forward`` slow path, transcribed with a per-step loop (``selective_scan_ref``)."""
    L = u.shape[1]
    x, z = layer.in_proj(u).chunk(2, dim=-1)
    x = _conv(x, layer)
    dt, B, C = layer.x_proj(x).split([layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    dt = F.softplus(dt @ layer.dt_proj.weight.t() + layer.dt_proj.bias)
    A = -torch.exp(layer.A_log)
    h = u.new_zeros(u.shape[0], layer.d_inner, layer.d_state)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]) + layer.D * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return layer.out_proj(y)


def mamba_ssm_mamba2_forward(layer: Mamba2, u):
    """mamba_ssm ``Mamba2`` semantics, transcribed: its one-token ``step`` recurrence (B/C of group
    h // (H/G)) and ``RMSNormGated`` (norm_before_gate=False, groups of d_inner / ngroups)."""
    bsz, L, _ = u.shape
    G, N, H, P = layer.ngroups, layer.d_state, layer.nheads, layer.headdim
    z, xBC, dt = layer.in_proj(u).split([layer.d_inner, layer.conv_dim, H], dim=-1)
    xBC = _conv(xBC, layer)
    x, B, C = xBC.split([layer.d_inner, G * N, G * N], dim=-1)
    x = x.reshape(bsz, L, H, P)
    B = B.reshape(bsz, L, G, N).repeat_interleave(H // G, dim=2)
    C = C.reshape(bsz, L, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + layer.dt_bias)
    A = -torch.exp(layer.A_log)
    state = u.new_zeros(bsz, H, P, N)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t] * A)
        dBx = torch.einsum("bh,bhn,bhp->bhpn", dt[:, t], B[:, t], x[:, t])
        state = state * dA[:, :, None, None] + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + layer.D[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(bsz, L, layer.d_inner) * F.silu(z)
    yg = y.reshape(bsz, L, G, layer.d_inner // G)
    y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + layer.norm.eps)).reshape(bsz, L, layer.d_inner)
    return layer.out_proj(y * layer.norm.weight)


@pytest.mark.parametrize("cls, transcription", [(Mamba, mamba_ssm_mamba_forward), (Mamba2, mamba_ssm_mamba2_forward)])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_forward_matches_mamba_ssm_semantics(cls, transcription, backend):
    layer = make(cls, backend=backend, dtype=torch.float64)
    with torch.no_grad():  # non-trivial values everywhere, biases included
        layer.D.uniform_(-1, 1)
        layer.conv1d.bias.normal_()
        if cls is Mamba2:
            layer.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, 19, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(layer(u), transcription(layer, u), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_every_parameter_gets_a_gradient(cls):
    layer = make(cls, backend="chunked")
    layer(torch.randn(2, 13, D_MODEL)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_built_from_model_config():
    """The registry passes the sub-config's fields as constructor kwargs, unchanged."""
    cfg = ModelConfig(
        d_model=D_MODEL,
        mamba=MambaConfig(d_state=4, dt_rank=3),
        mamba2=Mamba2Config(d_state=8, headdim=16, ngroups=2, chunk_size=16),
        backend="reference",
    )
    m = build_mixer("m", cfg, layer_idx=1)
    assert isinstance(m, Mamba) and m.dt_rank == 3 and m.d_state == 4 and m.backend == "reference"
    m2 = build_mixer("M", cfg, layer_idx=2)
    assert isinstance(m2, Mamba2) and m2.chunk_size == 16 and m2.nheads == 4 and m2.layer_idx == 2
    assert {f.name for f in dataclasses.fields(Mamba2Config)} <= set(Mamba2.__init__.__code__.co_varnames)
    assert {f.name for f in dataclasses.fields(MambaConfig)} <= set(Mamba.__init__.__code__.co_varnames)
