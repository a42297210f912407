"""Small Triton kernels against their PyTorch forms: q/k normalisation, preconditioner chunk ends."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp.chunk.pipeline import _L2Normalize  # noqa: E402
from pdelta_cp.kernels.l2norm import l2_normalize_to_chunks_triton, l2_normalize_triton  # noqa: E402
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,H,K,C", [(128, 3, 16, 64), (96, 2, 100, 32)], ids=["K16", "K100_C32"])
def test_triton_l2norm_to_chunks_matches_relayout_then_normalize(L, H, K, C, dtype):
    """The fused form reads the stream layout [L, H, K] in x's dtype and writes [L/C, H, C, K] float32; its backward
    writes dx back in the stream layout and x's dtype: the same as relayout + cast + normalise, both ways."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(L, H, K, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(L // C, H, C, K, generator=gen).to(DEVICE)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = l2_normalize_to_chunks_triton(a, 0.5, C)
    yb = _L2Normalize.apply(b.float().reshape(L // C, C, H, K).transpose(1, 2), 0.5)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    assert ya.dtype == torch.float32 and ya.shape == (L // C, H, C, K) and ya.is_contiguous()
    assert a.grad.dtype == dtype and a.grad.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the two gradients round differently
    assert rel_rms(ya, yb) < 1e-6 and rel_rms(a.grad.float(), b.grad.float()) < tol
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        l2_normalize_to_chunks_triton(x[:L - 1], 0.5, C)


def test_triton_l2norm_padded_chunks_keep_x_not_y():
    """Chunks by row tables (a segment's last chunk short: its other rows zero) both ways, and what backward keeps:
    x and the inverse norms, never the float32 y (the stages that read y keep it as long as they need it)."""
    gen = torch.Generator().manual_seed(5)
    L, H, K, C = 100, 2, 24, 32
    starts, lens = torch.tensor([0, 32, 64, 70]), torch.tensor([32, 32, 6, 30], dtype=torch.int32)
    x = torch.randn(L, H, K, generator=gen).to(DEVICE, torch.bfloat16)
    dy = torch.randn(4, H, C, K, generator=gen).to(DEVICE)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = l2_normalize_to_chunks_triton(a, 0.5, C, starts.to(DEVICE), lens.to(DEVICE))
    rows = torch.arange(C)
    idx = torch.where(rows[None, :] < lens[:, None], starts[:, None] + rows[None, :], L)  # row L: zeros
    padded = torch.cat([b.float(), b.new_zeros(1, H, K, dtype=torch.float32)])[idx.to(DEVICE)].transpose(1, 2)
    yb = _L2Normalize.apply(padded, 0.5)
    assert not any(t.shape == ya.shape for t in ya.grad_fn.saved_tensors), "y kept for backward"
    assert any(t.data_ptr() == a.data_ptr() for t in ya.grad_fn.saved_tensors), "x not kept"
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    assert rel_rms(ya, yb) < 1e-6 and rel_rms(a.grad.float(), b.grad.float()) < 1e-2


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


def test_float32_to_bf16_stores_round_to_nearest_even():
    """Kernels that store float32 results into bf16 tensors (dV, the fused q/k normalisation's dx) round as torch
    does; on CPU this checks the interpreter patch of tests/conftest.py (the stock interpreter truncates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def store_both(X, IMPLICIT, EXPLICIT, N: tl.constexpr):
        r = tl.arange(0, N)
        x = tl.load(X + r)
        tl.store(IMPLICIT + r, x)
        tl.store(EXPLICIT + r, x.to(tl.bfloat16))

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256, generator=gen) * torch.logspace(-20, 20, 256)
    x[:4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.0e38])  # ties to even (down, up), sign, near max
    x = x.to(DEVICE)
    implicit, explicit = (torch.empty(256, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    store_both[(1,)](x, implicit, explicit, N=256)
    assert torch.equal(implicit, x.to(torch.bfloat16)) and torch.equal(explicit, x.to(torch.bfloat16))
