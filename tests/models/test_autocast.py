"""Every mixer trains under bf16 autocast on the CPU (the plain backends pick their own precision)."""

import pytest
import torch

from mixlab.config import ModelConfig
from mixlab.models import build_model


@pytest.mark.parametrize("pattern", ["D", "G", "m", "M", "AS"])
def test_backward_under_cpu_bf16_autocast(pattern):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=len(pattern), pattern=pattern, d_intermediate=128)
    cfg.attention.window = 8
    for sub in (cfg.deltanet, cfg.gated_deltanet):
        sub.n_heads, sub.head_dim = 2, 16
    cfg.mamba2.headdim, cfg.mamba2.d_state = 16, 16
    model = build_model(cfg, device="cpu")
    ids = torch.randint(0, 64, (2, 70))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
