"""Small Triton kernels against their PyTorch forms: q/k normalisation, preconditioner chunk ends."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp.chunk.pipeline import _L2Normalize  # noqa: E402
from pdelta_cp.kernels.l2norm import l2_normalize_triton  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape,scale", [((3, 2, 64, 16), 0.25), ((2, 37, 100), 1.0), ((5, 1, 8), 3.0)],
                         ids=["chunks_K16", "rows_not_multiple_of_16_K100", "tiny_K8"])
def test_triton_l2norm_matches_pytorch(shape, scale):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen).to(DEVICE)
    x[0, 0] = 0.0  # a padding row: stays zero, gradient finite
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = l2_normalize_triton(a, scale), _L2Normalize.apply(b, scale)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    tol = 1e-6 if DEVICE == "cpu" else 1e-5
    assert rel_rms(ya, yb) < tol and rel_rms(a.grad, b.grad) < tol
    assert torch.all(ya[0, 0] == 0) and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("K", [16, 100])
def test_triton_preconditioner_chunk_ends_match_pytorch(K):
    """The preconditioner's per-chunk zero-start end state Σ_c w_c k̂_c² (the summary CP exchanges)."""
    from pdelta_cp.chunk.preconditioner import _WeightedSquares
    from pdelta_cp.kernels.precond_summary import weighted_squares_triton

    gen = torch.Generator().manual_seed(3)
    w = torch.rand(3, 2, 64, generator=gen).to(DEVICE)
    k = torch.randn(3, 2, 64, K, generator=gen).to(DEVICE)
    da = torch.randn(3, 2, K, generator=gen).to(DEVICE)
    outs, grads = [], []
    for fn in (weighted_squares_triton, _WeightedSquares.apply):
        wi, ki = w.clone().requires_grad_(True), k.clone().requires_grad_(True)
        a = fn(wi, ki)
        (a * da).sum().backward()
        outs.append(a)
        grads.append((wi.grad, ki.grad))
    tol = 1e-6 if DEVICE == "cpu" else 1e-5
    assert rel_rms(outs[0], outs[1]) < tol
    assert all(rel_rms(a, b) < tol for a, b in zip(grads[0], grads[1]))
