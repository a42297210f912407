"""The model's memory-lean pieces (RMSNorm, SwiGLU's gate) against their plain formulas: outputs and every
gradient in float64, the 16-bit output dtype, and what each keeps for backward."""
import pytest
import torch
import torch.nn.functional as F

from pdelta_cp.layers import rms_norm
from pdelta_cp.model import _SiluGate
from pdelta_cp.testing import rel_rms, saved_float_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU preflight of `million` runs these on CUDA


def _plain_rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_matches_formula_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    w = torch.randn(16, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    dy = torch.randn(2, 5, 3, 16, generator=gen, dtype=torch.float64).to(DEVICE)
    y, y_ref = rms_norm(x, w, 1e-6), _plain_rms_norm(x, w, 1e-6)
    grads = torch.autograd.grad((y * dy).sum(), (x, w))
    grads_ref = torch.autograd.grad((y_ref * dy).sum(), (x, w))
    assert rel_rms(y, y_ref) < 1e-14
    assert all(rel_rms(a, b) < 1e-13 for a, b in zip(grads, grads_ref))
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x[:1, :2], w))


def test_rms_norm_16bit_keeps_input_dtype_and_only_x():
    x = torch.randn(256, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y, saved = saved_float_bytes(rms_norm, x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    assert saved <= x.numel() * 2 + 256 * 4 + 64 * 4  # x, one float32 per row, the weight
    ref = _plain_rms_norm(x.detach().double(), w.detach().double(), 1e-6)
    assert rel_rms(y.double(), ref) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_silu_gate_matches_formula(dtype):
    gen = torch.Generator().manual_seed(1)
    gu64 = torch.randn(3, 7, 2 * 24, generator=gen, dtype=torch.float64).to(DEVICE) * 2
    dy = torch.randn(3, 7, 24, generator=gen, dtype=torch.float64).to(DEVICE)
    gu = gu64.to(dtype).requires_grad_(True)
    ref_in = gu.detach().double().requires_grad_(True)
    y, saved = saved_float_bytes(_SiluGate.apply, gu)
    gate, up = ref_in.chunk(2, dim=-1)
    y_ref = F.silu(gate) * up
    (y.double() * dy).sum().backward()
    (y_ref * dy).sum().backward()
    tol = 1e-14 if dtype == torch.float64 else 8e-3
    assert y.dtype == dtype and rel_rms(y.double(), y_ref) < tol
    assert rel_rms(gu.grad.double(), ref_in.grad) < tol
    assert saved == gu.numel() * gu.element_size()  # only the input


def test_hand_written_backwards_refuse_double_backward():
    """Their backwards treat saved values (1/rms, the remade pre-activation) as constants: a second derivative
    would be silently wrong, so asking for one raises."""
    from pdelta_cp.conv import short_conv

    x = torch.randn(1, 12, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cw = torch.randn(8, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for fn in (lambda: rms_norm(x, w, 1e-6), lambda: _SiluGate.apply(x), lambda: short_conv(x, cw, None, "silu")):
        (g,) = torch.autograd.grad(fn().square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()
