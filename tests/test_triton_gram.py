"""Per-channel decayed Gram helpers (Triton) against the PyTorch gram and its autograd, strong decays included."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp.chunk.gram import gram  # noqa: E402
from pdelta_cp.kernels.gram_channel import run_gram_test  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("K,strength,exact_diag", [
    (16, 1.0, False),  # mild decay: the diagonal blocks' split product (one tensor-core dot)
    (16, 1.0, True),  # the same inputs through the exact column loop
    (20, 40.0, False),  # some chunks past the split's reach: the range check must send them to the loop
    (20, 400.0, False),  # every chunk past it: the split product would overflow
])
def test_gram_channel_matches_pytorch(strict, K, strength, exact_diag):
    gen = torch.Generator().manual_seed(3)
    N, C = 3, 64
    a = torch.randn(N, C, K, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, C, K, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(N, C, K, generator=gen, dtype=torch.float64) + 2) * strength
    gamma = g.cumsum(1).requires_grad_(True)
    dX = torch.randn(N, C, C, generator=gen, dtype=torch.float64)
    X = gram(a, b, gamma, strict)
    mask = torch.ones(C, C, dtype=torch.bool).tril(-1 if strict else 0)
    dA, dB = torch.autograd.grad((X * dX * mask).sum(), (a, b))
    f = [t.detach().float().to(DEVICE).contiguous() for t in (a, b, gamma, dX)]
    Xk, XTk, dAk, dBk = run_gram_test(*f, strict, exact_diag)
    # float32 cumulative decays of magnitude ~1e3 carry ~1e-4 absolute error into the exponents
    tol = (1e-5 if strength == 1.0 else 2e-3 if strength == 400.0 else 2e-4) if DEVICE == "cpu" else 5e-3
    assert torch.isfinite(Xk).all() and torch.isfinite(dAk).all() and torch.isfinite(dBk).all()
    assert rel_rms(Xk.cpu(), X) < tol
    assert rel_rms(XTk.cpu(), X.mT) < tol
    assert rel_rms(dAk.cpu(), dA) < tol and rel_rms(dBk.cpu(), dB) < tol
