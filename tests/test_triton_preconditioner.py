"""Triton write keys (preconditioner state, squash, p) against the PyTorch stage: values and all gradients."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from pdelta_cp.chunk.preconditioner import write_keys  # noqa: E402
from pdelta_cp.kernels.preconditioner import write_keys_triton  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("K,x", [(16, 1.5), (100, 2.0), (8, 1.0)])
def test_write_keys_match(K, x):
    gen = torch.Generator().manual_seed(4)
    Nc, H, C = 3, 2, 64
    k = F.normalize(torch.randn(Nc, H, C, K, generator=gen), dim=-1)
    g = F.logsigmoid(torch.randn(Nc, H, C, generator=gen) + 2)
    b = torch.rand(Nc, H, C, generator=gen)
    a0 = torch.rand(Nc, H, K, generator=gen)
    c = torch.randn(H, generator=gen) * 0.3
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (k, g, b, a0, c)]
    dp = torch.randn(Nc, H, C, K, generator=gen).to(DEVICE)
    ref = write_keys(*leaves, x, 1e-6)
    ref_grads = torch.autograd.grad((ref * dp).sum(), leaves, allow_unused=True)
    out = write_keys_triton(*leaves, x, 1e-6)
    grads = torch.autograd.grad((out * dp).sum(), leaves, allow_unused=True)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    assert rel_rms(out, ref) < tol
    for name, a, r in zip(("k", "g_atk", "beta_atk", "A_start", "centre"), grads, ref_grads):
        if r is None or r.abs().sum() == 0:  # x = 1: nothing depends on the preconditioner
            assert a is None or a.abs().max() < 1e-6, name
            continue
        assert rel_rms(a, r) < tol, (name, rel_rms(a, r))
