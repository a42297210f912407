"""Short causal conv against the per-sequence reference."""
import pytest
import torch

from pdelta_cp.conv import short_conv
from pdelta_cp.reference import naive_short_conv
from pdelta_cp.testing import rel_rms, saved_float_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU preflight of `million` runs these on CUDA


@pytest.mark.parametrize("cu", [None, [0, 1, 3, 20, 50]])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_matches_reference(cu, activation):
    gen = torch.Generator().manual_seed(0)
    B = 2 if cu is None else 1
    x = torch.randn(B, 50, 6, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    b = torch.randn(6, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    y = short_conv(x, w, b, activation, cu_seqlens=cu_t)
    y_ref = naive_short_conv(x, w, b, activation, cu_seqlens=cu_t)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((y * dy).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (x, w, b))
    assert rel_rms(y, y_ref) < 1e-13
    assert all(rel_rms(a, e) < 1e-13 for a, e in zip(grads, grads_ref))


def test_conv_bad_input():
    with pytest.raises(ValueError, match="weight"):
        short_conv(torch.randn(1, 8, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="activation"):
        short_conv(torch.randn(1, 8, 4), torch.randn(4, 4), activation="gelu")


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_keeps_only_its_input_for_backward(activation):
    """Saved for backward: the input (with its halo rows) and the small index/weights — not a [L, width, D]
    tap tensor or the pre-activation (5x the input per layer at long context)."""
    x = torch.randn(1, 512, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = torch.randn(64, 4, device=DEVICE, requires_grad=True)
    y, saved = saved_float_bytes(short_conv, x, w, None, activation)
    x_bytes = x.numel() * x.element_size()
    assert saved <= x_bytes + 2 * w.numel() * 4 + 64 * 2, (saved, x_bytes)
    y.float().sum().backward()
    assert x.grad is not None and w.grad is not None


def test_conv_bf16_close_to_float64():
    """16-bit input: float32 accumulation, one rounding of the output; every gradient near float64."""
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(1, 300, 32, generator=gen, dtype=torch.float64).to(DEVICE)
    w64 = torch.randn(32, 4, generator=gen, dtype=torch.float64).to(DEVICE) * 0.5
    dy = torch.randn(1, 300, 32, generator=gen, dtype=torch.float64).to(DEVICE)
    x = x64.to(torch.bfloat16).requires_grad_(True)
    w = w64.float().requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True)
    y = short_conv(x, w, None, "silu")
    y_ref = naive_short_conv(xr, wr, None, "silu")
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert y.dtype == torch.bfloat16 and rel_rms(y.double(), y_ref) < 5e-3
    assert rel_rms(x.grad.double(), xr.grad) < 5e-3 and rel_rms(w.grad.double(), wr.grad) < 5e-3
