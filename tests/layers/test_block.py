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
