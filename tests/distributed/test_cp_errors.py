"""A rank with bad input, or ranks that disagree, make every rank raise: no rank waits in a collective."""
import pytest
import torch

from pdelta_cp import precond_delta_rule
from pdelta_cp.conv import short_conv
from pdelta_cp.cp.layout import shard
from pdelta_cp.testing import SEQUENCE_ARGS, make_inputs

pytestmark = pytest.mark.distributed


def _local_args(cp, rank, T=32, **kw):
    inp = {n: t.detach() for n, t in make_inputs(T=T, variant="pgdn", states=False, **kw).items()}
    return [shard(inp[n], cp, rank) for n in SEQUENCE_ARGS]


def test_bad_input_on_one_rank_fails_everywhere(cp_groups):
    group, rank = cp_groups[2]
    args = _local_args(2, rank)
    if rank == 1:
        args[3] = args[3][..., :1].clone()  # beta with the wrong head count
    exc = ValueError if rank == 1 else RuntimeError
    with pytest.raises(exc, match="beta must have shape" if rank == 1 else r"CP rank\(s\) \[1\]"):
        precond_delta_rule(*args, cp_group=group)


def test_ranks_with_different_lengths_fail_everywhere(cp_groups):
    group, rank = cp_groups[2]
    args = _local_args(2, rank, T=32 if rank == 0 else 40)
    with pytest.raises(ValueError, match="different shapes"):
        precond_delta_rule(*args, cp_group=group)


def test_cu_seqlens_must_describe_the_whole_stream(cp_groups):
    group, rank = cp_groups[2]
    args = _local_args(2, rank)
    with pytest.raises(ValueError, match="describes the global stream"):
        precond_delta_rule(*args, cu_seqlens=torch.tensor([0, 16]), cp_group=group)  # local length, not global


def test_layout_pieces_must_divide(cp_groups):
    group, rank = cp_groups[2]
    args = [t[:, :15] for t in _local_args(2, rank)]
    with pytest.raises(ValueError, match="multiple of 2"):
        precond_delta_rule(*args, cp_group=group, cp_layout="zigzag")


def test_unknown_layout_and_conv_errors(cp_groups):
    group, rank = cp_groups[2]
    with pytest.raises(ValueError, match="cp_layout must be one of"):
        precond_delta_rule(*_local_args(2, rank), cp_group=group, cp_layout="ring")
    x = torch.randn(1, 8, 4)
    w = torch.randn(4, 4) if rank == 0 else torch.randn(3, 4)
    with pytest.raises((ValueError, RuntimeError), match="weight|rejected"):
        short_conv(x, w, cp_group=group)


def test_group_still_usable_after_errors(cp_groups):
    """After the failures above, the same group still computes correctly (no half-finished collective)."""
    group, rank = cp_groups[2]
    o, _, _ = precond_delta_rule(*_local_args(2, rank), cp_group=group)
    assert torch.isfinite(o).all()


def test_ranks_with_different_requires_grad_fail_everywhere(cp_groups):
    """Otherwise one rank would wait in a backward collective that the other never runs."""
    group, rank = cp_groups[2]
    args = _local_args(2, rank)
    if rank == 0:
        args[0] = args[0].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad"):
        precond_delta_rule(*args, cp_group=group)
