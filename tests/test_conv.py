"""Short causal conv against the per-sequence reference."""
import pytest
import torch

from pdelta_cp.conv import short_conv
from pdelta_cp.reference import naive_short_conv
from pdelta_cp.testing import rel_rms


@pytest.mark.parametrize("cu", [None, [0, 1, 3, 20, 50]])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_reference(cu, activation):
    gen = torch.Generator().manual_seed(0)
    B = 2 if cu is None else 1
    x = torch.randn(B, 50, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    cu_t = None if cu is None else torch.tensor(cu)
    y = short_conv(x, w, b, activation, cu_seqlens=cu_t)
    y_ref = naive_short_conv(x, w, b, activation, cu_seqlens=cu_t)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((y * dy).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (x, w, b))
    assert rel_rms(y, y_ref) < 1e-13
    assert all(rel_rms(a, e) < 1e-13 for a, e in zip(grads, grads_ref))


def test_conv_bad_input():
    with pytest.raises(ValueError, match="weight"):
        short_conv(torch.randn(1, 8, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation"):
        short_conv(torch.randn(1, 8, 4), torch.randn(4, 4), activation="gelu")
