"""Block: pre-norm residual mixer + SwiGLU, float32 residual stream, cache pass-through."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mixlab import ModelConfig
from mixlab.layers import Attention, Block, DeltaNet, GatedDeltaNet, Mamba, Mamba2, build_mixer, mixer_kwargs

F64 = torch.float64


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _block(mlp_hidden, dtype=F64, seed=0):
    torch.manual_seed(seed)
    block = Block(16, Attention(16, n_heads=2, dtype=dtype), mlp_hidden=mlp_hidden, norm_eps=1e-6, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # norm weights away from 1, so a missing or misplaced norm shows
    return block


def test_block_with_mlp_matches_formula():
    block = _block(24)
    x = torch.randn(2, 7, 16, dtype=F64)
    h = x + block.mixer(_rms(x, block.norm.weight, 1e-6))
    u = _rms(h, block.mlp_norm.weight, 1e-6)
    mlp = block.mlp
    ref = h + mlp.down_proj(F.silu(mlp.gate_proj(u)) * mlp.up_proj(u))
    torch.testing.assert_close(block(x), ref, rtol=1e-12, atol=1e-12)


def test_mixer_only_block():
    block = _block(0)
    assert block.mlp is None and block.mlp_norm is None
    assert not any("mlp" in n for n, _ in block.named_parameters())
    x = torch.randn(2, 7, 16, dtype=F64)
    torch.testing.assert_close(block(x), x + block.mixer(_rms(x, block.norm.weight, 1e-6)), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_residual_stream_stays_float32_with_bf16_parameters():
    block = _block(24, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 16) * 100
    y = block(x)
    assert y.dtype == torch.float32
    # The stream is x plus bf16 branch outputs added in float32: x's low bits survive exactly.
    h = block.mixer(block.norm(x).bfloat16())
    torch.testing.assert_close(y - block.mlp(block.mlp_norm(x + h.float()).bfloat16()).float(), x + h.float())
    assert Block.residual_dtype(torch.bfloat16) == torch.float32
    assert Block.residual_dtype(F64) == F64


@torch.no_grad()
def test_block_passes_the_cache_to_its_mixer():
    block = _block(24, dtype=torch.float32)
    x = torch.randn(1, 10, 16)
    cache = block.mixer.init_cache(1, 10)
    y = torch.cat([block(x[:, :4], cache)] + [block(x[:, t : t + 1], cache) for t in range(4, 10)], dim=1)
    assert cache.pos == 10
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)


def test_registry_builds_every_letter_from_its_sub_config():
    cfg = ModelConfig(d_model=64, pattern="ASmMDG", n_layers=6)
    cfg.attention = dataclasses.replace(cfg.attention, n_heads=2, window=16)
    expected = {"A": Attention, "S": Attention, "m": Mamba, "M": Mamba2, "D": DeltaNet, "G": GatedDeltaNet}
    for i, letter in enumerate(cfg.layer_types):
        mixer = build_mixer(letter, cfg, i)
        assert type(mixer) is expected[letter]
    assert build_mixer("A", cfg).window is None and build_mixer("S", cfg).window == 16
    assert mixer_kwargs("M", cfg) == dataclasses.asdict(cfg.mamba2)
    with pytest.raises(ValueError, match="allowed"):
        build_mixer("X", cfg)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_add_and_norm_equals_add_then_norm_under_autocast(weight_grad):
    """``RMSNorm.add_forward`` (the MLP norm taking the mixer's residual add) against the add and the norm apart,
    under bf16 autocast where the lean path runs: the same values and gradients for x, h and the weight."""
    from mixlab.layers import RMSNorm

    torch.manual_seed(5)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(weight_grad)
    x0, h0 = torch.randn(2, 7, 16), torch.randn(2, 7, 16).bfloat16()
    gu, gx = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    results = []
    for fused in (True, False):
        x, h = x0.clone().requires_grad_(), h0.clone().requires_grad_()
        norm.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                u, xn = norm.add_forward(x, h, out_dtype=torch.bfloat16)
            else:
                xn = x + h.to(x.dtype)
                u = norm(xn, out_dtype=torch.bfloat16)
        ((u.float() * gu).sum() + (xn * gx).sum()).backward()
        results.append((u, xn, x.grad, h.grad, norm.weight.grad))
    for a, b in zip(*results):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert results[0][1].dtype == torch.float32 and results[0][3].dtype == torch.bfloat16


def test_add_forward_rejects_a_branch_of_another_shape():
    from mixlab.layers import RMSNorm

    with pytest.raises(ValueError, match="h must have x's shape"):
        RMSNorm(16).add_forward(torch.randn(2, 3, 16), torch.randn(2, 3, 8))
