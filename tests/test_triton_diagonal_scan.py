"""The preconditioner's inter-chunk scan in Triton (kernels/diagonal_scan.py) against the PyTorch scan."""
import pytest
import torch

pytest.importorskip("triton")

from pdelta_cp.chunk.plan import diagonal_scan, make_chunk_plan  # noqa: E402
from pdelta_cp.kernels.diagonal_scan import diagonal_scan_triton  # noqa: E402
from pdelta_cp.testing import rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bounds", [[(0, 64 * 70)], [(0, 64 * 3), (64 * 3, 64 * 40), (64 * 40, 64 * 41)]],
                         ids=["one_segment_three_tiles", "three_segments"])
@pytest.mark.parametrize("per_head_decay", [True, False])
def test_diagonal_scan_matches_pytorch(bounds, per_head_decay):
    """Segments shorter and longer than a tile (32 chunks), decay broadcast over K (as the preconditioner's) or
    per feature; entering states, final states and the gradients of init, decay and end."""
    gen = torch.Generator().manual_seed(0)
    plan = make_chunk_plan(bounds, bounds[-1][1], 64, DEVICE)
    Nc, H, K = plan.num_chunks, 3, 20
    decay = (torch.rand(Nc, H, 1 if per_head_decay else K, generator=gen) * 0.5 + 0.5).to(DEVICE)
    decay.requires_grad_(True)
    end = torch.rand(Nc, H, K, generator=gen).to(DEVICE).requires_grad_(True)
    init = torch.rand(len(bounds), H, K, generator=gen).to(DEVICE).requires_grad_(True)
    leaves = (init, decay, end)

    def run(scan):
        before, final = scan(plan, init, decay.expand(Nc, H, K), end)
        g_before = torch.randn(before.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        g_final = torch.randn(final.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        return before, final, torch.autograd.grad((before * g_before).sum() + (final * g_final).sum(), leaves)

    ref_before, ref_final, ref_grads = run(diagonal_scan)
    before, final, grads = run(diagonal_scan_triton)
    assert rel_rms(before, ref_before) < 1e-6 and rel_rms(final, ref_final) < 1e-6
    for name, a, b in zip(("init", "decay", "end"), grads, ref_grads):
        assert rel_rms(a, b) < 1e-6, (name, rel_rms(a, b))
