import pytest
import torch
import torch.nn.functional as F

from mixlab.ops.norm import gated_rms_norm, rms_norm


def test_rms_norm_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    ref = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)
    assert rms_norm(x.bfloat16(), w, 1e-6).dtype == torch.bfloat16


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4, 2])
def test_gated_rms_norm_definition(norm_before_gate, group_size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    z = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    gs = group_size or 8
    a = x if norm_before_gate else x * F.silu(z)
    ag = a.reshape(2, 3, 8 // gs, gs)
    n = (ag / torch.sqrt((ag * ag).mean(-1, keepdim=True) + 1e-5)).reshape(2, 3, 8) * w
    ref = n * F.silu(z) if norm_before_gate else n
    out = gated_rms_norm(x, z, w, 1e-5, group_size, norm_before_gate)
    torch.testing.assert_close(out, ref)


def test_gated_rms_norm_bad_group():
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm(torch.randn(2, 6), None, None, group_size=4)
