"""The short conv's CP halo: outputs and gradients equal the single-process conv, including pieces shorter
than the conv width (the halo then reaches back over several ranks)."""
import pytest
import torch
import torch.distributed as dist

from pdelta_cp.conv import short_conv
from pdelta_cp.cp.layout import shard
from pdelta_cp.testing import rel_rms

pytestmark = pytest.mark.distributed

CASES = {
    "fixed_B2": (2, 64, None),
    "varlen": (1, 64, [0, 3, 30, 31, 64]),
    "one_token_pieces": (1, 8, [0, 5, 8]),  # with CP=4 zigzag: 1 token per piece < width - 1
    "two_token_ranks": (2, 8, None),  # CP=4 contiguous: 2 tokens per rank
    "thd_padded": (1, 48, [0, 8, 16, 48]),  # zigzag_per_sequence with CP=4: 1-token pieces inside sequences
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "zigzag_per_sequence"])
@pytest.mark.parametrize("cp", [2, 4])
def test_conv_cp_matches_single_process(cp_groups, cp, layout, case):
    if cp not in cp_groups:
        pytest.skip(f"world size does not hold CP={cp}")
    group, rank = cp_groups[cp]
    B, T, cu = CASES[case]
    if T % (cp * (1 if layout == "contiguous" else 2)):
        pytest.skip("stream not divisible for this layout")
    if layout == "zigzag_per_sequence" and cu is not None and any((b - a) % (2 * cp) for a, b in zip(cu, cu[1:])):
        pytest.skip("sequences not padded to a multiple of 2*cp")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(B, T, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(B, T, 6, generator=gen, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu)
    y = short_conv(x, w, b, cu_seqlens=cu_t)
    ref_grads = torch.autograd.grad((y * dy).sum(), (x, w, b))

    y_local = short_conv(shard(x, cp, rank, layout, cu_seqlens=cu), w, b, cu_seqlens=cu_t, cp_group=group,
                         cp_layout=layout)
    grads = torch.autograd.grad((y_local * shard(dy, cp, rank, layout, cu_seqlens=cu)).sum(), (x, w, b))
    assert rel_rms(y_local, shard(y, cp, rank, layout, cu_seqlens=cu)) < 1e-13
    for gr, ref in zip(grads, ref_grads):
        gr = gr.clone()
        dist.all_reduce(gr, group=group)
        assert rel_rms(gr, ref) < 1e-13
